"""Checkpoint conversion: parity with the source frameworks' own outputs (committed
fixtures from tests/fixtures/make_parity_fixtures.py, made with torch, open_clip and
transformers; none of these is needed here), the Hugging Face round trip, and the
one-line errors of the command line."""

import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from clip_jax import convert, pretrained
from clip_jax.models.clip import CLIP
from clip_jax.models.registry import get_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


# name -> (source, format, --model, activation the converter must pick)
SOURCES = {
    "openai_vit": ("openai_vit.safetensors", "openai", None, "quick_gelu"),
    "openai_rn": ("openai_rn.safetensors", "openai", None, "quick_gelu"),
    "open_clip_vit_gelu": (
        "open_clip_vit_gelu.safetensors",
        "open_clip",
        fixture("open_clip_vit_gelu.json"),
        "gelu",
    ),
    "hf_clip": ("hf_clip", "hf", None, "gelu"),
}


def outputs(model, variables, images, tokens):
    out = jax.jit(model.apply)(variables, images, tokens)
    logits = out["logit_scale"] * out["image_emb"] @ out["text_emb"].T
    return {"image_emb": out["image_emb"], "text_emb": out["text_emb"], "logits": logits}


def assert_matches_reference(name, model, variables):
    ref = np.load(fixture(f"{name}_outputs.npz"))
    got = outputs(model, variables, ref["images"], ref["tokens"])
    want = {k: ref[k] for k in ("image_emb", "text_emb")}
    chex.assert_trees_all_close({k: got[k] for k in want}, want, atol=1e-5, rtol=0)
    # Logits carry the logit scale (~14): the same 1e-5 relative to it.
    chex.assert_trees_all_close(got["logits"], ref["logits"], atol=1e-5 * 15, rtol=0)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_converted_models_match_the_source_framework(name, tmp_path):
    source, fmt, model_name, activation = SOURCES[name]
    out = convert.convert(fixture(source), fmt, str(tmp_path / name), model=model_name)
    loaded = pretrained.load(out)
    assert loaded.config.activation == activation
    assert loaded.name == "custom" and loaded.tokenizer is None  # tiny, 500-token vocabulary
    assert set(loaded.variables) == (
        {"params", "batch_stats"} if name == "openai_rn" else {"params"}
    )
    assert_matches_reference(name, CLIP(loaded.config), loaded.variables)


def test_batchnorm_statistics_are_mapped():
    _, _, variables, _ = convert.load_source(fixture("openai_rn.safetensors"), "openai")
    tensors = load_file(fixture("openai_rn.safetensors"))
    stats = variables["batch_stats"]["visual"]
    chex.assert_trees_all_equal(
        stats["layer2_1"]["bn2"]["var"], tensors["visual.layer2.1.bn2.running_var"]
    )
    chex.assert_trees_all_equal(
        stats["layer1_0"]["downsample_bn"]["mean"],
        tensors["visual.layer1.0.downsample.1.running_mean"],
    )


def _shapes_of(name: str, layout: str) -> dict:
    """Zero-memory arrays with the source shapes of a registry model (for config inference)."""
    config = get_config(name)
    targets = {
        k: tuple(v.shape)
        for k, v in convert._flatten(pretrained.abstract_variables(config)).items()
    }
    out = {}
    for e in convert.tensor_map(layout, config):
        shape = convert._SOURCE_SHAPE[e.kind](targets[e.target])
        if e.chunk is not None:
            shape = (3 * shape[0], *shape[1:])
        out[e.source] = np.broadcast_to(np.float32(0), shape)
    return out


@pytest.mark.parametrize("name", ["ViT-B/32", "ViT-L/14", "RN50", "RN50x4"])
def test_openai_architecture_is_read_from_shapes(name):
    config = convert.openai_config(_shapes_of(name, "openai"), "x.pt")
    assert config == get_config(name)
    assert convert.registry_name(config) == name


def test_openclip_names_fix_architecture_and_activation():
    name, config = convert.openclip_config("ViT-B-32")
    assert name == "ViT-B/32" and config.activation == "gelu"
    name, config = convert.openclip_config("RN50-quickgelu")
    assert name == "RN50" and config.activation == "quick_gelu"
    with pytest.raises(convert.ConvertError, match="ViT-X-99"):
        convert.openclip_config("ViT-X-99")


def test_hf_tanh_gelu_is_refused(tmp_path):
    with open(fixture("hf_clip/config.json")) as f:
        cfg = json.load(f)
    assert cfg["text_config"]["hidden_act"] == "gelu"  # exact erf: converted as 'gelu'
    cfg["text_config"]["hidden_act"] = cfg["vision_config"]["hidden_act"] = "gelu_new"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(convert.ConvertError, match="hidden_act text='gelu_new'"):
        convert.hf_config(str(path))


def test_unsupported_openclip_option_is_named(tmp_path):
    with open(fixture("open_clip_vit_gelu.json")) as f:
        cfg = json.load(f)
    cfg["vision_cfg"]["ls_init_value"] = 0.1
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(convert.ConvertError, match=r"vision_cfg\.ls_init_value = 0\.1"):
        convert.openclip_config(str(path))


