"""Tests for clip_jax.models: shapes, published parameter counts, numpy reference forwards,
EOT pooling, logit scale/bias, uint8 normalisation, logical axis names, remat, bad input.

Everything runs on tiny models (or jax.eval_shape for the published sizes) on CPU.
"""

import dataclasses
import functools
import json
import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from numpy.lib.stride_tricks import sliding_window_view

from clip_jax.models import (
    CLIP,
    CLIPConfig,
    TextConfig,
    VisionConfig,
    create_model,
    get_config,
    list_models,
)

ALLOWED_AXES = {
    "embed",
    "mlp",
    "heads",
    "head_dim",
    "vocab",
    "position",
    "proj",
    "conv_in",
    "conv_out",
    "conv_h",
    "conv_w",
    "norm",
}
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


# ---------------------------------------------------------------- helpers


def _inputs(config, batch=2, seed=0, length=None):
    rng = np.random.default_rng(seed)
    s, t = config.vision.image_size, config.text
    images = rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8)
    length = length or t.context_length
    tokens = rng.integers(1, t.vocab_size, (batch, length)).astype(np.int32)
    tokens[tokens == t.eot_token_id] = 1
    for i in range(batch):  # one EOT per row, at different places
        tokens[i, min(3 + 4 * i, length - 1)] = t.eot_token_id
    return images, tokens


def _config(name, overrides):
    """get_config with tower overrides given as hashable tuples of (key, value) pairs."""
    return get_config(
        name, **{k: dict(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    )


@functools.cache
def _abstract_vars(name, **overrides):
    config = _config(name, overrides)
    s, ctx = config.vision.image_size, config.text.context_length
    return jax.eval_shape(
        CLIP(config).init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, s, s, 3), jnp.uint8),
        jax.ShapeDtypeStruct((1, ctx), jnp.int32),
    )


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _random_like(path, shape, rng):
    """A random value for the variable at ``path``, at a scale that keeps activations O(1)."""
    name = path[-1].key
    if name == "var":
        return rng.uniform(0.5, 1.5, shape)
    if name == "scale":
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if name in ("bias", "mean"):
        return 0.1 * rng.standard_normal(shape)
    if len(shape) == 4:  # conv kernel, He scale
        return rng.standard_normal(shape) * math.sqrt(2.0 / np.prod(shape[:3]))
    if len(shape) == 0:
        return rng.standard_normal(shape)
    return rng.standard_normal(shape) / math.sqrt(shape[0])


@functools.cache
def _init(name, **overrides):
    """(model, unboxed variables with every array random). Values come from numpy on the
    structure of ``jax.eval_shape(model.init)``: no zero biases or zero BN scales hide
    mistakes, and nothing is compiled."""
    model = CLIP(_config(name, overrides))
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(_random_like(p, x.shape, rng), x.dtype),
        nn.meta.unbox(_abstract_vars(name, **overrides)),
    )
    return model, variables


# ---------------------------------------------------------------- numpy references


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def np_ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def np_attention(xq, xkv, p, causal):
    """Per-head loop: softmax(q k^T / sqrt(dh) [+ causal mask]) v, then the output projection."""
    d, n, dh = p["query"]["kernel"].shape
    out = 0.0
    for h in range(n):
        q, k, v = (
            x @ p[name]["kernel"][:, h] + p[name]["bias"][h]
            for name, x in (("query", xq), ("key", xkv), ("value", xkv))
        )
        logits = q @ np.swapaxes(k, -1, -2) / math.sqrt(dh)
        if causal:
            t = logits.shape[-1]
            logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out = out + (w @ v) @ p["out"]["kernel"][h]
    return out + p["out"]["bias"]


def np_transformer(x, p, layers, causal, act):
    for i in range(layers):
        b = p[f"resblocks_{i}"]
        h = np_ln(x, b["ln_1"])
        x = x + np_attention(h, h, b["attn"], causal)
        h = np_ln(x, b["ln_2"])
        m = b["mlp"]
        h = act(h @ m["fc"]["kernel"] + m["fc"]["bias"])
        x = x + h @ m["proj"]["kernel"] + m["proj"]["bias"]
    return x


