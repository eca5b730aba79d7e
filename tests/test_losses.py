"""Tests for clip_jax.losses: dense forms against an independent numpy reference, sharded forms
(gather, ring, ring in chunks) against the dense forms (value, metrics and gradients), memory
bounds read from the compiled HLO, and input validation."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax import config as config_lib
from clip_jax import losses

B, D = 64, 16
SCALE, BIAS = 10.0, -3.0
BATCH = ("data", "fsdp")


# ------------------------------------------------------------------------------------------
# Independent numpy reference (explicit loops, float64).
# ------------------------------------------------------------------------------------------


def _np_lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _np_first_argmax(values):
    best, arg = values[0], 0
    for j, v in enumerate(values):
        if v > best:
            best, arg = v, j
    return arg


def np_reference(kind, img, txt, scale, bias):
    img = np.asarray(img, np.float64)
    txt = np.asarray(txt, np.float64)
    n = img.shape[0]
    logits = [
        [scale * float(np.dot(img[i], txt[j])) + (bias or 0.0) for j in range(n)] for i in range(n)
    ]
    cols = [[logits[i][j] for i in range(n)] for j in range(n)]
    if kind == "softmax":
        i2t = sum(_np_lse(logits[i]) - logits[i][i] for i in range(n)) / n
        t2i = sum(_np_lse(cols[j]) - logits[j][j] for j in range(n)) / n
        loss = 0.5 * (i2t + t2i)
    else:
        loss = 0.0
        for i in range(n):
            for j in range(n):
                z = logits[i][j] if i == j else -logits[i][j]
                loss += math.log1p(math.exp(-z))  # -log sigmoid(z)
        loss /= n
    i2t_acc = sum(_np_first_argmax(logits[i]) == i for i in range(n)) / n
    t2i_acc = sum(_np_first_argmax(cols[j]) == j for j in range(n)) / n
    return loss, i2t_acc, t2i_acc


def np_reference_grads(kind, img, txt, scale, bias):
    """d loss / d (img, txt, scale, bias) in float64, from the closed form of d loss / d logits."""
    img = np.asarray(img, np.float64)
    txt = np.asarray(txt, np.float64)
    n = img.shape[0]
    sim = img @ txt.T
    z = scale * sim + bias
    eye = np.eye(n)
    if kind == "softmax":
        rows = np.exp(z - z.max(1, keepdims=True))
        cols = np.exp(z - z.max(0, keepdims=True))
        g = (rows / rows.sum(1, keepdims=True) + cols / cols.sum(0, keepdims=True) - 2 * eye) / (
            2 * n
        )
    else:
        y = 2 * eye - 1
        g = -y / (1 + np.exp(y * z)) / n  # d/dz -log sigmoid(y z) = -y sigmoid(-y z)
    return scale * g @ txt, scale * g.T @ img, np.sum(g * sim), np.sum(g)


# ------------------------------------------------------------------------------------------
# Fixtures and helpers.
# ------------------------------------------------------------------------------------------


def _normalise(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _embeddings(batch=B, width=D, seed=0, signal=1.0):
    """Random unit vectors; text correlated with image so accuracies are neither 0 nor 1."""
    rng = np.random.default_rng(seed)
    img = _normalise(rng.standard_normal((batch, width)))
    txt = _normalise(rng.standard_normal((batch, width)) + signal * img)
    return jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32)


def _known_accuracy_case():
    """Embeddings with a designed similarity matrix and known top-1 accuracies.

    Images are basis vectors e_i (plus one spare dim), so sim[i, j] is coordinate i of text
    j. Every text column has the same norm (the spare coordinate tops it up), hence row and
    column arg-maxes are those of the designed matrix S:
      rows 0, 1, 5 point at a wrong column  -> i2t_acc = 13/16,
      columns 2, 3 point at a wrong row     -> t2i_acc = 14/16.
    """
    n = 16
    rng = np.random.default_rng(1)
    s = np.eye(n) + 0.1 * rng.random((n, n))
    s[0, 3] = 2.0  # row 0 -> col 3 (wrong); col 3 -> row 0 (wrong)
    s[5, 2] = 3.0  # row 5 -> col 2 (wrong); col 2 -> row 5 (wrong)
    s[1, 4] = 1.5  # row 1 -> col 4 (wrong) ...
    s[4, 4] = 2.5  # ... but col 4 -> row 4 (right)
    c = (s**2).sum(0).max() + 1.0
    img = np.concatenate([np.eye(n), np.zeros((n, 1))], 1)
    spare = np.sqrt(c - (s**2).sum(0))
    txt = np.concatenate([s, spare[None, :]], 0).T / np.sqrt(c)
    return jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), 13 / 16, 14 / 16


def _mesh(shape):
    return Mesh(np.asarray(jax.devices()).reshape(shape), ("data", "fsdp", "model"))


def _value_and_grad(fn):
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True))


def _put(mesh, *xs):
    sh = NamedSharding(mesh, P(BATCH))
    return [jax.device_put(x, sh) for x in xs]


# ------------------------------------------------------------------------------------------
# Dense forms against numpy.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_dense_matches_numpy_reference(kind):
    img, txt = _embeddings(batch=24, width=8, signal=0.8)
    bias = BIAS if kind == "sigmoid" else None
    fn = losses.softmax_loss if kind == "softmax" else losses.sigmoid_loss
    loss, metrics = jax.jit(fn)(
        img, txt, jnp.float32(SCALE), None if bias is None else jnp.float32(bias)
    )
    ref_loss, ref_i2t, ref_t2i = np_reference(kind, img, txt, SCALE, bias)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    assert float(metrics["i2t_acc"]) == pytest.approx(ref_i2t)
    assert float(metrics["t2i_acc"]) == pytest.approx(ref_t2i)
    assert 0.0 < ref_i2t < 1.0  # the case is informative


class DenseGradientsTest(chex.TestCase):
    """The dense form is the reference of the sharded tests below: its value and gradients on
    the same embeddings against float64 numpy."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("softmax", "sigmoid")
    def test_dense_gradients_match_numpy_reference(self, kind):
        img, txt = _embeddings()
        fn = losses.make_loss(kind)
        grad = self.variant(jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True))
        (loss, _), g = grad(img, txt, jnp.float32(SCALE), jnp.float32(BIAS))
        chex.assert_trees_all_close(loss, np_reference(kind, img, txt, SCALE, BIAS)[0], rtol=1e-5)
        ref = np_reference_grads(kind, img, txt, SCALE, BIAS)
        chex.assert_trees_all_close(tuple(g), ref, rtol=1e-5, atol=1e-5)


