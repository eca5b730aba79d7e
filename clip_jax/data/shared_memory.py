"""The arrays that grain worker processes write their batches' images into.

In a worker process a batch's images go straight into a grain `SharedMemoryArray`, which
grain hands to the trainer as it is (an ordinary array would be copied into fresh shared
memory once more). Its pages are reserved up front, so a full /dev/shm is one DataError
line with the sizes and the fixes, not a worker killed by SIGBUS on its first write.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
from collections.abc import Iterator

import numpy as np
from grain.multiprocessing import SharedMemoryArray

from clip_jax.data.errors import DataError

SHARED_MEMORY_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory (a tmpfs)


@contextlib.contextmanager
def image_batch(rows: int, size: int, in_worker: bool) -> Iterator[np.ndarray]:
    """The uint8 [rows, size, size, 3] array a batch's images are written into: shared memory
    in a worker process (an ordinary array there would cost grain a copy of 9.6 MB per 64
    images at 224 px), else an ordinary array."""
    shape = (rows, size, size, 3)
    if not in_worker:
        yield np.empty(shape, np.uint8)
        return
    _check_shared_memory(math.prod(shape))
    out = SharedMemoryArray(shape, np.uint8)
    try:
        _reserve(out)
        yield out
    except BaseException:
        out.unlink_on_del()  # never handed over, so nobody else would remove it
        raise


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:,.0f} KiB"


def _shared_memory_error(nbytes: int, free: int) -> DataError:
    return DataError(
        f"shared memory is full: a data worker process needs {_mib(nbytes)} for a batch's "
        f"images and {SHARED_MEMORY_DIR} has {_mib(free)} free; give it "
        "more (a container: docker run --shm-size=16g), lower data.num_workers or "
        "data.prefetch, or decode in threads (data.num_workers=0, data.num_threads=N)"
    )


def _shared_memory_free() -> int | None:
    """Free bytes in SHARED_MEMORY_DIR; None where there is no such folder (not Linux)."""
    if not os.path.isdir(SHARED_MEMORY_DIR):
        return None
    return shutil.disk_usage(SHARED_MEMORY_DIR).free


def _check_shared_memory(nbytes: int) -> None:
    """Fails with one line, rather than a worker killed by SIGBUS when it first writes to a
    page that a full tmpfs cannot back (Docker's default /dev/shm is 64 MiB)."""
    free = _shared_memory_free()
    if free is not None and nbytes > free:
        raise _shared_memory_error(nbytes, free)


def _reserve(out: SharedMemoryArray) -> None:
    """Allocates the segment's pages now (ENOSPC as an error, not a SIGBUS later); it costs
    no more than the page faults of writing into it."""
    fd = getattr(out.shm, "_fd", -1)  # multiprocessing's SharedMemory keeps its descriptor
    if fd < 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, out.nbytes)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _shared_memory_error(out.nbytes, _shared_memory_free() or 0) from e
        # Any other refusal (a file system without fallocate): the pages come as written.