def np_quick_gelu(x):
    return x / (1 + np.exp(-1.702 * x))


def np_text(tokens, p, cfg: TextConfig):
    x = p["token_embedding"][tokens] + p["positional_embedding"][: tokens.shape[1]]
    x = np_transformer(x, p["transformer"], cfg.layers, True, np_quick_gelu)
    out = []
    for i, row in enumerate(tokens):
        eot = [j for j, t in enumerate(row) if t == cfg.eot_token_id]
        out.append(x[i, eot[0] if eot else len(row) - 1])
    return np_ln(np.stack(out), p["ln_final"]) @ p["text_projection"]


def np_vit(images, p, cfg: VisionConfig):
    b = images.shape[0]
    ps, g = cfg.patch_size, cfg.image_size // cfg.patch_size
    patches = images.reshape(b, g, ps, g, ps, 3).transpose(0, 1, 3, 2, 4, 5)
    x = patches.reshape(b, g * g, ps * ps * 3) @ p["conv1"]["kernel"].reshape(ps * ps * 3, -1)
    cls = np.broadcast_to(p["class_embedding"], (b, 1, x.shape[-1]))
    x = np.concatenate([cls, x], 1) + p["positional_embedding"]
    x = np_ln(x, p["ln_pre"])
    x = np_transformer(x, p["transformer"], cfg.layers, False, np_quick_gelu)
    return np_ln(x[:, 0], p["ln_post"]) @ p["proj"]


