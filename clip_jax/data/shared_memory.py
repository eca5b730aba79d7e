"""Reused shared-memory buffers that grain worker processes write their batches' images into.

A worker process keeps a ring of slots, each a file in /dev/shm holding one batch's images
behind a one-byte flag. It writes a batch into a free slot and sends grain only a
`SlotHandle` (a name and a shape). The trainer maps each slot once (`RingReader`) and hands
out views of it; when the last view is gone (the training loop's `device_put` included,
which holds the array while it reads it), a finalizer clears the flag and the worker may
write the slot again. A worker with no free slot makes a new one, so it never waits for the
trainer, and a consumer that keeps its batches only keeps more slots.

Fresh shared memory for every batch, the alternative, costs tmpfs page faults in the worker
and unmapping and freeing in the trainer: 120-170 us per 224-px image against 10-15 for a
slot, up to a quarter of decoding one from a 256-px JPEG (`benchmarks/input_pipeline.py`).
A slot's pages are reserved when it is made, so a full /dev/shm is one DataError line with
the sizes and the fixes, not a worker killed by SIGBUS on its first write.

Clean-up: the trainer unlinks a slot's name as soon as it has mapped it; `RingReader.close`
unlinks the slots it never saw (made while the loader was being closed). Every slot is
registered with multiprocessing's resource tracker until then, and a worker ends itself
when its trainer is gone, so a killed run leaves nothing in /dev/shm either. Slot names
start with `ring_prefix()`: "cj", the trainer's pid and a random tag.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import mmap
import multiprocessing
import os
import secrets
import shutil
import threading
import time
import weakref
from collections.abc import Iterator
from multiprocessing import resource_tracker

import numpy as np

from clip_jax.data.errors import DataError

SHARED_MEMORY_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory (a tmpfs)
_HEADER = mmap.PAGESIZE  # the flag byte's page; the images start page-aligned after it
_FREE, _LENT = 0, 1  # the flag: the worker sets _LENT, the trainer's finalizer _FREE


def ring_available() -> bool:
    """Slots are files in SHARED_MEMORY_DIR (Linux). Elsewhere worker processes return
    ordinary arrays, which grain copies into shared memory itself."""
    return os.path.isdir(SHARED_MEMORY_DIR)


def ring_prefix() -> str:
    """A fresh name prefix for one loader's slots."""
    return f"cj{os.getpid()}_{secrets.token_hex(4)}_"


@dataclasses.dataclass(frozen=True)
class SlotHandle:
    """What a worker sends for a batch's images: the slot's name and the images' shape."""

    name: str
    shape: tuple[int, ...]


# ---------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------


class _SlotImages(np.ndarray):
    """A slot's images as the worker writes them; `sendable` turns them into a handle."""

    handle: SlotHandle


@dataclasses.dataclass
class _Slot:
    name: str
    nbytes: int
    memory: mmap.mmap

    @property
    def free(self) -> bool:
        return self.memory[0] == _FREE

    def images(self, shape: tuple[int, ...]) -> _SlotImages:
        out = np.ndarray.__new__(_SlotImages, shape, np.uint8, self.memory, _HEADER)
        out.handle = SlotHandle(self.name, shape)
        return out


