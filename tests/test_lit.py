"""LiT: a locked tower (no gradient, no optimizer state) and warm starts from a pretrained
directory (`model.init_from`, `model.init_towers`), on 8 simulated CPU devices."""

import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import load_experiment

from clip_jax import config as config_lib
from clip_jax import evaluate, losses, optim, pretrained, sharding
from clip_jax import step as step_lib
from clip_jax import train as train_lib
from clip_jax.checkpoint import Checkpointer
from clip_jax.data.bpe import ClipBPETokenizer
from clip_jax.data.tokenizer import Tokenizer, demo_tokenizer_path
from clip_jax.models import CLIP, create_model
from clip_jax.models.registry import get_config

ROOT = os.path.join(os.path.dirname(__file__), "..")
LIT = os.path.join(ROOT, "experiments", "lit_b32.py")
VOCAB, CONTEXT, PER_DEVICE = 64, 8, 8


def save_pretrained(path, name, seed, tokenizer=None, **overrides) -> str:
    """A pretrained directory with random weights of the named model (`name` 'custom' in
    config.json when `overrides` change it, as the converter writes for unknown shapes)."""
    config = get_config(name, **overrides)
    v, t = config.vision, config.text
    variables = CLIP(config).init(
        jax.random.key(seed),
        jnp.zeros((1, v.image_size, v.image_size, 3), jnp.uint8),
        jnp.zeros((1, t.context_length), jnp.int32),
    )
    return pretrained.save(
        str(path),
        config,
        dict(nn.meta.unbox(variables)),
        name="custom" if overrides else name,
        tokenizer=tokenizer,
        source={"format": "test"},
    )


def _model(name):
    return create_model(
        name, text=dict(vocab_size=VOCAB, context_length=CONTEXT, eot_token_id=VOCAB - 1)
    )


def _batches(model, mesh, count):
    rng = np.random.default_rng(0)
    size, image = PER_DEVICE * mesh.devices.size, model.config.vision.image_size
    out = []
    for _ in range(count):
        text = rng.integers(1, VOCAB - 1, (size, CONTEXT), np.int32)
        text[np.arange(size), rng.integers(2, CONTEXT, size)] = VOCAB - 1  # EOT somewhere
        batch = {"image": rng.integers(0, 256, (size, image, image, 3), np.uint8), "text": text}
        out.append(jax.device_put(batch, sharding.batch_sharding(mesh)))
    return out


def _step(model, mesh, freeze):
    """(abstract state, compiled-to-be train step) with FSDP shardings over 2 x 4 devices."""
    cfg = config_lib.defaults().optim
    cfg.lr, cfg.warmup_steps, cfg.freeze = 1e-3, 1, freeze
    tx = optim.make_optimizer(cfg, total_steps=10)
    abstract = step_lib.abstract_train_state(model, tx, mesh)
    train_step = step_lib.make_train_step(
        model,
        tx,
        losses.make_loss("softmax", mesh),
        optim.schedule(cfg, 10),
        step_lib.state_shardings(abstract),
        mesh,
        0,
        freeze,
    )
    return tx, abstract, train_step


def test_a_locked_tower_is_bitwise_unchanged_and_has_no_optimizer_state():
    # tiny-rn: the locked image tower also has (frozen) BatchNorm statistics.
    model, mesh = _model("tiny-rn"), sharding.make_mesh(data=-1, fsdp=4)
    tx, abstract, train_step = _step(model, mesh, "image")
    state = step_lib.create_train_state(model, tx, abstract, seed=0)
    initial = jax.device_get((state.params, state.model_state))
    for batch in _batches(model, mesh, 5):
        state, metrics = train_step(state, batch)
        assert float(metrics["finite"]) == 1.0
    params, model_state = jax.device_get((state.params, state.model_state))
    chex.assert_trees_all_equal(params["visual"], initial[0]["visual"])
    chex.assert_trees_all_equal(model_state, initial[1])
    # The text tower did train.
    moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), params["text"], initial[0]["text"])
    assert min(jax.tree.leaves(moved)) > 0

    # No moment of the image tower anywhere in the optimizer state: AdamW's two moments
    # cover exactly the trained parameters (the text tower and the logit scale).
    opt_leaves = jax.tree_util.tree_leaves_with_path(state.opt_state)
    assert not [jax.tree_util.keystr(p) for p, _ in opt_leaves if "visual" in str(p)]
    trained = {k: v for k, v in params.items() if k != "visual"}
    moments = sum(x.size for p, x in opt_leaves if "count" not in jax.tree_util.keystr(p))
    assert moments == 2 * sum(x.size for x in jax.tree.leaves(trained))
    assert sum(x.size for x in jax.tree.leaves(params["visual"])) > 1000


