"""The training loop end to end on tiny configs (8 simulated CPU devices)."""

import glob
import importlib.util
import json
import os
import shutil
import time

import chex
import jax
import numpy as np
import pytest

from clip_jax import config as config_lib
from clip_jax import losses as losses_lib
from clip_jax import optim, sharding
from clip_jax import step as step_lib
from clip_jax import train as train_lib
from clip_jax.data import pipeline

EXPERIMENTS = sorted(
    glob.glob(os.path.join(os.path.dirname(__file__), "..", "experiments", "*.py"))
)
DEMO = os.path.join(os.path.dirname(__file__), "..", "experiments", "demo.py")


def load_experiment(path, variant=""):
    spec = importlib.util.spec_from_file_location("experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.fixture
def data_dir(demo_data_dir):
    return demo_data_dir


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


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: os.path.basename(p))
def test_config_json_round_trips(path):
    """`config.json` is what `python -m clip_jax.evaluate` reads back from a workdir."""
    c = load_experiment(path)
    assert config_lib.from_dict(json.loads(config_lib.to_json(c))).to_dict() == c.to_dict()


def test_resume_is_exact(data_dir, tmp_path):
    c = smoke(DEMO, data_dir, total_steps=4)
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

    def tracked(rows):
        return {s: (rows[s]["loss"], rows[s]["param_norm"]) for s in (3, 4)}

    chex.assert_trees_all_close(tracked(again), tracked(uninterrupted), rtol=1e-6)


def test_fsdp_and_data_parallel_give_the_same_losses(data_dir, tmp_path):
    losses = {}
    for rules, (d, f) in {"dp": (8, 1), "fsdp": (2, 4)}.items():
        c = smoke(
            DEMO, data_dir, total_steps=5, **{"mesh.data": d, "mesh.fsdp": f, "mesh.rules": rules}
        )
        train_lib.train(c, str(tmp_path / rules))
        losses[rules] = [read_metrics(str(tmp_path / rules))[s]["loss"] for s in range(1, 6)]
    chex.assert_trees_all_close(losses["fsdp"], losses["dp"], rtol=1e-5, atol=1e-5)


def test_dp_rules_replicate_every_parameter_and_moment(data_dir, tmp_path):
    c = smoke(DEMO, data_dir, **{"mesh.data": 2, "mesh.fsdp": 4, "mesh.rules": "dp"})
    run = train_lib.setup(c, str(tmp_path))
    abstract = step_lib.abstract_train_state(run.model, run.tx, run.mesh, c.mesh.rules)
    leaves = jax.tree.leaves(abstract)
    assert len(leaves) >= 60
    assert all(x.sharding.is_fully_replicated for x in leaves)
    # The same mesh under the default rules does split them (the test below checks how).
    fsdp = step_lib.abstract_train_state(run.model, run.tx, run.mesh, "fsdp")
    assert not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(fsdp))


def test_fsdp_gives_each_device_a_quarter_of_every_large_parameter_and_moment(data_dir, tmp_path):
    c = smoke(DEMO, data_dir, **{"mesh.data": 2, "mesh.fsdp": 4})
    assert c.mesh.rules == "fsdp"
    run = train_lib.setup(c, str(tmp_path))
    abstract = step_lib.abstract_train_state(run.model, run.tx, run.mesh, c.mesh.rules)
    state = step_lib.create_train_state(run.model, run.tx, abstract, c.seed)

    def large(tree):
        return [
            (jax.tree_util.keystr(p), x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)
            if x.size >= 1024
        ]

    params, moments = large(state.params), large(state.opt_state)
    # AdamW keeps two moments per parameter; a frozen tower would keep none.
    assert len(params) >= 20 and len(moments) == 2 * len(params)
    for name, x in params + moments:
        shards = x.addressable_shards
        assert len(shards) == 8
        assert all(s.data.size * 4 == x.size for s in shards), (name, x.shape, x.sharding.spec)
        # The 2-way data axis holds copies: 4 distinct pieces, each on 2 devices.
        assert len({str(s.index) for s in shards}) == 4, name


