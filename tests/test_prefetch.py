"""Device prefetch: the batches and the loader state a checkpoint saves are those of a loader
read without prefetching, though the loader has read ahead; and the input-bound warning."""

import time

import chex
import jax
import numpy as np
import pytest

from clip_jax import config as config_lib
from clip_jax import sharding
from clip_jax import train as train_lib
from clip_jax.data import pipeline
from clip_jax.data.tokenizer import load_tokenizer
from clip_jax.device_prefetch import DevicePrefetch

BATCH = 16


@pytest.fixture(scope="module")
def make_loader(demo_data_dir):
    tokenizer = load_tokenizer("", dataset="clip_demo", data_dir=demo_data_dir, context_length=16)

    def make():
        return pipeline.train_loader(
            "clip_demo",
            "train",
            demo_data_dir,
            global_batch_size=BATCH,
            image_size=32,
            tokenizer=tokenizer,
            seed=3,
        )

    return make


@pytest.mark.parametrize("depth", [0, 2])
def test_batches_and_saved_state_are_those_of_the_batches_used(make_loader, depth):
    mesh = sharding.make_mesh()
    reference = make_loader()
    expected = [next(reference) for _ in range(4)]

    loader = make_loader()
    feed = DevicePrefetch(loader, mesh, depth)
    for k in range(3):
        batch = next(feed)
        assert batch["image"].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 4)
        chex.assert_trees_all_equal(jax.device_get(batch), expected[k])
    assert loader.next_batch == 3 + depth  # read ahead ...
    assert feed.get_state()["next_batch"] == 3  # ... but a checkpoint resumes at batch 3

    resumed = make_loader()
    resumed.set_state(feed.get_state())
    chex.assert_trees_all_equal(next(resumed), expected[3])


class _Batches:
    """A finite loader of numbered batches."""

    def __init__(self, count):
        self.count, self.next_batch = count, 0

    def __next__(self):
        if self.next_batch == self.count:
            raise StopIteration
        self.next_batch += 1
        return {"x": np.full((8, 2), self.next_batch, np.int32)}

    def get_state(self):
        return {"next_batch": self.next_batch, "num_replaced": 0}


def test_a_finite_loader_is_used_to_its_end_in_order():
    feed = DevicePrefetch(_Batches(5), sharding.make_mesh(), depth=2)
    assert [int(b["x"][0, 0]) for b in feed] == [1, 2, 3, 4, 5]
    assert feed.get_state()["next_batch"] == 5


def test_input_bound_warning_once_after_the_first_window_naming_the_keys():
    """Real waits: a window that sleeps while "waiting for data" is input-bound; the first
    window (start-up, compilation) never warns, and the warning comes once."""
    config = config_lib.defaults()
    window = train_lib._LogWindow(8, 1, 1e9, None)
    warnings = []
    for wait in (True, False, True, True):
        with window.waiting_for_data():
            time.sleep(0.02 if wait else 0)
        time.sleep(0 if wait else 0.02)
        window.steps += 1
        rates = window.end()
        assert 0 <= rates["data_wait"] <= 1
        assert (rates["data_wait"] > 0.5) == wait
        warnings.append(window.input_bound_warning(rates["data_wait"], config))
    assert warnings[:2] == ["", ""] and warnings[3] == ""
    assert warnings[2].startswith("warning: the training loop waited for input")
    for key in ("data.num_workers (now 0)", "data.num_threads (now 1)", "data.prefetch (now 2)"):
        assert key in warnings[2]
    assert "\n" not in warnings[2] and "stream_second_pass" not in warnings[2]
    # A streamed step that decodes every image twice also hears of the other way.
    config.stream_micro_batches, config.micro_batch_size = True, 1
    window.warned = False
    assert "stream_second_pass=keep" in window.input_bound_warning(0.5, config)
