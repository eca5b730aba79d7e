"""Evaluators end to end on a fake data source and fake encoders (8 simulated devices).

The fake data source follows the data contract (padded batches with mask/index/label, process
shards) and reaches the evaluators through ``EvalContext(data=...)``; the fake encoders embed
an image as its pixel vector and a prompt as its class centre plus a per-template offset, so
every expected number is computed here in numpy.
"""

import json
import os
import shutil
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from test_train import DEMO, smoke

from clip_jax import config as config_lib
from clip_jax import train as train_lib
from clip_jax.checkpoint import Checkpointer
from clip_jax.data import info, pipeline
from clip_jax.data.tokenizer import demo_tokenizer
from clip_jax.eval import classnames as CN
from clip_jax.eval import metrics as M
from clip_jax.eval.evaluators import build_evaluators
from clip_jax.eval.features import DataSource, Encoders, EvalContext
from clip_jax.eval.results import flat_metrics, format_table
from clip_jax.eval.runner import evaluate
from clip_jax.eval.schema import config_schema
from clip_jax.evaluate import EvaluationError, checkpoint_step, evaluate_checkpoint
from clip_jax.models import create_model
from clip_jax.models.clip import l2_normalize

D = 12


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class FakeData:
    """Datasets: name -> {split: (pixels uint8 [N, 1, 1, D], labels or None, captions or None)}."""

    def __init__(self, datasets, info_names):
        self.datasets, self.info_names = datasets, info_names

    def source(self) -> DataSource:
        return DataSource(self.eval_loader, self.read_captions, self.dataset_info)

    def eval_loader(
        self,
        name,
        split,
        data_dir,
        *,
        batch_size,
        image_size,
        tokenizer=None,
        shard_index=None,
        shard_count=None,
    ):
        """batch_size is global; host h of S holds examples (k*b + j)*S + h (as the real loader)."""
        pixels, labels, _ = self.datasets[name][split]
        shard_index, shard_count = shard_index or 0, shard_count or 1
        host_b = batch_size // shard_count
        rows = np.arange(shard_index, len(pixels), shard_count)
        n_batches = -(-len(pixels) // batch_size)
        for b in range(n_batches):
            idx = rows[b * host_b : (b + 1) * host_b]
            pad = host_b - len(idx)
            batch = {
                "image": np.concatenate(
                    [pixels[idx], np.zeros((pad,) + pixels.shape[1:], np.uint8)]
                ),
                "mask": np.r_[np.ones(len(idx), bool), np.zeros(pad, bool)],
                "index": np.r_[idx, np.full(pad, -1)].astype(np.int64),
            }
            if labels is not None:
                batch["label"] = np.r_[labels[idx], np.full(pad, -1)].astype(np.int32)
            yield batch

    def read_captions(self, name, split, data_dir):
        return self.datasets[name][split][2]

    def dataset_info(self, name, data_dir):
        labelled = any(v[1] is not None for v in self.datasets[name].values())
        return {
            "num_examples": {s: len(v[0]) for s, v in self.datasets[name].items()},
            "class_names": self.info_names.get(name),
            "features": ["image", "label"] if labelled else ["image", "caption"],
        }


class FakeTokenizer:
    """Maps each distinct string to a token id; the text encoder looks the id up."""

    def __init__(self):
        self.vocab = {}

    def encode(self, texts):
        ids = [self.vocab.setdefault(t, len(self.vocab) + 1) for t in texts]
        return np.array([[i, 0, 0] for i in ids], np.int32)


def _pixels(x):
    """Features in [-1, 1] as uint8 'images' [N, 1, 1, D] (the fake image encoder inverts it)."""
    return np.clip(np.round(x * 60 + 128), 0, 255).astype(np.uint8)[:, None, None, :]


def _image_features(pixels):
    return _unit(pixels.reshape(len(pixels), -1).astype(np.float64) - 128)


@pytest.fixture
def mesh():
    return Mesh(np.array(jax.devices()).reshape(8, 1, 1), ("data", "fsdp", "model"))


def _encoders(mesh, tokenizer, text_table):
    rep = NamedSharding(mesh, P())

    @jax.jit
    def encode_image(images):
        x = images.reshape(images.shape[0], -1).astype(jnp.float32) - 128
        return jax.lax.with_sharding_constraint(l2_normalize(x), rep)

    def encode_text(tokens):
        table = jnp.asarray(text_table(tokenizer))
        return jax.lax.with_sharding_constraint(l2_normalize(table[tokens[:, 0]]), rep)

    return Encoders(encode_image, jax.jit(encode_text), mesh, batch_size=16)


def _classification_world(seed=0, c=5, n_test=45, n_train=60, label_space=None):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, D))

    def draw(n):
        y = rng.integers(0, c, size=n)
        return _pixels(0.35 * _unit(centers[y] + rng.normal(size=(n, D)) * 0.9)), y

    test_px, test_y = draw(n_test)
    train_px, train_y = draw(n_train)
    return centers, (train_px, train_y), (test_px, test_y)


