"""Orbax checkpoints that hold everything needed to resume exactly.

Each step directory has two items: `state` (step, parameters, optimizer state, model state; saved
asynchronously from the sharded arrays) and `loader` (the data loader's position, as JSON).
Orbax writes a step into a temporary directory and renames it only when every item and
every host is done, so a save killed half-way is never listed by `latest_step()` and a
resume falls back to the previous complete checkpoint.
"""

from __future__ import annotations

import base64
from typing import Any

import orbax.checkpoint as ocp
from etils import epath


def _encode_loader_state(state: Any) -> dict:
    if isinstance(state, (bytes, bytearray)):
        return {"bytes_b64": base64.b64encode(bytes(state)).decode("ascii")}
    return {"json": state}


def _decode_loader_state(stored: dict) -> Any:
    if "bytes_b64" in stored:
        return base64.b64decode(stored["bytes_b64"])
    return stored["json"]


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
            epath.Path(directory).absolute(), options=options, item_names=("state", "loader")
        )

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
        """`abstract_state`: jax.ShapeDtypeStructs with shardings, so arrays land in place."""
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self._manager.directory}; "
                f"available steps: {self.all_steps() or 'none'}"
            )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                loader=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, _decode_loader_state(restored.loader)

    def reached_preemption(self, step: int) -> bool:
        """True on every host once the cluster signalled preemption (multi-host runs)."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
