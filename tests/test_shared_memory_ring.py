"""Worker processes' reused shared-memory batch buffers (`clip_jax.data.shared_memory`):
a slot is written again only once nothing refers to its images, whoever holds them (a
batch kept by the caller, a jax array made from it); and no run, however it stops, leaves
a slot behind in /dev/shm or a resource-tracker warning."""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import pytest
import tensorflow_datasets as tfds

from clip_jax.data.pipeline import train_loader
from clip_jax.data.prepare import prepare_demo
from clip_jax.data.shared_memory import SHARED_MEMORY_DIR
from clip_jax.data.tokenizer import demo_tokenizer

tfds.disable_progress_bar()
pytestmark = pytest.mark.skipif(
    not os.path.isdir(SHARED_MEMORY_DIR), reason="the ring lives in /dev/shm (Linux)"
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("demo_tfds"))
    prepare_demo(d, num_train=96, num_validation=8, num_test=8, verbose=False)
    return d


def _loader(d, **kw):
    args = dict(global_batch_size=16, image_size=32, seed=3, shard_index=0, shard_count=1)
    args.update(kw)
    return train_loader("clip_demo", "train", d, tokenizer=demo_tokenizer(d, 24), **args)


def test_held_batches_are_never_overwritten_while_the_worker_runs_ahead(demo):
    """Of 12 batches from one worker process, every third is kept as it came, every third
    only as a jax array made from it, the rest dropped (their slots are then written
    again). All kept ones must still equal the batches built in the calling thread."""
    want = [next(it) for it in [_loader(demo, prefetch=0, num_threads=0)] for _ in range(12)]
    loader = _loader(demo, num_workers=1, prefetch=3)
    kept = {}
    for k in range(12):
        batch = next(loader)
        if k % 3 == 0:
            kept[k] = batch
        elif k % 3 == 1:
            kept[k] = {key: jax.device_put(v) for key, v in batch.items()}
        del batch
        gc.collect()
    loader.close()
    for k, batch in kept.items():
        chex.assert_trees_all_equal(jax.device_get(batch), want[k], custom_message=f"batch {k}")


def _leftovers(pid: int) -> list[str]:
    return [n for n in os.listdir(SHARED_MEMORY_DIR) if n.startswith(f"cj{pid}_")]


SCRIPT = """
import sys, time
from clip_jax.data.pipeline import train_loader
from clip_jax.data.tokenizer import demo_tokenizer

d, how = sys.argv[1], sys.argv[2]
if __name__ == "__main__":
    loader = train_loader(
        "clip_demo", "train", d, global_batch_size=16, image_size=32, seed=3,
        tokenizer=demo_tokenizer(d, 24), num_workers=2, prefetch=2, shard_index=0,
        shard_count=1,
    )
    batch = next(loader)
    time.sleep(1)  # the workers fill their buffers: slots in flight when the run stops
    if how == "close":
        loader.close()
    print("got", batch["image"].shape, flush=True)
    if how == "killed":
        time.sleep(600)
"""


@pytest.mark.parametrize("how", ["close", "exit"])
def test_a_loader_stopped_mid_stream_leaves_nothing_in_shared_memory(demo, tmp_path, how):
    """Closed with batches in flight, or left to the interpreter's exit: exit 0, no
    traceback, no resource-tracker warning, and no slot of this run left in /dev/shm."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.Popen(
        [sys.executable, str(script), demo, how],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "got (16, 32, 32, 3)" in out
    assert "Traceback" not in err and "leaked" not in err, err[-3000:]
    assert _leftovers(proc.pid) == []


def test_a_killed_run_leaves_nothing_in_shared_memory(demo, tmp_path):
    """SIGKILL gives the program no chance to clean up: multiprocessing's resource tracker,
    with which every slot is registered, removes them."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.Popen(
        [sys.executable, str(script), demo, "killed"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().startswith("got")
        assert _wait_for(lambda: _leftovers(proc.pid)), "no slot in flight to be left behind"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert _wait_for(lambda: not _leftovers(proc.pid)), _leftovers(proc.pid)


def _wait_for(condition, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)
    return bool(condition())