def _text_table_for(names, templates, centers, offsets):
    """Embedding of prompt (class i, template t) = centre_i + offset_t."""

    def table(tok):
        rows = np.zeros((len(tok.vocab) + 1, D), np.float32)
        for ci, name in enumerate(names):
            for ti, t in enumerate(templates):
                prompt = t.replace("{}", name)
                if prompt in tok.vocab:
                    rows[tok.vocab[prompt]] = centers[ci] + offsets[ti]
        return rows

    return table


def _config(**eval_overrides):
    cfg = config_schema()
    cfg.update(eval_overrides)
    return cfg


def test_zeroshot_evaluator_matches_numpy_and_writes_json(mesh, tmp_path):
    names = ["red_circle", "blue_square", "green_star", "pink_ring", "cyan_cross"]
    centers, _, (px, y) = _classification_world(0)
    data = FakeData({"toy": {"test": (px, y, None)}}, {"toy": names})
    templates = ["a photo of a {}.", "a drawing of a {}.", "art of the {}."]
    offsets = np.random.default_rng(9).normal(size=(3, D)) * 0.7
    tok = FakeTokenizer()
    prompt_names = [n.replace("_", " ") for n in names]
    enc = _encoders(mesh, tok, _text_table_for(prompt_names, templates, centers, offsets))
    tfile = tmp_path / "templates.txt"
    tfile.write_text("\n".join(templates))
    cfg = _config(tasks="zeroshot:toy")
    cfg.zeroshot.templates = str(tfile)
    ctx = EvalContext(enc, tok, mesh, "unused", 1, data=data.source())
    [result] = evaluate(build_evaluators(cfg), ctx, step=7, workdir=str(tmp_path))

    # Independent computation: numpy ensembling and accuracy.
    w = np.stack(
        [_unit(np.mean([_unit(centers[c] + offsets[t]) for t in range(3)], 0)) for c in range(5)]
    )
    logits = _image_features(px) @ w.T
    assert result["metrics"]["top1"] == pytest.approx(np.mean(logits.argmax(1) == y))
    recalls = [np.mean(logits[y == c].argmax(1) == c) for c in range(5) if np.any(y == c)]
    assert result["metrics"]["mean_per_class_recall"] == pytest.approx(np.mean(recalls))
    assert result["metrics"]["top5"] == 1.0
    assert result["num_examples"] == len(y)

    saved = json.loads((tmp_path / "eval" / "7" / "zeroshot_toy.json").read_text())
    assert (
        saved["task"] == "zeroshot_toy" and saved["dataset"] == "toy" and saved["split"] == "test"
    )
    assert (
        saved["templates"] == templates and saved["num_examples"] == len(y) and saved["step"] == 7
    )
    assert saved["metrics"]["top1"] == pytest.approx(result["metrics"]["top1"])
    table = format_table([result])
    assert "zeroshot_toy" in table and "mean_per_class_recall" in table
    assert flat_metrics([result])["zeroshot_toy/top1"] == result["metrics"]["top1"]


def test_zeroshot_on_imagenet_a_style_labels_uses_the_200_subset(mesh):
    """tfds imagenet_a: labels are ImageNet-1k indices; columns are the 200 subset classes."""
    idx = CN.IMAGENET_A_INDICES
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(200, D))
    cols = rng.integers(0, 200, size=40)
    px = _pixels(0.35 * _unit(centers[cols] + rng.normal(size=(40, D)) * 0.5))
    labels_1k = np.asarray(idx)[cols]
    data = FakeData(
        {"imagenet_a": {"test": (px, labels_1k, None)}},
        {"imagenet_a": [f"n{i:08d}" for i in range(1000)]},
    )
    tok = FakeTokenizer()
    subset_names = [CN.IMAGENET_CLASSNAMES[i] for i in idx]
    offsets = np.zeros((1, D))
    # Duplicate names (none in these subsets) would alias prompts; check there are none.
    assert len(set(subset_names)) == 200
    enc = _encoders(
        mesh, tok, _text_table_for(subset_names, ["a photo of a {}."], centers, offsets)
    )
    cfg = _config(tasks="zeroshot:imagenet_a")
    cfg.zeroshot.templates = "simple"
    ctx = EvalContext(enc, tok, mesh, "", 1, data=data.source())
    [result] = evaluate(build_evaluators(cfg), ctx, step=1)
    logits = _image_features(px) @ _unit(centers).T
    assert result["metrics"]["top1"] == pytest.approx(np.mean(logits.argmax(1) == cols))
    assert result["metrics"]["top1"] > 0.5
    assert result["num_classes"] == 200