def test_a_locked_tower_step_needs_less_compiled_memory():
    model, mesh = _model("tiny-vit"), sharding.make_mesh(data=-1, fsdp=2)
    (batch,) = _batches(model, mesh, 1)
    temp = {}
    for freeze in ("", "image"):
        _, abstract, train_step = _step(model, mesh, freeze)
        compiled = train_step.lower(abstract, batch).compile()
        temp[freeze or "both"] = compiled.memory_analysis().temp_size_in_bytes
    print(
        f"\ncompiled temp memory per device, tiny-vit, {PER_DEVICE} rows per device: "
        f"both towers training {temp['both']:,} B, image tower locked {temp['image']:,} B"
    )
    assert temp["image"] < 0.8 * temp["both"]


def _lit_config(data_dir, init_from, **changes):
    c = load_experiment(LIT, "smoke")
    c.data.data_dir = data_dir
    c.total_steps = 2
    c.checkpoint.async_save = False
    c.model.init_from = init_from
    for key, value in changes.items():
        group, leaf = key.split(".")
        c[group][leaf] = value
    return c


def test_init_from_loads_exactly_the_pretrained_image_tower(demo_data_dir, tmp_path):
    source = save_pretrained(tmp_path / "pretrained", "tiny-rn", seed=7)
    c = _lit_config(demo_data_dir, source, **{"model.name": "tiny-rn"})
    workdir = str(tmp_path / "run")
    train_lib.train(c, workdir)

    run = train_lib.setup(c, workdir)
    abstract = step_lib.abstract_train_state(run.model, run.tx, run.mesh, c.mesh.rules)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        state, _ = ckpt.restore(2, abstract)
    finally:
        ckpt.close()
    expected = pretrained.load(source).variables
    # The locked image tower after 2 steps is the pretrained one, bit for bit, statistics too.
    chex.assert_trees_all_equal(
        jax.device_get(state.params["visual"]), jax.device_get(expected["params"]["visual"])
    )
    chex.assert_trees_all_equal(
        jax.device_get(state.model_state), jax.device_get({"batch_stats": expected["batch_stats"]})
    )

    # A training workdir is a source too: a new run takes every tensor of its last step.
    again = _lit_config(demo_data_dir, workdir, **{"model.name": "tiny-rn"})
    again.model.init_towers = "both"
    follow = train_lib.setup(again, str(tmp_path / "follow"))
    fresh = step_lib.create_train_state(follow.model, follow.tx, abstract, again.seed)
    params, model_state = follow.init_from.apply(fresh.params, fresh.model_state)
    chex.assert_trees_all_equal(
        jax.device_get((params, model_state)), jax.device_get((state.params, state.model_state))
    )


def test_init_towers_both_copies_every_tensor_and_image_keeps_the_rest(demo_data_dir, tmp_path):
    # The text tower of a pretrained model with the demo tokenizer's vocabulary.
    probe = train_lib.setup(_lit_config(demo_data_dir, ""), str(tmp_path / "probe"))
    text = {
        "vocab_size": probe.tokenizer.vocab_size,
        "eot_token_id": probe.tokenizer.eot_id,
        "context_length": 16,
    }
    source = save_pretrained(tmp_path / "pretrained", "tiny-vit", seed=3, text=text)
    expected = jax.device_get(pretrained.load(source).variables["params"])
    for towers in ("both", "image"):
        c = _lit_config(demo_data_dir, source, **{"model.init_towers": towers})
        run = train_lib.setup(c, str(tmp_path / towers))
        abstract = step_lib.abstract_train_state(run.model, run.tx, run.mesh, c.mesh.rules)
        state = step_lib.create_train_state(run.model, run.tx, abstract, c.seed)
        random = jax.device_get(state.params)
        params, _ = run.init_from.apply(state.params, state.model_state)
        params = jax.device_get(params)
        if towers == "both":
            chex.assert_trees_all_equal(params, expected)
        else:
            chex.assert_trees_all_equal(params["visual"], expected["visual"])
            chex.assert_trees_all_equal(params["text"], random["text"])
            chex.assert_trees_all_equal(params["log_scale"], random["log_scale"])