class _WorkerRing:
    """One loader's slots in one worker process (its threads share them)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.slots: list[_Slot] = []
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> _Slot:
        with self.lock:
            slot = next((s for s in self.slots if s.nbytes == nbytes and s.free), None)
            if slot is None:
                slot = _make_slot(f"{self.prefix}{os.getpid()}_{len(self.slots)}", nbytes)
                self.slots.append(slot)
            slot.memory[0] = _LENT
            return slot


_RINGS: dict[str, _WorkerRing] = {}  # this worker process's rings, by prefix
_RINGS_LOCK = threading.Lock()


def _worker_ring(prefix: str) -> _WorkerRing:
    with _RINGS_LOCK:
        if not _RINGS and multiprocessing.parent_process() is not None:
            _watch_trainer()
        return _RINGS.setdefault(prefix, _WorkerRing(prefix))


def _watch_trainer(every_s: float = 1.0) -> None:
    """Ends this worker process once the trainer is gone. grain's workers outlive a trainer
    killed by SIGKILL, blocked on a queue nobody reads, and keep their slots and the
    resource tracker (which removes the slots only when its last user exits) alive."""
    trainer = os.getppid()

    def watch():
        while os.getppid() == trainer:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="clip_jax-trainer-watch", daemon=True).start()


def _make_slot(name: str, nbytes: int) -> _Slot:
    size = _HEADER + nbytes
    _check_free_space(nbytes)
    path = os.path.join(SHARED_MEMORY_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    resource_tracker.register("/" + name, "shared_memory")  # unlinked if the run is killed
    try:
        _reserve(fd, size, nbytes)
        memory = mmap.mmap(fd, size)
    except BaseException:
        _unlink(name)
        raise
    finally:
        os.close(fd)
    return _Slot(name, nbytes, memory)


@contextlib.contextmanager
def image_batch(rows: int, size: int, ring: str) -> Iterator[np.ndarray]:
    """The uint8 [rows, size, size, 3] array a batch's images are written into: a free slot
    of ring `ring` in a worker process (pass it through `sendable`), else ("" for `ring`)
    an ordinary array."""
    shape = (rows, size, size, 3)
    if not ring:
        yield np.empty(shape, np.uint8)
        return
    slot = _worker_ring(ring).take(math.prod(shape))
    try:
        yield slot.images(shape)
    except BaseException:
        slot.memory[0] = _FREE  # never sent
        raise


def sendable(images: np.ndarray) -> np.ndarray | SlotHandle:
    """What the batch carries across to the trainer: a slot's handle, or the array itself."""
    return images.handle if isinstance(images, _SlotImages) else images


# ---------------------------------------------------------------------------------------
# Trainer side
# ---------------------------------------------------------------------------------------


class _LentImages(np.ndarray):
    """Owner of a lent slot's images. The arrays handed out are views of it and numpy ends a
    view's base chain at an array subclass, so it dies only with the last of them."""


class RingReader:
    """The trainer's end of one loader's rings: `receive` replaces a batch's SlotHandle by
    the slot's images, lent until nothing refers to them."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._mapped: dict[str, mmap.mmap] = {}

    def receive(self, batch: dict) -> dict:
        handle = batch.get("image")
        if isinstance(handle, SlotHandle):
            memory = self._mapped.get(handle.name)
            if memory is None:
                memory = self._mapped[handle.name] = _map(handle.name)
            owner = np.ndarray.__new__(_LentImages, handle.shape, np.uint8, memory, _HEADER)
            weakref.finalize(owner, _give_back, memory)
            batch["image"] = owner.view(np.ndarray)
        return batch

    def close(self) -> None:
        """Unlinks the slots never received (the mapped ones were unlinked when mapped);
        lent images stay valid."""
        self._mapped.clear()
        with contextlib.suppress(OSError):
            for name in os.listdir(SHARED_MEMORY_DIR):
                if name.startswith(self.prefix):
                    _unlink(name)


def _map(name: str) -> mmap.mmap:
    """Maps a worker's slot, then unlinks its name: the worker keeps its own mapping, and
    the memory is freed when both are gone."""
    fd = os.open(os.path.join(SHARED_MEMORY_DIR, name), os.O_RDWR)
    try:
        memory = mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    _unlink(name)
    return memory


def _give_back(memory: mmap.mmap) -> None:
    memory[0] = _FREE


def _unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(SHARED_MEMORY_DIR, name))
    resource_tracker.unregister("/" + name, "shared_memory")


# ---------------------------------------------------------------------------------------
# Free space
# ---------------------------------------------------------------------------------------


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:,.0f} KiB"


def _shared_memory_error(nbytes: int, free: int) -> DataError:
    return DataError(
        f"shared memory is full: a data worker process needs {_mib(nbytes)} for a batch's "
        f"images and {SHARED_MEMORY_DIR} has {_mib(free)} free; give it "
        "more (a container: docker run --shm-size=16g), lower data.num_workers or "
        "data.prefetch, or decode in threads (data.num_workers=0, data.num_threads=N)"
    )


def _check_free_space(nbytes: int) -> None:
    """Fails with one line, rather than a worker killed by SIGBUS when it first writes to a
    page that a full tmpfs cannot back (Docker's default /dev/shm is 64 MiB)."""
    free = shutil.disk_usage(SHARED_MEMORY_DIR).free
    if nbytes > free:
        raise _shared_memory_error(nbytes, free)


def _reserve(fd: int, size: int, nbytes: int) -> None:
    """Allocates the slot's pages now: ENOSPC as an error, not a SIGBUS at a later write."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _shared_memory_error(nbytes, shutil.disk_usage(SHARED_MEMORY_DIR).free) from e
        os.ftruncate(fd, size)  # a file system without fallocate: pages come as written