def test_retrieval_evaluator_matches_brute_force(mesh):
    rng = np.random.default_rng(5)
    n = 21
    feats = _unit(rng.normal(size=(n, D)))
    px = _pixels(0.4 * feats)
    captions = [[f"image {i} caption {j}" for j in range(1 + i % 3)] for i in range(n)]
    caption_vec = {
        c: _unit(feats[i] + rng.normal(size=D) * 0.9) for i, cs in enumerate(captions) for c in cs
    }
    data = FakeData({"pairs": {"test": (px, None, captions)}}, {})
    tok = FakeTokenizer()

    def table(t):
        rows = np.zeros((len(t.vocab) + 1, D), np.float32)
        for text, i in t.vocab.items():
            rows[i] = caption_vec[text]
        return rows

    enc = _encoders(mesh, tok, table)
    cfg = _config(tasks="retrieval:pairs")
    cfg.retrieval.query_block, cfg.retrieval.key_block = 8, 8
    ctx = EvalContext(enc, tok, mesh, "", 1, data=data.source())
    [result] = evaluate(build_evaluators(cfg), ctx, step=3)

    img = _image_features(px)
    flat = [c for cs in captions for c in cs]
    owner = np.array([i for i, cs in enumerate(captions) for _ in cs])
    txt = np.stack([caption_vec[c] for c in flat])
    sims = img @ txt.T
    for k in (1, 5, 10):
        i2t = np.mean(
            [
                min(list(np.argsort(-sims[i])).index(j) for j in np.flatnonzero(owner == i)) < k
                for i in range(n)
            ]
        )
        t2i = np.mean([list(np.argsort(-sims[:, j])).index(owner[j]) < k for j in range(len(flat))])
        assert result["metrics"][f"i2t_R@{k}"] == pytest.approx(i2t)
        assert result["metrics"][f"t2i_R@{k}"] == pytest.approx(t2i)
    assert result["num_examples"] == n and result["num_texts"] == len(flat)


def test_linear_probe_and_tip_adapter_evaluators_run(mesh, tmp_path):
    names = ["a", "b", "c", "d", "e"]
    centers, (tr_px, tr_y), (te_px, te_y) = _classification_world(1, n_train=120)
    data = FakeData(
        {"toy": {"train": (tr_px, tr_y, None), "test": (te_px, te_y, None)}}, {"toy": names}
    )
    tok = FakeTokenizer()
    enc = _encoders(
        mesh, tok, _text_table_for(names, ["a photo of a {}."], centers, np.zeros((1, D)))
    )
    cfg = _config(tasks="linear_probe:toy,tip_adapter:toy")
    cfg.zeroshot.templates = "simple"
    cfg.linear_probe.c_values = (0.01, 1.0, 100.0)
    cfg.linear_probe.refine_steps = 0
    cfg.tip_adapter.shots = (1, 2)
    cfg.tip_adapter.search_step = (5, 4)
    cfg.tip_adapter.val_per_class = 3
    ctx = EvalContext(enc, tok, mesh, "", 1, data=data.source())
    lp, tip = evaluate(build_evaluators(cfg), ctx, step=5, workdir=str(tmp_path))

    # The linear probe evaluator is M.linear_probe on the gathered features (checked against
    # scikit-learn in test_eval_metrics), with the configured validation split.
    x, xt = _image_features(tr_px), _image_features(te_px)
    tr, va = M.split_train_val(len(tr_y), 0.2, 0)
    want = M.linear_probe(x[tr], tr_y[tr], x[va], tr_y[va], xt, te_y, c_values=(0.01, 1.0, 100.0))
    assert lp["metrics"]["top1"] == pytest.approx(want["top1"])
    assert lp["metrics"]["best_C"] == want["best_C"]
    assert lp["num_train"] == len(tr) and lp["num_examples"] == len(te_y)

    zs = np.mean((xt @ _unit(centers).T).argmax(1) == te_y)
    assert tip["metrics"]["zero_shot_top1"] == pytest.approx(zs)
    for k in (1, 2):
        assert 0 <= tip["metrics"][f"tip_top1_{k}shot"] <= 1
        assert f"linear_probe_top1_{k}shot" in tip["metrics"]
    assert (tmp_path / "eval" / "5" / "tip_adapter_toy.json").exists()
    assert tip["val_examples"] == 15


