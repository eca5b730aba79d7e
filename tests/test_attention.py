"""The attention core: the XLA path against a numpy reference (with the text tower's causal
mask), the odd lengths padded for cuDNN against jax's unpadded attention, where cuDNN's fused
kernel applies, and `model.attention='cudnn'` off an NVIDIA GPU."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cli_errors import assert_one_line_error, train_cli

from clip_jax import config as config_lib
from clip_jax.models.clip import attention_shapes
from clip_jax.models.layers import (
    AttentionError,
    attention,
    chosen_attention,
    cudnn_attention_problem,
    even_length_attention,
)
from clip_jax.models.registry import get_config


def reference_attention(q, k, v, causal):
    """softmax(q k^T / sqrt(H)) v per head, float64; causal: query t sees keys s <= t."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    if causal:
        seen = np.tril(np.ones((q.shape[1], k.shape[1]), bool))
        logits = np.where(seen, logits, -np.inf)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", weights, v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("implementation", ["xla", "auto"])  # 'auto' is XLA on the CPU
def test_xla_attention_equals_numpy(causal, implementation):
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(3, 7, 4, 16)).astype(np.float32) for _ in range(3))
    got = jax.jit(lambda q, k, v: attention(q, k, v, causal, implementation))(q, k, v)
    np.testing.assert_allclose(got, reference_attention(q, k, v, causal), rtol=1e-5, atol=1e-6)


def test_bfloat16_attention_keeps_float32_softmax():
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(2, 9, 2, 8)).astype(np.float32) for _ in range(3))
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    got = attention(*bf16, causal=True, implementation="xla")
    assert got.dtype == jnp.bfloat16
    want = reference_attention(*(np.asarray(x, np.float32) for x in bf16), causal=True)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2)


def _gpu(capability, kind="NVIDIA H100 80GB HBM3"):
    """A stand-in for a jax GPU device: the attributes cuDNN's conditions read."""
    return types.SimpleNamespace(platform="gpu", compute_capability=capability, device_kind=kind)


@pytest.mark.parametrize(
    "causal, lengths",
    [(True, (7, 7)), (False, (7, 7)), (False, (1, 9)), (False, (6, 6))],
    ids=["text", "vit", "resnet-pool", "even"],
)
def test_odd_lengths_padded_for_cudnn_equal_unpadded_attention(causal, lengths):
    """The padding cuDNN gets, run here through jax's XLA attention (the same masking
    arguments): values against numpy, gradients against jax's unpadded attention."""
    rng = np.random.default_rng(2)
    (length_q, length_kv), shape = lengths, (3, 4, 16)
    q = rng.normal(size=(shape[0], length_q, *shape[1:])).astype(np.float32)
    k, v = (rng.normal(size=(shape[0], length_kv, *shape[1:])).astype(np.float32) for _ in "kv")
    cotangent = rng.normal(size=q.shape).astype(np.float32)

    def padded(q, k, v):
        return jnp.vdot(even_length_attention(q, k, v, causal, implementation="xla"), cotangent)

    def unpadded(q, k, v):
        return jnp.vdot(jax.nn.dot_product_attention(q, k, v, is_causal=causal), cotangent)

    got = jax.jit(lambda q, k, v: even_length_attention(q, k, v, causal, "xla"))(q, k, v)
    assert got.shape == q.shape
    np.testing.assert_allclose(got, reference_attention(q, k, v, causal), rtol=1e-5, atol=1e-6)
    got_grads = jax.jit(jax.grad(padded, argnums=(0, 1, 2)))(q, k, v)
    want_grads = jax.grad(unpadded, argnums=(0, 1, 2))(q, k, v)
    for got_grad, want_grad in zip(got_grads, want_grads):
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "device, dtype, head_dim, words",
    [
        (None, "bfloat16", 64, "needs an NVIDIA GPU, not cpu"),  # this machine's CPU
        (_gpu("gfx90a", "AMD Instinct MI250X"), "bfloat16", 64, "needs an NVIDIA GPU"),
        (_gpu("7.0", "Tesla V100"), "bfloat16", 64, "compute capability >= 8.0"),
        (_gpu("9.0"), "float32", 64, "bfloat16 or float16"),
        (_gpu("9.0"), "bfloat16", 100, "multiple of 8"),
        (_gpu("8.0"), "bfloat16", 256, "at most 128"),
        (_gpu("9.0"), "bfloat16", 64, ""),
        (_gpu("8.6"), jnp.float16, 128, ""),
    ],
)
def test_where_cudnn_attention_applies(device, dtype, head_dim, words):
    problem = cudnn_attention_problem(dtype, head_dim, device)
    assert (problem == "") == (words == "")
    assert words in problem


