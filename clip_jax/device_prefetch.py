"""Global batches put on the devices ahead of the step that uses them.

`DevicePrefetch(loader, mesh, depth)` keeps `depth` global batches transferred (or in
flight) beyond the one it hands out, so the host-to-device copy of the next batches runs
while the current step computes. The loader runs `depth` batches ahead of training;
`get_state()` is the loader state after the batches handed out so far (each batch carries
the state taken when it was read), which is what a checkpoint must save for a resume to
continue with exactly the next unused batch.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

from jax.sharding import Mesh

from clip_jax import sharding


class DevicePrefetch:
    """Iterator of global batches (`sharding.to_global` of the loader's host batches).

    loader: an iterator of host batches with `get_state()` (a JSON-able dict with
    `num_replaced`), e.g. `data.pipeline.TrainLoader`. depth: batches kept on the devices
    beyond the one in use (0: each batch is transferred when it is asked for).
    """

    def __init__(self, loader: Any, mesh: Mesh, depth: int):
        if depth < 0:
            raise ValueError(f"device prefetch depth must be >= 0, got {depth}")
        self.loader, self._mesh, self._depth = loader, mesh, depth
        self._ahead: collections.deque[tuple[dict, dict]] = collections.deque()
        self._state = loader.get_state()
        self._exhausted = False

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        while len(self._ahead) <= self._depth and not self._exhausted:
            try:
                host_batch = next(self.loader)
            except StopIteration:
                self._exhausted = True
                break
            # The host-to-device copies are dispatched asynchronously, like a step.
            batch = sharding.to_global(host_batch, self._mesh)
            self._ahead.append((batch, self.loader.get_state()))
        if not self._ahead:
            raise StopIteration
        batch, self._state = self._ahead.popleft()
        return batch

    def get_state(self) -> dict:
        """The loader state after the last batch handed out (not after those read ahead)."""
        return dict(self._state)

    @property
    def num_replaced(self) -> int:
        """Corrupt images substituted in the batches handed out so far (this host)."""
        return int(self._state["num_replaced"])