def test_bad_inputs_are_clear_errors(mesh, tmp_path):
    px = _pixels(np.zeros((4, D)))
    data = FakeData(
        {
            "pairs": {"test": (px, None, [["x"]] * 4)},
            "toy": {"test": (px, np.zeros(4, np.int64), None)},
        },
        {"toy": ["a", "b", "c"]},
    )
    tok = FakeTokenizer()
    enc = _encoders(mesh, tok, lambda t: np.ones((len(t.vocab) + 1, D), np.float32))
    ctx = EvalContext(enc, tok, mesh, "", 1, data=data.source())
    with pytest.raises(ValueError, match="dataset 'pairs' has no 'label' feature"):
        evaluate(build_evaluators(_config(tasks="zeroshot:pairs")), ctx, step=0)
    names = tmp_path / "names.txt"
    names.write_text("one\ntwo\n")
    cfg = _config(tasks="zeroshot:toy")
    cfg.zeroshot.class_names = f"toy={names}"
    with pytest.raises(
        ValueError, match=r"names\.txt' has 2 names but dataset 'toy' has 3 classes"
    ):
        evaluate(build_evaluators(cfg), ctx, step=0)
    cfg.zeroshot.class_names = ""
    cfg.zeroshot.templates = "a photo without placeholder"
    with pytest.raises(ValueError, match="unknown template spec"):
        evaluate(build_evaluators(cfg), ctx, step=0)
    # Task strings are checked before any data is read (more in test_eval_tasks.py).
    with pytest.raises(
        ValueError, match="unknown evaluator 'zero_shot'.*known: linear_probe, retrieval"
    ):
        build_evaluators(_config(tasks="zero_shot:cifar10"))


def test_checkpoint_step():
    assert checkpoint_step([100, 200], None, "d") == 200
    assert checkpoint_step([100, 200], 100, "d") == 100
    with pytest.raises(
        EvaluationError,
        match="--step=150: no checkpoint for step 150 in d; available steps: 100, 200",
    ):
        checkpoint_step([200, 100], 150, "d")
    with pytest.raises(EvaluationError, match="no checkpoints in d"):
        checkpoint_step([], None, "d")


# ------------------------------------------------------------------ real pipeline, tiny model


@pytest.fixture
def demo_dir(demo_data_dir):
    return demo_data_dir


def test_evaluators_on_clip_demo_with_a_tiny_model(demo_dir, mesh, tmp_path):
    tok = demo_tokenizer(demo_dir, context_length=16)
    model = create_model(
        "tiny-vit", text=dict(vocab_size=tok.vocab_size, context_length=16, eot_token_id=tok.eot_id)
    )
    variables = nn.meta.unbox(
        model.init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8), jnp.zeros((1, 16), jnp.int32)
        )
    )
    params = variables.pop("params")
    enc = Encoders.from_model(model, params, variables, mesh, batch_size=16)
    ctx = EvalContext(enc, tok, mesh, demo_dir, 32)  # the default DataSource: prepared tfds
    cfg = _config(
        tasks="zeroshot:clip_demo,retrieval:clip_demo,linear_probe:clip_demo@validation,"
        "tip_adapter:clip_demo@validation"
    )
    cfg.linear_probe.c_values = (0.1, 10.0)
    cfg.linear_probe.max_train_examples = 160
    cfg.linear_probe.refine_steps = 0
    cfg.tip_adapter.shots = (1,)
    cfg.tip_adapter.val_per_class = 1
    cfg.tip_adapter.search_step = (4, 3)
    cfg.tip_adapter.linear_probe = False
    results = evaluate(build_evaluators(cfg), ctx, step=2, workdir=str(tmp_path))
    zs, ret, lp, tip = results
    assert [r["task"] for r in results] == [
        "zeroshot_clip_demo",
        "retrieval_clip_demo",
        "linear_probe_clip_demo_validation",
        "tip_adapter_clip_demo_validation",
    ]

    # Independent path: one device, the loader unsharded, model.apply directly.
    apply = jax.jit(
        lambda x: model.apply({"params": params, **variables}, x, method="encode_image")
    )
    feats, labels = [], []
    for batch in pipeline.eval_loader(
        "clip_demo", "test", demo_dir, batch_size=32, image_size=32, shard_index=0, shard_count=1
    ):
        keep = batch["mask"]
        feats.append(np.asarray(apply(batch["image"]))[keep])
        labels.append(batch["label"][keep])
    feats, labels = _unit(np.concatenate(feats).astype(np.float64)), np.concatenate(labels)
    chex.assert_trees_all_close(
        ctx.image_features("clip_demo", "test")["features"], feats, atol=2e-4
    )
    names = [n.replace("_", " ") for n in info.dataset_info("clip_demo", demo_dir)["class_names"]]
    text = np.asarray(
        model.apply(
            {"params": params, **variables},
            jnp.asarray(tok.encode([f"a photo of a {n}." for n in names])),
            method="encode_text",
        ),
        np.float64,
    )
    ranked = np.argsort(-(feats @ _unit(text).T), axis=1)
    assert abs(zs["metrics"]["top1"] - np.mean(ranked[:, 0] == labels)) <= 1 / len(labels) + 1e-9
    top5 = np.mean([labels[i] in ranked[i, :5] for i in range(len(labels))])
    assert abs(zs["metrics"]["top5"] - top5) <= 1 / len(labels) + 1e-9
    assert (
        zs["num_examples"] == 40
        and zs["num_classes"] == 64
        and zs["templates"] == ["a photo of a {}."]
    )

    captions = info.read_captions("clip_demo", "test", demo_dir)
    assert ret["num_examples"] == 40 and ret["num_texts"] == sum(len(c) for c in captions) == 120
    for k in (1, 5, 10):
        assert 0 <= ret["metrics"][f"i2t_R@{k}"] <= 1
    assert lp["num_examples"] == 48 and 0 <= lp["metrics"]["top1"] <= 1
    assert lp["num_train"] + lp["num_val"] == 160  # max_train_examples
    assert "tip_top1_1shot" in tip["metrics"]
    for r in results:
        saved = json.loads((tmp_path / "eval" / "2" / f"{r['task']}.json").read_text())
        chex.assert_trees_all_close(saved["metrics"], r["metrics"])