def test_softmax_bias_cancels_and_is_optional():
    img, txt = _embeddings(batch=8, width=8)
    a, _ = losses.softmax_loss(img, txt, jnp.float32(SCALE))
    b, _ = losses.softmax_loss(img, txt, jnp.float32(SCALE), jnp.float32(5.0))
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_known_accuracies_dense_and_sharded(kind):
    img, txt, want_i2t, want_t2i = _known_accuracy_case()
    ref = np_reference(kind, img, txt, SCALE, BIAS)
    assert (ref[1], ref[2]) == (want_i2t, want_t2i)  # the construction does what it says
    mesh = _mesh((4, 2, 1))
    for impl, chunk in (("dense", 0), ("gather", 0), ("ring", 0), ("ring", 1)):
        fn = losses.make_loss(kind, mesh, impl, chunk_size=chunk)
        loss, m = jax.jit(fn)(*_put(mesh, img, txt), jnp.float32(SCALE), jnp.float32(BIAS))
        assert float(m["i2t_acc"]) == pytest.approx(want_i2t), impl
        assert float(m["t2i_acc"]) == pytest.approx(want_t2i), impl
        np.testing.assert_allclose(float(loss), ref[0], rtol=1e-5)


def test_accuracy_ties_go_to_lowest_index_in_every_form():
    """All logits equal: argmax picks index 0, so only row/column 0 counts as correct."""
    img = jnp.tile(jnp.eye(1, 4, dtype=jnp.float32), (32, 1))  # 4 rows per device: 2 chunks
    mesh = _mesh((8, 1, 1))
    for impl, chunk in (("dense", 0), ("gather", 0), ("ring", 0), ("ring", 2)):
        for kind in ("softmax", "sigmoid"):
            _, m = jax.jit(losses.make_loss(kind, mesh, impl, chunk_size=chunk))(
                img, img, jnp.float32(SCALE), jnp.float32(BIAS)
            )
            assert float(m["i2t_acc"]) == pytest.approx(1 / 32), (kind, impl, chunk)
            assert float(m["t2i_acc"]) == pytest.approx(1 / 32), (kind, impl, chunk)


