"""The training loop end to end on tiny configs (8 simulated CPU devices)."""

import glob
import importlib.util
import json
import os
import shutil
import time

import jax
import numpy as np
import pytest

from clip_jax import config as config_lib
from clip_jax import train as train_lib

EXPERIMENTS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "experiments", "*.py")))


def load_experiment(path, variant=""):
    spec = importlib.util.spec_from_file_location("experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def smoke(path, data_dir, **changes):
    c = load_experiment(path, "smoke")
    c.data.data_dir = data_dir
    c.total_steps = 2
    c.checkpoint.async_save = False
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: os.path.basename(p))
def test_every_experiment_validates_and_its_smoke_variant_trains(path, data_dir, tmp_path):
    config_lib.validate(load_experiment(path), num_devices=None)
    c = smoke(path, data_dir, total_steps=1)
    last = train_lib.train(c, str(tmp_path))
    assert np.isfinite(last["loss"]) and np.isfinite(last["val/loss"])
    assert os.path.exists(tmp_path / "config.json")


def test_resume_is_exact(data_dir, tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "demo.py")
    c = smoke(path, data_dir, total_steps=4)
    c.checkpoint.every_steps = 2
    full = str(tmp_path / "full")
    train_lib.train(c, full)
    uninterrupted = read_metrics(full)
    # Interrupt after step 2: drop the later checkpoint and metrics, then resume.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(full, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    os.remove(os.path.join(resumed, "metrics.jsonl"))
    train_lib.train(c, resumed)
    again = read_metrics(resumed)
    for step in (3, 4):
        np.testing.assert_allclose(again[step]["loss"], uninterrupted[step]["loss"], rtol=1e-6)
        np.testing.assert_allclose(again[step]["param_norm"], uninterrupted[step]["param_norm"],
                                   rtol=1e-6)


def test_fsdp_and_data_parallel_give_the_same_losses(data_dir, tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "demo.py")
    losses = {}
    for name, (d, f) in {"dp": (8, 1), "fsdp": (2, 4)}.items():
        c = smoke(path, data_dir, total_steps=3, **{"mesh.data": d, "mesh.fsdp": f})
        train_lib.train(c, str(tmp_path / name))
        losses[name] = [read_metrics(str(tmp_path / name))[s]["loss"] for s in (1, 2, 3)]
    np.testing.assert_allclose(losses["fsdp"], losses["dp"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key,value,message", [
    ("optim.lrr", 1e-3, "did you mean 'optim.lr'"),
    ("batch_size", 12, "not divisible by the 8 devices"),
    ("mesh.data", 3, "does not match the 8 devices"),
    ("data.name", "no_such_dataset", "no_such_dataset"),
])
def test_bad_config_fails_fast_with_the_fix(key, value, message, data_dir, tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "demo.py")
    c = smoke(path, data_dir)
    node, *rest = key.split(".")
    if rest:
        c[node][rest[0]] = value
    else:
        c[node] = value
    start = time.time()
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train_lib.train(c, str(tmp_path))
    assert time.time() - start < 5