def test_evaluate_command_rejects_a_missing_step(tmp_path):
    config = config_lib.defaults()
    with pytest.raises(EvaluationError, match="checkpoints.*directory missing"):
        evaluate_checkpoint(config, str(tmp_path), tasks="zeroshot:clip_demo")
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    ckpt.save(10, {"x": jnp.ones(3)}, {"next_batch": 1})
    ckpt.wait()
    ckpt.close()
    with pytest.raises(
        EvaluationError, match="--step=7: no checkpoint for step 7 in .*available steps: 10"
    ):
        evaluate_checkpoint(config, str(tmp_path), step=7, tasks="zeroshot:clip_demo")
    with pytest.raises(EvaluationError, match="no evaluation tasks"):
        evaluate_checkpoint(config, str(tmp_path), step=10)


def test_evaluation_during_training_equals_the_standalone_command(demo_data_dir, tmp_path):
    """Same checkpoint, 8 simulated devices: the training loop's evaluation at step 2 and
    `python -m clip_jax.evaluate --step=2` (a separate process) write the same numbers."""
    c = smoke(DEMO, demo_data_dir, total_steps=2)
    c.eval.every_steps = 2
    c.eval.tasks = (
        "zeroshot:clip_demo@test,retrieval:clip_demo@validation,"
        "linear_probe:clip_demo@validation,tip_adapter:clip_demo@validation"
    )
    # Small searches: the point is equality of the two paths, not the accuracy.
    c.eval.tip_adapter.shots = (1, 2)
    c.eval.tip_adapter.search_step = (20, 5)
    c.eval.tip_adapter.linear_probe = False
    c.eval.linear_probe.c_values = (0.1, 1.0, 10.0)
    c.eval.linear_probe.refine_steps = 0
    workdir = str(tmp_path)
    train_lib.train(c, workdir)

    def results(directory):
        return {
            name: json.load(open(os.path.join(directory, name)))
            for name in sorted(os.listdir(directory))
        }

    during = results(os.path.join(workdir, "eval", "2"))
    shutil.rmtree(os.path.join(workdir, "eval"))
    subprocess.run(
        [sys.executable, "-m", "clip_jax.evaluate", f"--workdir={workdir}", "--step=2"],
        check=True,
        capture_output=True,
    )
    standalone = results(os.path.join(workdir, "eval", "2"))

    assert len(during) == 4 and during.keys() == standalone.keys()
    for name, result in during.items():
        assert result["num_examples"] == standalone[name]["num_examples"], name
        chex.assert_trees_all_equal(result["metrics"], standalone[name]["metrics"])
