"""Orbax checkpoints that hold everything needed to resume exactly.

Each step directory has two items: `state` (step, parameters, optimizer state, model state; saved
asynchronously from the sharded arrays) and `loader` (the data loader's position, as JSON).
Orbax writes a step into a temporary directory and renames it only when every item and
every host is done, so a save killed half-way is never listed by `latest_step()` and a
resume falls back to the previous complete checkpoint.

A step that is listed but does not restore (a truncated or missing file, written by a failing
disk or a careless hand) is moved to `corrupt/STEP-TIME` (a name Orbax does not list as a
step, never deleted) by `restore_latest`, which then tries the step before it.
"""

from __future__ import annotations

import base64
import logging
import os
import sys
import time
import traceback
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from clip_jax import storage
from clip_jax.errors import UserError

CORRUPT_DIR = "corrupt"


class CheckpointError(UserError):
    """A checkpoint that does not restore, or none that does."""


def _encode_loader_state(state: Any) -> dict:
    if isinstance(state, (bytes, bytearray)):
        return {"bytes_b64": base64.b64encode(bytes(state)).decode("ascii")}
    return {"json": state}


def _decode_loader_state(stored: dict) -> Any:
    if "bytes_b64" in stored:
        return base64.b64decode(stored["bytes_b64"])
    return stored["json"]


def _reason(error: Exception) -> str:
    """The first line of a restore error; TensorStore appends a bound method's repr to it."""
    lines = [line for line in str(error).splitlines() if line.strip()] or [""]
    first = lines[0].split(" See full TensorStore details")[0].strip()
    return f"{type(error).__name__}: {first[:200]}"


_ORBAX_FILES = f"{os.sep}orbax{os.sep}"


def _raised_in_orbax(trace) -> bool:
    return trace is not None and any(
        _ORBAX_FILES in frame.filename for frame in traceback.extract_tb(trace)
    )


def _from_abandoned_restore(unraisable) -> bool:
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    return _raised_in_orbax(unraisable.exc_traceback)


class _AbandonedRestoreTasks(logging.Filter):
    """asyncio's 'Task exception was never retrieved' for Orbax's own read tasks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _raised_in_orbax(record.exc_info[2]):
            return False
        return _ORBAX_FILES not in record.getMessage()


def _drop_abandoned_restore_errors() -> None:
    """After a failed restore, the reads still in flight finish in tensorstore and hand their
    results (often errors too) to Orbax's coroutines and event loop, closed by then. Each prints
    a traceback: as an unraisable exception, or through asyncio's logger when the garbage
    collector finds a task whose error nobody retrieved, which may happen before the restore's
    own error reaches us; hundreds in all. Installed with every Checkpointer, these drop only
    such leftovers of Orbax's; the restore's own error is reported in one line."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_restores", False):
        return

    def hook(unraisable):
        if not _from_abandoned_restore(unraisable):
            previous(unraisable)

    hook.drops_abandoned_restores = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_AbandonedRestoreTasks())


class Checkpointer:
    """Saves and restores (train state, loader state) pairs under `directory`."""

    def __init__(
        self, directory: str, *, keep: int = 3, keep_period: int = 0, async_save: bool = True
    ):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_period or None,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            storage.path(directory), options=options, item_names=("state", "loader")
        )
        _drop_abandoned_restore_errors()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, loader_state: Any) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                loader=ocp.args.JsonSave(_encode_loader_state(loader_state)),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
        """`abstract_state`: jax.ShapeDtypeStructs with shardings, so arrays land in place.
        A damaged step (a truncated or missing file) raises CheckpointError."""
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self._manager.directory}; "
                f"available steps: {self.all_steps() or 'none'}"
            )
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    loader=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # Orbax, tensorstore and json each raise their own types
            raise CheckpointError(f"checkpoint step {step} does not restore ({_reason(e)})") from e
        return restored.state, _decode_loader_state(restored.loader)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, Any] | None:
        """(step, state, loader state) of the newest checkpoint that restores; None if there are
        none. Each newer one that fails is reported in one line and moved aside."""
        failed = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return (step, *self.restore(step, abstract_state))
            except CheckpointError as e:
                failed.append(self._set_aside(step, e))
        if failed:
            raise CheckpointError(
                f"no checkpoint in {self._manager.directory} restores; moved aside: "
                f"{', '.join(failed)}. Restore them from a copy, or start a new --workdir"
            )
        return None

    def _set_aside(self, step: int, error: CheckpointError) -> str:
        """Moves step's directory to corrupt/STEP-TIME, says so in one line; returns the path."""
        directory = epath.Path(self._manager.directory)
        moved = directory / CORRUPT_DIR / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        if jax.process_index() == 0:
            print(
                f"warning: {error}; moved it to {moved} and trying the one before",
                file=sys.stderr,
                flush=True,
            )
            moved.parent.mkdir(parents=True, exist_ok=True)
            (directory / str(step)).rename(moved)
        multihost_utils.sync_global_devices(f"clip_jax.checkpoint: step {step} set aside")
        self._manager.reload()
        return str(moved)

    def reached_preemption(self, step: int) -> bool:
        """Multi-process runs: True at the same step on every process once any of them got
        SIGTERM. jax.distributed's preemption service catches the signal, and the processes
        agree on the step after the furthest one's; so each must call this at every step,
        from the step it starts at. Always False in a single process."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def latest_step(directory: str) -> int | None:
    """The newest complete step in `directory`, read without writing anything (the report of
    a lost process, `peer_loss`, names the step a relaunch resumes from)."""
    options = ocp.CheckpointManagerOptions(read_only=True)
    manager = ocp.CheckpointManager(storage.path(directory), options=options)
    try:
        return manager.latest_step()
    finally:
        manager.close()
