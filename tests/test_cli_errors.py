"""The command lines tried from the outside, as a new user would: every error a user can cause
is one line, `error: ...`, with exit status 2 and no traceback, and it comes before anything
compiles or trains. Each case runs the real `python -m clip_jax.<command>` in a subprocess.

The damaged-checkpoint restart has its own file, test_checkpoint_fallback.py.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from data_helpers import solid_png, write_tar_members
from test_train import DEMO, smoke

from clip_jax import train as train_lib
from clip_jax.data import info, prepare
from clip_jax.data.bpe import ClipBPETokenizer
from clip_jax.data.tokenizer import load_tokenizer
from clip_jax.data.truncation import truncated

ABSL_LOG_LINE = re.compile(r"^[IWEF]\d{4} ", re.MULTILINE)


def run_cli(module, *args, timeout=300):
    # Inherits XLA_FLAGS from conftest: the same 8 simulated devices.
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout
    )


def train_cli(workdir, data_dir, *args):
    return run_cli(
        "clip_jax.train",
        f"--config={DEMO}:smoke",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.total_steps=1",
        *args,
    )


def assert_one_line_error(done, *words, workdir=None):
    """Exit 2, one `error:` line holding every word, no traceback, nothing trained (no step
    logged, no checkpoint in ``workdir``)."""
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert not re.search(r"^step \d+/", done.stdout, re.MULTILINE), "it trained first"
    if workdir is not None:
        assert not glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")), "it trained first"
    return errors[0]


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.name=ViT-X/99", ["model.name", "ViT-X/99", "tiny-vit"]),
        ("unknown_key=1", ["unknown config key 'unknown_key'", "known keys"]),
        ("optim.learning_rate=1e-3", ["unknown config key 'optim.learning_rate'", "lr"]),
        ("optim.lrr=1e-3", ["did you mean 'optim.lr'"]),
        ("optim.lr.value=1", ["'optim.lr' has no sub-keys"]),
    ],
)
def test_bad_config_key_or_model(override, words, demo_data_dir, tmp_path):
    assert_one_line_error(train_cli(tmp_path, demo_data_dir, f"--config.{override}"), *words)


@pytest.mark.parametrize(
    "override, allowed",
    [
        ("optim.lr=-1", "> 0"),
        ("optim.weight_decay=-0.1", ">= 0"),
        ("optim.b1=1.0", "in [0, 1)"),
        ("optim.b2=-0.5", "in [0, 1)"),
        ("optim.eps=0.0", "> 0"),
        ("optim.end_lr_ratio=1.5", "in [0, 1]"),
        ("optim.grad_clip_norm=-1.0", ">= 0"),
        ("data.prefetch=0", ">= 1"),
        ("data.num_workers=-1", ">= 0"),
        ("checkpoint.every_steps=0", ">= 1"),
        ("eval.every_steps=-5", ">= 0"),
        ("eval.linear_probe.val_fraction=1.0", "in (0, 1)"),
        ("eval.zeroshot.ks=(0,5)", ">= 1"),
    ],
)
def test_out_of_range_value_names_key_value_and_range(override, allowed, demo_data_dir, tmp_path):
    key = override.split("=")[0]
    done = train_cli(tmp_path, demo_data_dir, f"--config.{override}")
    assert_one_line_error(done, f"config key '{key}' is ", "allowed", allowed)


def test_missing_config_file(tmp_path):
    done = run_cli("clip_jax.train", "--config=/no/such/config.py", f"--workdir={tmp_path}")
    assert_one_line_error(done, "/no/such/config.py", "no config file")


def test_workdir_that_is_a_file(demo_data_dir, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    assert_one_line_error(train_cli(a_file, demo_data_dir), str(a_file), "is a file")


def _read_only_mount_works():
    """A read-only bind mount in a user namespace (no root needed where it is allowed)."""
    if not shutil.which("unshare"):
        return False
    probe = "mount --bind /tmp /tmp && mount -o remount,bind,ro /tmp"
    return (
        subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0
    )


@pytest.mark.skipif(not _read_only_mount_works(), reason="needs unshare with mount namespaces")
def test_workdir_on_a_read_only_file_system(demo_data_dir, tmp_path):
    workdir = tmp_path / "ro"
    workdir.mkdir()
    command = " ".join(
        [
            f"mount --bind {workdir} {workdir} && mount -o remount,bind,ro {workdir} &&",
            sys.executable,
            "-m clip_jax.train",
            f"--config={DEMO}:smoke --workdir={workdir}",
            f"--config.data.data_dir={demo_data_dir}",
        ]
    )
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, timeout=300
    )
    assert_one_line_error(done, str(workdir), "Read-only file system", "writable")


@pytest.fixture(scope="module")
def imported_data_dir(tmp_path_factory):
    """An image-text dataset imported from a tar shard, with no tokenizer trained for it."""
    root = tmp_path_factory.mktemp("imported")
    members = []
    for i in range(12):
        members += [(f"{i:03d}.png", solid_png((20 * i, 0, 0))), (f"{i:03d}.txt", b"a red square")]
    shard = write_tar_members(str(root / "pairs.tar"), members)
    data_dir = str(root / "tfds")
    prepare.prepare("my_pairs", data_dir, [shard], val_fraction=0.0)
    return data_dir


def test_imported_dataset_without_a_tokenizer(imported_data_dir, tmp_path):
    done = train_cli(tmp_path, imported_data_dir, "--config.data.name=my_pairs")
    assert_one_line_error(done, "tokenizer.path", "python -m clip_jax.data.tokenizer", "my_pairs")


@pytest.mark.parametrize(
    "overrides, words",
    [
        (
            ["eval.tasks=zeroshot:never_prepared"],
            ["zeroshot:never_prepared", "not prepared", "python -m clip_jax.data.prepare"],
        ),
        (["eval.tasks=zeroshot:clip_demo@no_such_split"], ["no_such_split", "available"]),
        (
            ["eval.tasks=zeroshot:clip_demo@test", "eval.zeroshot.class_names=/no/names.txt"],
            ["class names file", "/no/names.txt"],
        ),
        (
            ["eval.tasks=zeroshot:clip_demo@test", "eval.zeroshot.templates=/no/templates.txt"],
            ["template", "/no/templates.txt"],
        ),
        (["eval.tasks=zeroshot"], ["eval.tasks", "KIND:DATASET"]),
    ],
)
def test_evaluation_tasks_are_checked_before_training(overrides, words, demo_data_dir, tmp_path):
    args = [f"--config.{o}" for o in overrides]
    assert_one_line_error(train_cli(tmp_path, demo_data_dir, *args), *words, workdir=tmp_path)


@pytest.fixture(scope="module")
def trained_workdir(demo_data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("trained"))
    train_lib.train(smoke(DEMO, demo_data_dir, total_steps=1), workdir)
    return workdir


def test_evaluate_prints_its_table_only_and_takes_class_names(
    trained_workdir, demo_data_dir, tmp_path
):
    names = info.dataset_info("clip_demo", demo_data_dir)["class_names"]
    names_file = tmp_path / "names.txt"
    names_file.write_text("".join(f"{n.replace('_', ' ')}\n" for n in names))
    done = run_cli(
        "clip_jax.evaluate",
        f"--workdir={trained_workdir}",
        "--tasks=zeroshot:clip_demo@test",
        f"--class_names={names_file}",
    )
    assert done.returncode == 0, done.stderr
    assert not ABSL_LOG_LINE.search(done.stdout + done.stderr), done.stderr
    assert done.stdout.startswith("evaluation at step 1\n"), done.stdout
    with open(os.path.join(trained_workdir, "eval", "1", "zeroshot_clip_demo_test.json")) as f:
        result = json.load(f)
    assert result["class_names_source"] == f"file {names_file}"
    assert result["num_classes"] == len(names)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--class_names=/no/names.txt"], ["class names file", "/no/names.txt"]),
        (["--config.unknown_key=1"], ["unknown config key 'unknown_key'"]),
        ([f"--config={DEMO}:smoke", "--config.optim.lrr=1"], ["did you mean 'optim.lr'"]),
        (["--config=/no/such/config.py"], ["/no/such/config.py", "no config file"]),
    ],
)
def test_evaluate_errors(args, words, trained_workdir):
    done = run_cli(
        "clip_jax.evaluate",
        f"--workdir={trained_workdir}",
        "--tasks=zeroshot:clip_demo@test",
        *args,
    )
    assert_one_line_error(done, *words)


def test_truncation_and_small_validation_split_are_reported(demo_data_dir, tmp_path):
    """Context 6 cuts most demo captions and every zero-shot prompt; the 48-example
    validation split is smaller than eval.batch_size=64 and still gives a validation loss."""
    done = train_cli(
        tmp_path,
        demo_data_dir,
        "--config.tokenizer.context_length=6",
        "--config.eval.batch_size=64",
        "--config.eval.tasks=zeroshot:clip_demo@test",
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    found = re.search(
        r"tokenizer\.context_length=6 \(cut\): ([\d.]+)% of (\d+) captions", done.stdout
    )
    assert found, done.stdout
    assert 0 < float(found.group(1)) <= 100
    prompts = [line for line in done.stderr.splitlines() if "zero-shot prompts are longer" in line]
    assert len(prompts) == 1 and "reads" in prompts[0], done.stderr
    small = [line for line in done.stderr.splitlines() if "validation split" in line]
    assert len(small) == 1 and "batches of 48" in small[0], done.stderr
    with open(tmp_path / "metrics.jsonl") as f:
        val_losses = [row["val/loss"] for row in map(json.loads, f) if "val/loss" in row]
    assert len(val_losses) == 1 and np.isfinite(val_losses[0])


def test_truncated_matches_the_token_counts(demo_data_dir):
    """A text is cut exactly when its token count exceeds context_length - 2 (BOT and EOT)."""
    texts = ["a", "a red square", "one two three four", "one two three four five six seven"]
    spm_tok = load_tokenizer("", dataset="clip_demo", data_dir=demo_data_dir, context_length=6)
    counts = [len(spm_tok._sp.encode(spm_tok.normalize(t))) for t in texts]
    np.testing.assert_array_equal(truncated(spm_tok, texts), np.array(counts) > 4)
    bpe = ClipBPETokenizer(context_length=6)
    counts = [len(bpe.text_ids(t)) for t in texts]
    np.testing.assert_array_equal(truncated(bpe, texts), np.array(counts) > 4)


def test_evaluate_a_damaged_checkpoint(trained_workdir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    loader_json = workdir / "checkpoints" / "1" / "loader" / "metadata"
    os.truncate(loader_json, os.path.getsize(loader_json) // 2)
    done = run_cli("clip_jax.evaluate", f"--workdir={workdir}", "--tasks=zeroshot:clip_demo@test")
    assert_one_line_error(done, "checkpoint step 1 does not restore", "JSONDecodeError")


def test_streaming_without_gradient_caching(demo_data_dir, tmp_path):
    done = train_cli(tmp_path, demo_data_dir, "--config.stream_micro_batches=True")
    assert_one_line_error(
        done, "stream_micro_batches=True", "set micro_batch_size", workdir=str(tmp_path)
    )