def test_a_different_model_is_a_config_error_before_compiling(demo_data_dir, tmp_path):
    source = save_pretrained(tmp_path / "rn", "tiny-rn", seed=0)
    with pytest.raises(config_lib.ConfigError, match="holds a 'tiny-rn' model"):
        train_lib.setup(_lit_config(demo_data_dir, source), str(tmp_path / "run"))
    gelu = save_pretrained(tmp_path / "gelu", "tiny-vit", seed=0, activation="gelu")
    with pytest.raises(config_lib.ConfigError, match="model.activation='gelu'"):
        train_lib.setup(_lit_config(demo_data_dir, gelu), str(tmp_path / "run"))


def _train_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "clip_jax.train", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


def test_a_shape_mismatch_is_a_one_line_error(demo_data_dir, tmp_path):
    wide = save_pretrained(tmp_path / "wide", "tiny-vit", seed=0, vision={"width": 32, "heads": 2})
    res = _train_cli(
        f"--config={LIT}:smoke",
        f"--config.model.init_from={wide}",
        f"--config.data.data_dir={demo_data_dir}",
        f"--workdir={tmp_path / 'run'}",
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, res.stderr
    assert "visual/" in lines[0] and "(32" in lines[0] and "(64" in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_lit_smoke_runs_with_a_pretrained_image_tower(demo_data_dir, tmp_path):
    source = save_pretrained(tmp_path / "pretrained", "tiny-vit", seed=1)
    res = _train_cli(
        f"--config={LIT}:smoke",
        f"--config.model.init_from={source}",
        f"--config.data.data_dir={demo_data_dir}",
        "--config.total_steps=2",
        f"--workdir={tmp_path / 'run'}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"initialised image from {source}" in res.stdout
    assert "step 2/2" in res.stdout


def test_evaluate_takes_a_pretrained_directory(demo_data_dir, tmp_path, monkeypatch):
    """`evaluate --workdir=DIR` of a converted model: step 0, the tokenizer DIR names."""
    spec = {
        "kind": "sentencepiece",
        "path": demo_tokenizer_path(demo_data_dir),
        "context_length": 16,
    }
    tokenizer = pretrained.make_tokenizer(spec)
    text = {"vocab_size": tokenizer.vocab_size, "eot_token_id": tokenizer.eot_id}
    source = save_pretrained(tmp_path / "pretrained", "tiny-vit", seed=0, tokenizer=spec, text=text)
    monkeypatch.setenv("TFDS_DATA_DIR", demo_data_dir)
    (result,) = evaluate.evaluate_checkpoint(None, source, tasks="zeroshot:clip_demo")
    assert result["num_examples"] == 40  # the demo's test split in conftest
    assert 0 <= result["metrics"]["top1"] <= 1
    assert os.path.isfile(os.path.join(source, "eval", "0", "zeroshot_clip_demo.json"))


def test_a_copied_text_tower_brings_its_tokenizer(demo_data_dir, tmp_path):
    text = {"vocab_size": 49408, "eot_token_id": 49407, "context_length": 16}
    spec = {"kind": "clip_bpe", "context_length": 16}
    source = save_pretrained(tmp_path / "p", "tiny-vit", seed=0, tokenizer=spec, text=text)
    both = train_lib.setup(
        _lit_config(demo_data_dir, source, **{"model.init_towers": "both"}), str(tmp_path / "a")
    )
    assert isinstance(both.tokenizer, ClipBPETokenizer)
    assert both.model.config.text.vocab_size == 49408
    # The image tower alone: the config's tokenizer (the demo's sentencepiece model).
    image = train_lib.setup(_lit_config(demo_data_dir, source), str(tmp_path / "b"))
    assert isinstance(image.tokenizer, Tokenizer) and image.tokenizer.vocab_size == 512
    # tokenizer.kind reaches the loader.
    c = _lit_config(demo_data_dir, "", **{"tokenizer.kind": "clip_bpe"})
    assert isinstance(train_lib.setup(c, str(tmp_path / "c")).tokenizer, ClipBPETokenizer)