def np_conv(x, k, stride):
    pad = k.shape[0] // 2
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    win = sliding_window_view(x, (k.shape[0], k.shape[1]), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("bhwcij,ijco->bhwo", win, k)


def np_bn(x, p, s):
    return (x - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]


def np_pool(x, n):
    b, h, w, c = x.shape
    return x.reshape(b, h // n, n, w // n, n, c).mean((2, 4))


def np_resnet(images, p, s, cfg: VisionConfig):
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    x = images
    for i, stride in ((1, 2), (2, 1), (3, 1)):
        x = relu(np_bn(np_conv(x, p[f"conv{i}"]["kernel"], stride), p[f"bn{i}"], s[f"bn{i}"]))
    x = np_pool(x, 2)
    for stage, depth in enumerate(cfg.layers):
        for j in range(depth):
            bp, bs = p[f"layer{stage + 1}_{j}"], s[f"layer{stage + 1}_{j}"]
            stride = 2 if stage > 0 and j == 0 else 1
            h = relu(np_bn(np_conv(x, bp["conv1"]["kernel"], 1), bp["bn1"], bs["bn1"]))
            h = relu(np_bn(np_conv(h, bp["conv2"]["kernel"], 1), bp["bn2"], bs["bn2"]))
            h = np_pool(h, stride)
            h = np_bn(np_conv(h, bp["conv3"]["kernel"], 1), bp["bn3"], bs["bn3"])
            if "downsample_conv" in bp:
                idt = np_bn(
                    np_conv(np_pool(x, stride), bp["downsample_conv"]["kernel"], 1),
                    bp["downsample_bn"],
                    bs["downsample_bn"],
                )
            else:
                idt = x
            x = relu(h + idt)
    b, hh, ww, c = x.shape
    x = x.reshape(b, hh * ww, c)
    x = np.concatenate([x.mean(1, keepdims=True), x], 1) + p["attnpool"]["positional_embedding"]
    return np_attention(x[:, :1], x, p["attnpool"]["attn"], False)[:, 0]


def np_normalize(images):
    return (images / 255.0 - MEAN) / STD


# ---------------------------------------------------------------- tests


def test_registry_names():
    assert set(list_models()) >= {
        "ViT-B/32",
        "ViT-B/16",
        "ViT-L/14",
        "ViT-L/14@336",
        "RN50",
        "RN101",
        "RN50x4",
        "tiny-vit",
        "tiny-rn",
    }
    c = get_config("ViT-L/14")
    assert (c.embed_dim, c.text.width, c.text.layers, c.text.heads) == (768, 768, 12, 12)
    assert isinstance(create_model("tiny-vit"), CLIP)
    hash(get_config("RN50"))  # configs are hashable module attributes
    # Plain-data round trip (e.g. through config.json, where tuples become lists).
    rn = get_config("RN50", dtype="bfloat16")
    as_json = json.loads(json.dumps(dataclasses.asdict(rn)))
    assert CLIPConfig(**as_json) == rn
    assert get_config("ViT-B/32", text={"vocab_size": 32000, "eot_token_id": 2}).text == TextConfig(
        vocab_size=32000, eot_token_id=2
    )


@pytest.mark.parametrize(
    "name,expected",
    [
        ("ViT-B/32", 151_277_313),
        ("ViT-B/16", 149_620_737),
        ("ViT-L/14", 427_616_513),
        ("RN50", 102_007_137),
        # Closed forms: a larger grid adds only position rows; another vocabulary only token rows.
        ("ViT-L/14@336", 427_616_513 + (24 * 24 - 16 * 16) * 1024),
    ],
)
def test_published_param_counts(name, expected):
    assert _count(_abstract_vars(name)["params"]) == expected


def test_vocab_override_changes_only_token_rows():
    v = _abstract_vars("ViT-B/32", text=(("vocab_size", 32000), ("eot_token_id", 2)))
    assert _count(v["params"]) == 151_277_313 - (49408 - 32000) * 512


def test_collections():
    assert set(_abstract_vars("ViT-B/32")) == {"params"}
    rn = _abstract_vars("RN50")
    assert set(rn) == {"params", "batch_stats"}
    # running mean + var for every BN: twice the BN channels; BN params are scale + bias.
    n_bn_params = sum(
        _count(v)
        for p, v in jax.tree_util.tree_flatten_with_path(rn["params"])[0]
        if "bn" in jax.tree_util.keystr(p)
    )
    assert _count(rn["batch_stats"]) == n_bn_params


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn", "RN50"])
def test_logical_axis_names(name):
    variables = _abstract_vars(name)
    for collection, tree in variables.items():
        leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves
        for leaf in leaves:
            assert isinstance(leaf, nn.Partitioned), (collection, leaf)
            assert len(leaf.names) == leaf.value.ndim, leaf
            assert set(leaf.names) <= ALLOWED_AXES, leaf.names
    # Leaf names are a contract with optim.py's decay mask: gains and biases are 'scale' /
    # 'bias' (never e.g. 'query_bias'), the rest are kernels, embeddings and the logit scalars.
    names = {
        jax.tree_util.keystr(p[-1:])
        for p, _ in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(variables))[0]
    }
    assert names <= {
        "['kernel']",
        "['bias']",
        "['scale']",
        "['mean']",
        "['var']",
        "['class_embedding']",
        "['positional_embedding']",
        "['token_embedding']",
        "['proj']",
        "['text_projection']",
        "['log_scale']",
    }, names
    specs = nn.get_partition_spec(variables["params"])
    attn = specs["text"]["transformer"]["resblocks_0"]["attn"]
    assert tuple(attn["query"]["kernel"]) == ("embed", "heads", "head_dim")
    assert tuple(attn["query"]["bias"]) == ("heads", "head_dim")
    assert tuple(attn["out"]["kernel"]) == ("heads", "head_dim", "embed")
    mlp = specs["text"]["transformer"]["resblocks_0"]["mlp"]
    assert tuple(mlp["fc"]["kernel"]) == ("embed", "mlp")


@functools.cache
def _fn(name, method=None, **overrides):
    """A jitted ``model.apply`` (``method``: None, 'image' or 'text'), cached so that tests
    calling the same model with the same shapes compile it once."""
    model = CLIP(_config(name, overrides))
    if method is None:
        return jax.jit(model.apply)
    encoder = {"image": CLIP.encode_image, "text": CLIP.encode_text}[method]
    return jax.jit(functools.partial(model.apply, method=encoder))


def _encoders(model, variant):
    """(encode_image, encode_text, apply) of ``model`` under a chex variant (jit or not)."""
    return (
        variant(functools.partial(model.apply, method=CLIP.encode_image)),
        variant(functools.partial(model.apply, method=CLIP.encode_text)),
        variant(model.apply),
    )


class ApplyTest(chex.TestCase):
    """``model.apply`` traced by jit and run op by op must agree with numpy."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("vit", "tiny-vit", {}),
        # At 32px the last ResNet map is 1x1, which would make attention pooling trivial.
        ("resnet", "tiny-rn", {"vision": (("image_size", 64),)}),
    )
    def test_matches_numpy_reference(self, name, overrides):
        model, variables = _init(name, **overrides)
        config = model.config
        images, tokens = _inputs(config)
        p = _np(variables["params"])
        encode_image, encode_text, _ = _encoders(model, self.variant)
        img = encode_image(variables, images)
        x = np_normalize(images.astype(np.float64))
        if config.vision.kind == "vit":
            ref_img = np_vit(x, p["visual"], config.vision)
        else:
            batch_stats = _np(variables["batch_stats"]["visual"])
            ref_img = np_resnet(x, p["visual"], batch_stats, config.vision)
        assert np.abs(ref_img).mean() > 0.1  # the comparison below is not between near-zeros
        chex.assert_trees_all_close(img, ref_img, rtol=2e-4, atol=2e-4)
        ref_txt = np_text(tokens, p["text"], config.text)
        chex.assert_trees_all_close(encode_text(variables, tokens), ref_txt, rtol=2e-4, atol=2e-4)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("vit", "tiny-vit"), ("resnet", "tiny-rn"))
    def test_forward_shapes_dtypes_unit_norm(self, name):
        model, variables = _init(name)
        images, tokens = _inputs(model.config)
        out = _encoders(model, self.variant)[2](variables, images, tokens)
        assert set(out) == {"image_emb", "text_emb", "logit_scale"}
        chex.assert_shape([out["image_emb"], out["text_emb"]], (2, 32))
        chex.assert_type([out["image_emb"], out["text_emb"], out["logit_scale"]], jnp.float32)
        chex.assert_shape(out["logit_scale"], ())
        norms = [np.linalg.norm(out[key], axis=-1) for key in ("image_emb", "text_emb")]
        chex.assert_trees_all_close(norms, [np.ones(2)] * 2, rtol=1e-5)


def test_text_pools_first_eot_not_argmax():
    # EOT id 3 is not the largest id, there are two EOTs in row 0 and none in row 1.
    model, variables = _init("tiny-vit", text=(("eot_token_id", 3),))
    tokens = np.array(
        [[10, 900, 3, 500, 3, 999, 7, 8], [10, 900, 20, 500, 30, 999, 7, 8]], np.int32
    )
    txt = _fn("tiny-vit", "text", text=(("eot_token_id", 3),))(variables, tokens)
    ref = np_text(tokens, _np(variables["params"]["text"]), model.config.text)
    chex.assert_trees_all_close(txt, ref, rtol=2e-4, atol=2e-4)
    # Shorter than context_length is fine (first L position embeddings).
    assert txt.shape == (2, 32)


def test_text_feature_depends_only_on_tokens_up_to_eot():
    model, variables = _init("tiny-vit")
    eot = model.config.text.eot_token_id
    base = np.array([5, 6, 7, 8, eot, 11, 12, 13, 0, 0, 0, 0, 0, 0, 0, 0], np.int32)
    before, after = base.copy(), base.copy()
    before[2] = 42
    after[6] = 42
    after[10] = eot  # a later EOT is ignored too
    enc = _fn("tiny-vit", "text")
    a = np.asarray(enc(variables, np.stack([base, before])))
    b = np.asarray(enc(variables, np.stack([after, after])))
    assert np.abs(a[1] - a[0]).max() > 1e-3
    chex.assert_trees_all_close(b[0], a[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_bfloat16_compute_float32_params(name):
    _, variables = _init(name)
    config16 = get_config(name, dtype=jnp.bfloat16)
    assert config16.dtype == "bfloat16" and config16.param_dtype == "float32"
    images, tokens = _inputs(config16)
    fresh = _abstract_vars(name, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(fresh)} == {jnp.dtype(jnp.float32)}
    feats = _fn(name, "image", dtype="bfloat16")(variables, images)
    chex.assert_type(feats, jnp.bfloat16)
    out16 = _fn(name, dtype="bfloat16")(variables, images, tokens)
    out32 = _fn(name)(variables, images, tokens)
    chex.assert_type([out16["image_emb"], out16["text_emb"]], jnp.float32)
    for key in ("image_emb", "text_emb"):
        cos = np.sum(np.asarray(out16[key]) * np.asarray(out32[key]), -1)
        assert cos.min() > 0.98, (key, cos)


def test_logit_scale_and_bias():
    model, variables = _init("tiny-vit")
    images, tokens = _inputs(model.config)

    def with_fresh_scalars(m):  # init only the (cheap) logit scale / bias parameters
        fresh = nn.meta.unbox(m.init(jax.random.key(0), method=lambda mod: mod.log_scale))
        return {**variables, "params": {**variables["params"], **fresh["params"]}}

    out = _fn("tiny-vit")(with_fresh_scalars(model), images, tokens)
    chex.assert_trees_all_close(out["logit_scale"], np.float32(1 / 0.07), rtol=1e-6)
    assert "logit_bias" not in out
    big = {**variables, "params": {**variables["params"], "log_scale": jnp.float32(10.0)}}
    assert float(_fn("tiny-vit")(big, images, tokens)["logit_scale"]) == 100.0

    overrides = dict(logit_scale_init=10.0, logit_bias_init=-10.0)
    fresh = with_fresh_scalars(CLIP(get_config("tiny-vit", **overrides)))
    assert set(fresh["params"]) == {"visual", "text", "log_scale", "logit_bias"}
    out = _fn("tiny-vit", **overrides)(fresh, images, tokens)
    chex.assert_trees_all_close(out["logit_scale"], np.float32(10.0), rtol=1e-6)
    chex.assert_trees_all_close(out["logit_bias"], np.float32(-10.0), rtol=1e-7)
    chex.assert_type(out["logit_bias"], jnp.float32)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_uint8_equals_manual_normalisation(name):
    model, variables = _init(name)
    images, _ = _inputs(model.config, seed=3)
    enc = _fn(name, "image")
    manual = np_normalize(images.astype(np.float64)).astype(np.float32)
    chex.assert_trees_all_close(
        enc(variables, images), enc(variables, manual), rtol=1e-5, atol=1e-5
    )


def _loss_and_grads(name, policy, variables, images, tokens):
    """Loss and gradients w.r.t. params, compiled at XLA optimisation level 0 (fast compile;
    the same for every policy, so results stay comparable)."""
    model = CLIP(get_config(name, remat_policy=policy))

    def loss(params):
        v = {**variables, "params": params}
        if tokens is None:  # image tower only
            return jnp.sum(jnp.square(model.apply(v, images, method=CLIP.encode_image)))
        out = model.apply(v, images, tokens)
        logits = out["logit_scale"] * out["image_emb"] @ out["text_emb"].T
        return jnp.mean(jax.nn.log_softmax(logits)) + jnp.sum(out["image_emb"][:, :3])

    fn = jax.value_and_grad(loss)
    lowered = jax.jit(fn).trace(variables["params"]).lower()
    jaxpr = str(jax.make_jaxpr(loss)(variables["params"]))
    # Activations, LayerNorm and attention are always checkpointed; a remat policy adds one
    # checkpoint around each residual block.
    checkpoints = len(re.findall(r"\b(?:remat\w*|checkpoint)\[", jaxpr))
    compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    return compiled(variables["params"]), checkpoints


@pytest.mark.parametrize(
    "name,policies,tower",
    [
        ("tiny-vit", ["full", "dots", "dots_no_batch"], "both"),
        ("tiny-rn", ["full"], "image"),  # the text tower is the same code as tiny-vit's
    ],
)
def test_remat_policies_match_none(name, policies, tower):
    model, variables = _init(name)
    images, tokens = _inputs(model.config)
    tokens = tokens if tower == "both" else None
    (ref_loss, ref_grads), base = _loss_and_grads(name, "none", variables, images, tokens)
    for policy in policies:
        (loss, grads), checkpoints = _loss_and_grads(name, policy, variables, images, tokens)
        assert checkpoints > base, policy
        chex.assert_trees_all_close(loss, ref_loss, rtol=1e-6)
        chex.assert_trees_all_equal_structs(grads, ref_grads)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            # Recomputation may reorder float sums: allow 1e-5 of the leaf's largest entry.
            scale = float(np.abs(r).max()) + 1e-6
            chex.assert_trees_all_close(g, r, rtol=0, atol=1e-5 * scale)


def test_gelu_activation_differs_from_quick_gelu():
    _, variables = _init("tiny-vit")
    _, tokens = _inputs(get_config("tiny-vit"))
    a = _fn("tiny-vit", "text")(variables, tokens)
    b = _fn("tiny-vit", "text", activation="gelu")(variables, tokens)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4


# ---------------------------------------------------------------- bad input


def _trace(model, images, tokens):
    return jax.eval_shape(model.init, jax.random.key(0), images, tokens)


def test_bad_config_errors():
    with pytest.raises(ValueError, match=r"'ViT-X/9'.*ViT-B/32"):
        get_config("ViT-X/9")
    with pytest.raises(ValueError, match=r"image_size 36 .*patch_size 8"):
        get_config("tiny-vit", vision={"image_size": 36})
    with pytest.raises(ValueError, match="unknown config override keys.*'depth'"):
        get_config("tiny-vit", depth=3)
    with pytest.raises(ValueError, match="unknown text override keys.*'vocab'"):
        get_config("tiny-vit", text={"vocab": 3})
    with pytest.raises(ValueError, match="eot_token_id 1000 .*0, 999"):
        get_config("tiny-vit", text={"eot_token_id": 1000})
    with pytest.raises(ValueError, match="remat_policy 'some'"):
        get_config("tiny-vit", remat_policy="some")
    with pytest.raises(ValueError, match="activation 'relu'"):
        get_config("tiny-vit", activation="relu")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        get_config("tiny-vit", dtype="int8")
    with pytest.raises(ValueError, match="4 stage depths"):
        get_config("tiny-rn", vision={"layers": (1, 1, 1)})
    with pytest.raises(ValueError, match="width 64 .*heads 3"):
        CLIPConfig(vision=VisionConfig(width=64, heads=3, patch_size=8, image_size=32))


def test_bad_input_errors():
    model = create_model("tiny-vit")
    img = lambda *s, dt=jnp.uint8: jax.ShapeDtypeStruct(s, dt)  # noqa: E731
    tok = lambda *s, dt=jnp.int32: jax.ShapeDtypeStruct(s, dt)  # noqa: E731
    with pytest.raises(ValueError, match=r"28x28 .*image_size 32"):
        _trace(model, img(1, 28, 28, 3), tok(1, 16))
    with pytest.raises(ValueError, match=r"rank 4 .*\(32, 32, 3\)"):
        _trace(model, img(32, 32, 3), tok(1, 16))
    with pytest.raises(ValueError, match="3 channels.* 4 "):
        _trace(model, img(1, 32, 32, 4), tok(1, 16))
    with pytest.raises(ValueError, match="uint8 .*int32"):
        _trace(model, img(1, 32, 32, 3, dt=jnp.int32), tok(1, 16))
    with pytest.raises(ValueError, match=r"length 17; allowed 1\.\.16"):
        _trace(model, img(1, 32, 32, 3), tok(1, 17))
    with pytest.raises(ValueError, match="rank 2"):
        _trace(model, img(1, 32, 32, 3), tok(16))
    with pytest.raises(ValueError, match="integers"):
        _trace(model, img(1, 32, 32, 3), tok(1, 16, dt=jnp.float32))
    rn = create_model("tiny-rn")
    with pytest.raises(ValueError, match=r"64x64 .*image_size 32"):
        _trace(rn, img(1, 64, 64, 3), tok(1, 16))
