"""`clip_jax.load` and `python -m clip_jax.predict` on a tiny pretrained directory."""

import json
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import clip_jax
from clip_jax import pretrained
from clip_jax.models.clip import CLIP
from clip_jax.models.registry import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_tiny_pretrained(directory: str):
    """A random tiny ViT with the CLIP BPE vocabulary, saved as a pretrained directory:
    (directory, config, variables)."""
    config = get_config(
        "tiny-vit", text={"vocab_size": 49408, "eot_token_id": 49407, "context_length": 77}
    )
    model = CLIP(config)
    images = jnp.zeros((1, 32, 32, 3), jnp.uint8)
    variables = model.init(jax.random.key(3), images, jnp.zeros((1, 77), jnp.int32))
    variables = jax.tree.map(np.asarray, dict(nn.meta.unbox(variables)))
    pretrained.save(
        directory,
        config,
        variables,
        name="custom",
        tokenizer={"kind": "clip_bpe", "context_length": 77},
        source={"format": "test"},
    )
    return directory, config, variables


def write_images(d):
    """Two images of different sizes and one broken JPEG in folder `d`."""
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 30)), ("b.jpg", (64, 64))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(d / name)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return d


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_pretrained(str(tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"))


def test_load_gives_the_training_model(checkpoint):
    directory, config, variables = checkpoint
    model, loaded, tokenizer, preprocess = clip_jax.load(directory)
    assert model.config == config
    chex.assert_trees_all_equal(loaded, variables)
    assert tokenizer.vocab_size == 49408 and tokenizer.eot_id == 49407
    image = Image.fromarray(np.full((50, 70, 3), 128, np.uint8))
    x = preprocess(image)
    chex.assert_shape(x, (32, 32, 3))
    chex.assert_type(x, np.uint8)
    tokens = tokenizer.encode(["a dog", "a cat"])
    out = model.apply(loaded, np.stack([x, x]), tokens)
    chex.assert_trees_all_close(np.linalg.norm(out["image_emb"], axis=-1), np.ones(2), atol=1e-6)
    chex.assert_trees_all_close(np.linalg.norm(out["text_emb"], axis=-1), np.ones(2), atol=1e-6)
    chex.assert_trees_all_close(out["logit_scale"], np.float32(1 / 0.07), rtol=1e-6)


def run_predict(*args):
    res = subprocess.run(
        [sys.executable, "-m", "clip_jax.predict", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    return res.returncode, res.stdout, res.stderr


def test_predict_cli_labels_texts_and_a_broken_image(checkpoint, image_dir):
    directory, _, _ = checkpoint
    labels, texts = ["a dog", "a cat", "a red car"], ["a photo", "two birds"]
    rc, out, err = run_predict(
        f"--checkpoint={directory}",
        f"--images={image_dir}",
        f"--labels={','.join(labels)}",
        f"--texts={','.join(texts)}",
        "--templates=a photo of {}.,{}",
        "--top_k=2",
        "--json",
    )
    assert rc == 0, err
    assert "broken.jpg" in err and "Traceback" not in err
    results = {os.path.basename(r["image"]): r for r in json.loads(out)}
    assert set(results) == {"a.png", "b.jpg", "broken.jpg"}
    assert "error" in results["broken.jpg"]

    # Independent of predict: embeddings from clip_jax.load, the rest in numpy.
    model, variables, tokenizer, preprocess = clip_jax.load(directory)

    def embed_text(strings):
        dummy = np.zeros((len(strings), 32, 32, 3), np.uint8)
        return np.array(model.apply(variables, dummy, tokenizer.encode(strings))["text_emb"])

    prompts = [t.format(label) for label in labels for t in ("a photo of {}.", "{}")]
    w = embed_text(prompts).reshape(3, 2, -1)
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    w = w.mean(1)
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    for name in ("a.png", "b.jpg"):
        img = preprocess(str(image_dir / name))[None]
        out_ = model.apply(variables, img, tokenizer.encode(["x"]))
        logits = float(out_["logit_scale"]) * np.asarray(out_["image_emb"])[0] @ w.T
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[:2]
        got = results[name]["labels"]
        assert [g["label"] for g in got] == [labels[i] for i in top]
        chex.assert_trees_all_close(np.array([g["prob"] for g in got]), probs[top], atol=1e-5)
        cos = np.asarray(out_["image_emb"])[0] @ embed_text(texts).T
        chex.assert_trees_all_close(
            np.array([t["cosine"] for t in results[name]["texts"]]), cos, atol=1e-5
        )


def test_predict_cli_empty_labels_is_one_line_error(checkpoint, image_dir):
    directory, _, _ = checkpoint
    rc, out, err = run_predict(f"--checkpoint={directory}", f"--images={image_dir}", "--labels=")
    assert rc == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "--labels is empty" in err