# ------------------------------------------------------------------------------------------
# Sharded forms against the dense forms: values, metrics and gradients.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 1, 1), (4, 2, 1), (2, 4, 1), (2, 2, 2)])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_sharded_value_and_grads_match_dense(kind, shape):
    mesh = _mesh(shape)
    img, txt = _embeddings()
    scale, bias = jnp.float32(SCALE), jnp.float32(BIAS)
    (ref_loss, ref_m), ref_g = _value_and_grad(losses.make_loss(kind))(img, txt, scale, bias)
    assert float(jnp.max(jnp.abs(ref_g[0]))) > 1e-3  # gradients are not trivially zero
    gimg, gtxt = _put(mesh, img, txt)
    for impl in ("gather", "ring"):
        (loss, m), g = _value_and_grad(losses.make_loss(kind, mesh, impl))(gimg, gtxt, scale, bias)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5, err_msg=impl)
        for k in ("i2t_acc", "t2i_acc"):
            assert float(m[k]) == pytest.approx(float(ref_m[k])), (impl, k)
        for name, a, r in zip(("image_emb", "text_emb", "logit_scale", "logit_bias"), g, ref_g):
            np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5, err_msg=f"{impl} d{name}")
        assert g[0].sharding.is_equivalent_to(gimg.sharding, 2)  # grads stay batch-sharded


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1)])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_ring_in_chunks_matches_dense(kind, shape):
    """1, 2 and 4 chunks per b x b tile (b = 8): loss and every gradient within 1e-5 of the
    dense form (itself held to numpy in DenseGradientsTest), accuracies identical."""
    mesh = _mesh(shape)
    img, txt = _embeddings()
    scale, bias = jnp.float32(SCALE), jnp.float32(BIAS)
    (ref_loss, ref_m), ref_g = _value_and_grad(losses.make_loss(kind))(img, txt, scale, bias)
    gimg, gtxt = _put(mesh, img, txt)
    b = B // 8
    for chunk in (b, b // 2, b // 4):
        fn = losses.make_loss(kind, mesh, "ring", chunk_size=chunk)
        (loss, m), g = _value_and_grad(fn)(gimg, gtxt, scale, bias)
        chex.assert_trees_all_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(g, ref_g, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_equal(m, ref_m)
        assert g[0].sharding.is_equivalent_to(gimg.sharding, 2)


@pytest.mark.parametrize("impl, chunk", [("gather", 0), ("ring", 0), ("ring", 4)])
def test_softmax_without_bias_and_bf16_inputs(impl, chunk):
    mesh = _mesh((4, 2, 1))
    img, txt = _embeddings()
    img16, txt16 = img.astype(jnp.bfloat16), txt.astype(jnp.bfloat16)
    fn = losses.make_loss("softmax", mesh, impl, chunk_size=chunk)  # 4: 2 chunks per tile
    grad = jax.jit(jax.grad(lambda a, b, s: fn(a, b, s)[0], argnums=(0, 1, 2)))
    ref = jax.jit(jax.grad(lambda a, b, s: losses.softmax_loss(a, b, s)[0], argnums=(0, 1, 2)))
    g, r = grad(img16, txt16, jnp.float32(SCALE)), ref(img16, txt16, jnp.float32(SCALE))
    assert g[0].dtype == jnp.bfloat16 and g[1].dtype == jnp.bfloat16
    for a, b in zip(g, r):
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-3
        )


def test_batch_over_data_axis_only():
    mesh = _mesh((4, 2, 1))
    img, txt = _embeddings()
    ref = losses.sigmoid_loss(img, txt, jnp.float32(SCALE), jnp.float32(BIAS))[0]
    for impl in ("gather", "ring"):
        fn = losses.make_loss("sigmoid", mesh, impl, batch_axes=("data",))
        np.testing.assert_allclose(jax.jit(fn)(img, txt, SCALE, BIAS)[0], ref, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Memory: no global B x B buffer in the compiled sharded loss + gradient.
# ------------------------------------------------------------------------------------------


def _compiled_text(fn, mesh):
    img, txt = _embeddings()
    if mesh is not None:
        img, txt = _put(mesh, img, txt)
    lowered = _value_and_grad(fn).lower(img, txt, jnp.float32(SCALE), jnp.float32(BIAS))
    return lowered.compile().as_text()


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_compiled_sharded_loss_has_no_global_square_buffer(kind):
    mesh = _mesh((8, 1, 1))
    b = B // 8
    square, strip = f"f32[{B},{B}]", f"f32[{b},{B}]"
    dense = _compiled_text(losses.make_loss(kind), None)
    assert square in dense  # the check can fail: the dense form does build it
    gather = _compiled_text(losses.make_loss(kind, mesh, "gather"), mesh)
    assert square not in gather
    assert strip in gather  # gather: local rows x global columns
    ring = _compiled_text(losses.make_loss(kind, mesh, "ring"), mesh)
    assert square not in ring and strip not in ring  # ring: only b x b tiles
    assert f"f32[{b},{b}]" in ring
    assert "all-gather" not in ring and "collective-permute" in ring


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_ring_in_chunks_memory_is_linear_in_batch(kind):
    """Compiled only: per-device temp of the chunked ring is O(b*D + c^2), the plain ring's
    holds b x b; no b x b buffer is left in the chunked program."""
    mesh = _mesh((8, 1, 1))
    big, width, chunk = 4096, 32, 64
    b = big // 8
    emb = jax.ShapeDtypeStruct((big, width), jnp.float32, sharding=NamedSharding(mesh, P(BATCH)))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)

    def compiled(chunk_size):
        fn = losses.make_loss(kind, mesh, "ring", chunk_size=chunk_size)
        return _value_and_grad(fn).lower(emb, emb, scalar, scalar).compile()

    plain, tiled = compiled(0), compiled(chunk)
    assert plain.memory_analysis().temp_size_in_bytes >= 4 * b * b
    bound = 4 * (8 * b * width + 4 * chunk * chunk)  # a few b x D and c x c f32 buffers
    assert tiled.memory_analysis().temp_size_in_bytes <= bound
    text = tiled.as_text()
    assert f"f32[{b},{b}]" not in text and f"f32[{chunk},{chunk}]" in text


# ------------------------------------------------------------------------------------------
# Validation.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["dense", "gather", "ring"])
def test_bad_inputs_raise_clear_errors(impl):
    mesh = _mesh((8, 1, 1))
    fn = losses.make_loss("sigmoid", mesh, impl)
    img, txt = _embeddings()
    s, b = jnp.float32(SCALE), jnp.float32(BIAS)
    with pytest.raises(ValueError, match=r"\(64, 16\).*\(32, 16\)"):
        fn(img, txt[:32], s, b)
    with pytest.raises(ValueError, match=r"\(64, 16\).*\(64, 8\)"):
        fn(img, txt[:, :8], s, b)
    with pytest.raises(ValueError, match="2-D"):
        fn(img[None], txt[None], s, b)
    with pytest.raises(ValueError, match="logit_bias"):
        fn(img, txt, s, None)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        fn(img, txt, jnp.ones((2,)), b)
    if impl != "dense":
        with pytest.raises(ValueError, match="60 is not divisible by the 8 devices"):
            jax.jit(fn)(img[:60], txt[:60], s, b)


def test_chunk_size_errors_and_clamp():
    mesh = _mesh((8, 1, 1))  # B = 64: tiles of b = 8
    img, txt = _embeddings()
    s, b = jnp.float32(SCALE), jnp.float32(BIAS)
    with pytest.raises(ValueError, match="chunk_size=-1 must be >= 0"):
        losses.make_loss("softmax", mesh, "ring", chunk_size=-1)
    fn = losses.make_loss("softmax", mesh, "ring", chunk_size=3)
    with pytest.raises(
        ValueError, match="chunk_size=3 does not divide the per-device batch 8: use 2 or 4"
    ):
        fn(img, txt, s)
    # A chunk larger than the tile is clamped to it: the plain ring, bit for bit.
    whole = jax.jit(losses.make_loss("sigmoid", mesh, "ring"))(img, txt, s, b)
    big = jax.jit(losses.make_loss("sigmoid", mesh, "ring", chunk_size=1024))(img, txt, s, b)
    chex.assert_trees_all_equal(big, whole)
    # The other forms ignore the chunk size.
    jax.jit(losses.make_loss("softmax", mesh, "gather", chunk_size=3))(img, txt, s)


def _ring_config(batch_size, chunk_size, eval_batch_size=256):
    c = config_lib.defaults()
    c.loss.impl = "ring"
    c.batch_size, c.eval.batch_size, c.loss.chunk_size = batch_size, eval_batch_size, chunk_size
    return c


def test_config_rejects_chunk_size_before_compiling():
    with pytest.raises(
        config_lib.ConfigError,
        match=r"loss.chunk_size=1000 does not divide the per-device batch 4096: use 512 or "
        r"1024 .*batch_size 32768 / 8 devices",
    ):
        config_lib.validate(_ring_config(32768, 1000), num_devices=8)
    with pytest.raises(
        config_lib.ConfigError, match=r"batch 768: use 384 or 768 .*eval.batch_size 6144 / 8"
    ):
        config_lib.validate(_ring_config(4096, 512, 6144), num_devices=8)  # validation loss
    with pytest.raises(config_lib.ConfigError, match="loss.chunk_size=-2 must be >= 0"):
        config_lib.validate(_ring_config(256, -2))
    config_lib.validate(_ring_config(32768, 1024), num_devices=8)
    config_lib.validate(_ring_config(256, 4096), num_devices=8)  # clamped to the tile (32)
    gather = _ring_config(32768, 1000)
    gather.loss.impl = "gather"  # only the ring is chunked
    config_lib.validate(gather, num_devices=8)


def test_unknown_kind_impl_axes():
    mesh = _mesh((8, 1, 1))
    with pytest.raises(ValueError, match="'softmax', 'sigmoid'"):
        losses.make_loss("hinge")
    with pytest.raises(ValueError, match="'dense', 'gather', 'ring'"):
        losses.make_loss("softmax", mesh, "allreduce")
    with pytest.raises(ValueError, match="batch_axes"):
        losses.make_loss("softmax", mesh, "ring", batch_axes=("batch",))
    assert losses.make_loss("softmax", None, "ring") is losses.softmax_loss