@pytest.mark.parametrize(
    "implementation, lengths, want",
    [
        # 'auto' keeps to even lengths: the padded kernel has not been run on a GPU yet.
        # What jax 0.11.2 refused on an H200: the text tower's 77 tokens, ViT-B/16's 197.
        ("auto", (50, 50), "cudnn"),  # ViT-B/32
        ("auto", (77, 77), "xla"),
        ("auto", (197, 197), "xla"),
        ("auto", (1, 50), "xla"),  # a ResNet's attention pool
        ("cudnn", (77, 77), "cudnn"),  # padded to 78
        ("xla", (50, 50), "xla"),
    ],
)
def test_which_attention_each_setting_computes(implementation, lengths, want):
    h200 = _gpu("9.0", "NVIDIA H200")
    assert chosen_attention(implementation, "bfloat16", lengths, 64, h200) == want


def test_a_shape_jax_refuses_for_cudnn_is_one_line_naming_the_fix(monkeypatch):
    """jax checks cuDNN's shapes while tracing the train step; its refusal (here, the message
    jax 0.11.2 gave on an H200, raised by a stand-in for jax's function) becomes one line."""
    real = jax.nn.dot_product_attention

    def refusing(q, k, v, *args, implementation=None, **kw):
        if implementation == "cudnn":
            raise NotImplementedError(f"Unsupported sequence length Q {q.shape[1]}, KV 78.")
        return real(q, k, v, *args, implementation=implementation, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", refusing)
    q = jnp.zeros((2, 77, 4, 16), jnp.bfloat16)

    def loss(q):
        return attention(q, q, q, causal=True, implementation="cudnn").astype(float).sum()

    with pytest.raises(AttentionError) as e:
        jax.jit(jax.grad(loss))(q)
    message = str(e.value)
    assert "\n" not in message and "Unsupported sequence length Q 78" in message
    assert "2x77x4x16" in message and "model.attention='xla'" in message


def test_attention_shapes_of_vit_and_resnet_towers():
    # ((query, key) lengths, head dim): ViT (224/14)^2 patches + class token, 1024/16 and
    # 768/12; RN50's pool: its mean token over (224/32)^2 + itself, 32*64/32; text 77 tokens,
    # 512/8.
    text = ((77, 77), 64)
    assert attention_shapes(get_config("ViT-L/14")) == (((257, 257), 64), text)
    assert attention_shapes(get_config("ViT-B/32")) == (((50, 50), 64), text)
    assert attention_shapes(get_config("RN50")) == (((1, 50), 64), text)


def test_cudnn_attention_off_an_nvidia_gpu_is_a_config_error():
    c = config_lib.smoke_variant(config_lib.defaults())
    c.model.attention = "cudnn"
    config_lib.validate(c)  # the device is checked only with the run's devices
    with pytest.raises(config_lib.ConfigError, match="needs an NVIDIA GPU") as e:
        config_lib.validate(c, num_devices=8)
    assert "model.attention='auto'" in str(e.value) and "\n" not in str(e.value)


def test_cudnn_attention_on_the_command_line_off_a_gpu_is_one_line(demo_data_dir, tmp_path):
    done = train_cli(tmp_path, demo_data_dir, "--config.model.attention=cudnn")
    assert_one_line_error(done, "model.attention='cudnn'", "NVIDIA GPU", workdir=str(tmp_path))