@pytest.mark.parametrize("name", ["hf_clip", "openai_vit"])
def test_hf_export_round_trips_bitwise(name, tmp_path):
    source, fmt, model_name, _ = SOURCES[name]
    first = convert.convert(fixture(source), fmt, str(tmp_path / "a"), model=model_name)
    hf_dir = convert.export_hf(first, str(tmp_path / "hf"))
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    assert hf["architectures"] == ["CLIPModel"]
    second = convert.convert(hf_dir, "hf", str(tmp_path / "b"))
    a, b = pretrained.load(first), pretrained.load(second)
    assert a.config == b.config
    chex.assert_trees_all_equal(a.variables, b.variables)
    if name == "hf_clip":  # the exported tensors are the source's, by name and value
        src = load_file(fixture("hf_clip/model.safetensors"))
        out = load_file(os.path.join(hf_dir, "model.safetensors"))
        assert set(src) == set(out)
        chex.assert_trees_all_equal({k: v.astype(np.float32) for k, v in src.items()}, out)


def test_hf_export_refuses_a_resnet(tmp_path):
    out = convert.convert(fixture("openai_rn.safetensors"), "openai", str(tmp_path / "rn"))
    with pytest.raises(convert.ConvertError, match="ViT image tower"):
        convert.export_hf(out, str(tmp_path / "hf"))


# ---------------------------------------------------------------- bad input


def _edited_copy(tmp_path, edit) -> str:
    tensors = dict(load_file(fixture("openai_vit.safetensors")))
    edit(tensors)
    path = str(tmp_path / "edited.safetensors")
    save_file(tensors, path)
    return path


def test_missing_tensor_is_named(tmp_path):
    path = _edited_copy(tmp_path, lambda t: t.pop("visual.ln_post.bias"))
    with pytest.raises(convert.ConvertError, match=r"'visual\.ln_post\.bias'.*missing"):
        convert.load_source(path, "openai")


def test_unused_tensor_is_named(tmp_path):
    path = _edited_copy(tmp_path, lambda t: t.update(extra_head=np.zeros((3, 4), np.float32)))
    with pytest.raises(convert.ConvertError, match=r"'extra_head' \(3, 4\) is not used"):
        convert.load_source(path, "openai")


def cli(*args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    res = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, check=False
    )
    return res.returncode, res.stderr


def assert_one_line_error(rc, stderr, *words):
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("convert: error:")]
    assert len(lines) == 1, stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_cli_shape_mismatch_against_the_named_model(tmp_path):
    rc, err = cli(
        "-m",
        "clip_jax.convert",
        f"--source={fixture('open_clip_vit_gelu.safetensors')}",
        "--format=open_clip",
        "--model=ViT-B-32",
        f"--output={tmp_path / 'out'}",
    )
    assert_one_line_error(rc, err, "open_clip_vit_gelu.safetensors", "ViT-B/32", "expects", "shape")


def test_cli_truncated_safetensors(tmp_path):
    path = tmp_path / "cut.safetensors"
    data = open(fixture("openai_vit.safetensors"), "rb").read()
    path.write_bytes(data[: len(data) // 2])
    rc, err = cli(
        "-m", "clip_jax.convert", f"--source={path}", "--format=openai", f"--output={tmp_path}/o"
    )
    assert_one_line_error(rc, err, "cut.safetensors", "safetensors")


def test_cli_unknown_layout(tmp_path):
    rc, err = cli(
        "-m",
        "clip_jax.convert",
        f"--source={fixture('hf_clip/model.safetensors')}",
        "--format=openai",
        f"--output={tmp_path}/o",
    )
    assert_one_line_error(rc, err, "model.safetensors", "unknown layout", "--format=hf")


def test_cli_pt_without_torch(tmp_path):
    # torch made unimportable in the child, as on a machine without the [torch] extra.
    code = (
        "import sys; sys.modules['torch'] = None; from clip_jax.convert import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    rc, err = cli(
        "-c",
        code,
        f"--source={fixture('openai_vit.pt')}",
        "--format=openai",
        f"--output={tmp_path}/o",
    )
    assert_one_line_error(rc, err, "openai_vit.pt", "needs torch", "pip install -e '.[torch]'")


# ---------------------------------------------------------------- torch files (optional)


@pytest.mark.parametrize("name", ["openai_vit", "openai_rn"])
def test_torchscript_archive_matches_reference(name, tmp_path):
    pytest.importorskip("torch")
    out = convert.convert(fixture(f"{name}.pt"), "openai", str(tmp_path / name))
    loaded = pretrained.load(out)
    assert_matches_reference(name, CLIP(loaded.config), loaded.variables)


def test_open_clip_bin_matches_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    tensors = load_file(fixture("open_clip_vit_gelu.safetensors"))
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, path)
    shutil.copy(fixture("open_clip_vit_gelu.json"), tmp_path / "cfg.json")
    _, _, a, _ = convert.load_source(str(path), "open_clip", str(tmp_path / "cfg.json"))
    _, _, b, _ = convert.load_source(
        fixture("open_clip_vit_gelu.safetensors"), "open_clip", str(tmp_path / "cfg.json")
    )
    chex.assert_trees_all_equal(a, b)
