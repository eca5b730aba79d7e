"""The attention core: the XLA path against a numpy reference (with the text tower's causal
mask), where cuDNN's fused kernel applies, and `model.attention='cudnn'` off an NVIDIA GPU."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cli_errors import assert_one_line_error, train_cli

from clip_jax import config as config_lib
from clip_jax.models.clip import attention_shapes
from clip_jax.models.layers import attention, cudnn_attention_problem
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
    "device, dtype, seq_len, head_dim, words",
    [
        (None, "bfloat16", 50, 64, "needs an NVIDIA GPU, not cpu"),  # this machine's CPU
        (_gpu("gfx90a", "AMD Instinct MI250X"), "bfloat16", 50, 64, "needs an NVIDIA GPU"),
        (_gpu("7.0", "Tesla V100"), "bfloat16", 50, 64, "compute capability >= 8.0"),
        (_gpu("9.0"), "float32", 50, 64, "bfloat16 or float16"),
        (_gpu("9.0"), "bfloat16", 50, 100, "multiple of 8"),
        (_gpu("8.0"), "bfloat16", 50, 256, "at most 128"),
        # What jax 0.11.2 refused on an H200: the text tower's 77 tokens, ViT-B/16's 197.
        (_gpu("9.0", "NVIDIA H200"), "bfloat16", 77, 64, "even sequence length to train, not 77"),
        (_gpu("9.0", "NVIDIA H200"), "bfloat16", 197, 64, "not 197"),
        (_gpu("9.0"), "bfloat16", 50, 64, ""),
        (_gpu("8.6"), jnp.float16, 256, 128, ""),
    ],
)
def test_where_cudnn_attention_applies(device, dtype, seq_len, head_dim, words):
    problem = cudnn_attention_problem(dtype, seq_len, head_dim, device)
    assert (problem == "") == (words == "")
    assert words in problem


def test_attention_shapes_of_vit_and_resnet_towers():
    # (sequence length, head dim): ViT (224/14)^2 patches + class token, 1024/16 and 768/12;
    # RN50's pool over (224/32)^2 + mean token, 32*64/32; text 77 tokens, 512/8.
    assert attention_shapes(get_config("ViT-L/14")) == ((257, 64), (77, 64))
    assert attention_shapes(get_config("ViT-B/32")) == ((50, 64), (77, 64))
    assert attention_shapes(get_config("RN50")) == ((50, 64), (77, 64))


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