def test_a_tiny_model_overfits_256_pairs(data_dir, tmp_path):
    c = smoke(DEMO, data_dir, batch_size=256, total_steps=150)
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 3e-3, 10, 0.0
    run = train_lib.setup(c, str(tmp_path))
    model, mesh, tokenizer, tx = run.model, run.mesh, run.tokenizer, run.tx
    size = model.config.vision.image_size
    # 256 pairs with distinct captions, so that in-batch retrieval has one right answer.
    images, texts, seen = [], [], set()
    for batch in pipeline.eval_loader(
        "clip_demo", "train", data_dir, batch_size=64, image_size=size, tokenizer=tokenizer
    ):
        for image, text, ok in zip(batch["image"], batch["text"], batch["mask"]):
            if ok and text.tobytes() not in seen and len(texts) < 256:
                seen.add(text.tobytes())
                images.append(image)
                texts.append(text)
    assert len(texts) == 256
    batch = sharding.to_global({"image": np.stack(images), "text": np.stack(texts)}, mesh)

    loss_fn = losses_lib.make_loss(c.loss.kind, mesh, c.loss.impl)
    abstract = step_lib.abstract_train_state(model, tx, mesh, c.mesh.rules)
    shardings = step_lib.state_shardings(abstract)
    state = step_lib.create_train_state(model, tx, abstract, c.seed)
    train_step = step_lib.make_train_step(
        model, tx, loss_fn, optim.schedule(c.optim, c.total_steps), shardings, mesh
    )
    eval_step = step_lib.make_eval_step(model, loss_fn, shardings, mesh)
    before = jax.device_get(eval_step(state.params, state.model_state, batch))
    for _ in range(c.total_steps):
        # One step in flight at a time, as in the training loop: hundreds of queued steps
        # of collectives over simulated devices can starve XLA's CPU rendezvous into an abort.
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
    after = jax.device_get(eval_step(state.params, state.model_state, batch))
    assert before["i2t_acc"] < 0.1 and before["t2i_acc"] < 0.1
    assert after["i2t_acc"] > 0.95 and after["t2i_acc"] > 0.95, after


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("optim.lrr", 1e-3, "did you mean 'optim.lr'"),
        ("batch_size", 12, "not divisible by the 8 devices"),
        ("mesh.data", 3, "does not match the 8 devices"),
        ("data.name", "no_such_dataset", "no_such_dataset"),
    ],
)
def test_bad_config_fails_fast_with_the_fix(key, value, message, data_dir, tmp_path):
    c = smoke(DEMO, data_dir)
    node, *rest = key.split(".")
    if rest:
        c[node][rest[0]] = value
    else:
        c[node] = value
    start = time.time()
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train_lib.train(c, str(tmp_path))
    assert time.time() - start < 5


def test_streamed_micro_batches_train_as_the_whole_batch_does_and_resume_exactly(
    data_dir, tmp_path
):
    """stream_micro_batches feeds the same global batches one micro-batch at a time: the
    run matches the gradient-cached run that holds each whole batch on the devices (up to
    the order of float sums), its two ways to feed the second pass train bitwise alike, and
    its resume between steps is exact."""
    losses = {}
    for stream, second_pass in ((False, "reread"), (True, "keep"), (True, "reread")):
        c = smoke(DEMO, data_dir, total_steps=4, micro_batch_size=1)
        c.stream_micro_batches, c.stream_second_pass = stream, second_pass
        c.checkpoint.every_steps = 2
        workdir = str(tmp_path / f"stream_{stream}")
        train_lib.train(c, workdir)
        if second_pass == "keep":  # the kept host copies are the pixels a re-read decodes
            kept = read_metrics(workdir)
            shutil.rmtree(workdir)
        else:
            losses[stream] = read_metrics(workdir)
    assert {s: kept[s]["loss"] for s in kept} == {s: losses[True][s]["loss"] for s in kept}
    tracked = {
        s: {k: [losses[stream][s][k] for stream in (False, True)] for k in ("loss", "param_norm")}
        for s in range(1, 5)
    }
    for s, values in tracked.items():
        for key, (whole, streamed) in values.items():
            np.testing.assert_allclose(streamed, whole, rtol=1e-5, err_msg=f"step {s} {key}")
    # Interrupt the streamed run after step 2 and resume: steps 3 and 4 are bitwise the same.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(str(tmp_path / "stream_True"), resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    os.remove(os.path.join(resumed, "metrics.jsonl"))
    train_lib.train(c, resumed)
    again = read_metrics(resumed)
    for s in (3, 4):
        assert again[s]["loss"] == losses[True][s]["loss"]
        assert again[s]["param_norm"] == losses[True][s]["param_norm"]
