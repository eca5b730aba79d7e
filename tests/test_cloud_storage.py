"""Workdirs and datasets in buckets, against real object-store servers on 127.0.0.1.

GCS (gcp-storage-emulator) end to end: a demo smoke run whose workdir and data_dir are in
the bucket writes its checkpoints, metrics.jsonl, config.json and eval JSON there, is
SIGTERMed, resumes from the bucket with exactly the losses and parameters of an
uninterrupted local run, and is evaluated by `python -m clip_jax.evaluate --workdir=gs://...`.
JSONL/CSV sources in the bucket read as their local copies, and a dataset moved into place
gets its dataset_info.json last (imports of tar shards in a bucket: tests/test_beam_import.py).
S3 (moto) for the files our code writes itself, and the one-line errors: an unreachable
endpoint, missing credentials, a client package that is not installed, and the s3://
workdir that orbax cannot checkpoint to.
"""

import json
import os
import re
import signal
import subprocess
import sys

import chex
import data_helpers
import pytest
from local_servers import BUCKET, free_port
from one_process import TOTAL_STEPS, start_training
from test_predict import run_predict, save_tiny_pretrained, write_images
from test_train import DEMO

from clip_jax import storage
from clip_jax.data.builders import image_text, sources
from clip_jax.metric_writers import METRICS_FILE


@pytest.fixture(scope="module")
def s3_url():
    from moto.server import ThreadedMotoServer  # noqa: PLC0415 (test-only server)

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def no_aws_config(monkeypatch):
    """No credentials or profiles from this machine, and no instance-metadata lookups."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_REGION", "us-east-1")


@pytest.fixture
def s3(s3_url, monkeypatch):
    no_aws_config(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    import boto3  # noqa: PLC0415 (test-only client, to make the bucket)

    client = boto3.client("s3")
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    return s3_url


def bucket_metrics(workdir) -> list[dict]:
    return [
        json.loads(line) for line in storage.read_text(f"{workdir}/{METRICS_FILE}").splitlines()
    ]


def cli_error(args, env_changes=None, prelude=""):
    """(exit status, stderr) of a command line run in a fresh process."""
    env = {**os.environ, **(env_changes or {})}
    code = (
        f"{prelude}import runpy, sys; sys.argv = {args!r}; "
        f"runpy.run_module({args[0]!r}, run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    return proc.returncode, proc.stderr


def assert_one_line_error(status, stderr, *words):
    assert status == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    for word in words:
        assert word in lines[0], stderr


# One test process runs this and test_preemption: they share the session's uninterrupted
# run (conftest). The other tests here go wherever xdist puts them.
@pytest.mark.xdist_group("uninterrupted_run")
def test_gcs_workdir_and_data_train_preempt_resume_evaluate(gcs, demo_data_dir, reference):
    data_dir = demo_data_dir
    # The local demo dataset (the reference run's, tokenizer included) copied to the bucket.
    remote_data = f"gs://{BUCKET}/tfds"
    storage.upload_tree(os.path.join(data_dir, "clip_demo"), f"{remote_data}/clip_demo")
    workdir = f"gs://{BUCKET}/run"

    proc = start_training(workdir, remote_data, "--config.checkpoint.every_steps=4")
    for line in proc.stdout:  # the progress lines; step 5 comes after the save of step 4
        if line.startswith("step 5/"):
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = int(re.search(r"saved step (\d+), exiting", out).group(1))
    assert 4 <= saved < TOTAL_STEPS, out
    assert storage.path(f"{workdir}/checkpoints/{saved}").is_dir()

    task = "zeroshot:clip_demo@test"  # the resumed run also evaluates at its last step
    done = start_training(
        workdir, remote_data, "--config.checkpoint.every_steps=4", f"--config.eval.tasks={task}"
    )
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 0, out
    assert f"resumed from step {saved} in {workdir}" in out

    # Bitwise: same devices, program, data order and RNG as the uninterrupted local run.
    ref_losses, _ = reference
    rows = [r for r in bucket_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, TOTAL_STEPS + 1))  # each step once
    chex.assert_trees_all_equal({r["step"]: r["loss"] for r in rows}, ref_losses)
    assert json.loads(storage.read_text(f"{workdir}/config.json"))["total_steps"] == TOTAL_STEPS

    eval_json = f"{workdir}/eval/{TOTAL_STEPS}/zeroshot_clip_demo_test.json"
    trained = json.loads(storage.read_text(eval_json))
    storage.path(eval_json).unlink()
    evaluated = subprocess.run(
        [sys.executable, "-m", "clip_jax.evaluate", f"--workdir={workdir}", f"--tasks={task}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    again = json.loads(storage.read_text(eval_json))
    again.pop("time_s"), trained.pop("time_s")  # wall time; every metric must match exactly
    assert again == trained


def test_s3_files_round_trip_and_workdir_is_refused_in_one_line(s3, tmp_path):
    # Files that clip_jax writes itself work on S3 ...
    target = f"s3://{BUCKET}/notes/class_names.txt"
    storage.write_text(target, "cat\ndog\n")
    from clip_jax.eval.classnames import read_names_file  # noqa: PLC0415 (after the env is set)

    assert read_names_file(target) == ["cat", "dog"]
    # ... checkpoints cannot go there: one line, exit 2, before anything compiles.
    status, err = cli_error(
        ["clip_jax.train", f"--config={DEMO}:smoke", f"--workdir=s3://{BUCKET}/run"]
    )
    assert_one_line_error(status, err, f"s3://{BUCKET}/run", "orbax", "gs://")


def test_s3_missing_credentials_and_unreachable_endpoint(s3_url, monkeypatch):
    no_aws_config(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_url)
    args = ["clip_jax.train", f"--config={DEMO}:smoke", f"--workdir=s3://{BUCKET}/run"]
    status, err = cli_error(args)
    assert_one_line_error(status, err, f"s3://{BUCKET}/run", "AWS_ACCESS_KEY_ID")

    unreachable = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    status, err = cli_error(args, unreachable)
    assert_one_line_error(status, err, f"s3://{BUCKET}/run", "unreachable", "AWS_ENDPOINT_URL")


def test_predict_from_a_bucket_gives_the_local_predictions(gcs, tmp_path):
    """A pretrained directory and an image folder in the bucket: the same output as the
    local copies they were uploaded from (the broken image skipped in both)."""
    directory, _, _ = save_tiny_pretrained(str(tmp_path / "tiny"))
    (tmp_path / "images").mkdir()
    images = write_images(tmp_path / "images")
    storage.upload_tree(directory, f"gs://{BUCKET}/pretrained/tiny")
    storage.upload_tree(str(images), f"gs://{BUCKET}/images")
    args = ("--labels=a dog,a cat,a red car", "--top_k=2", "--json")
    outputs = []
    for checkpoint, folder in (
        (directory, images),
        (f"gs://{BUCKET}/pretrained/tiny", f"gs://{BUCKET}/images"),
    ):
        rc, out, err = run_predict(f"--checkpoint={checkpoint}", f"--images={folder}", *args)
        assert rc == 0 and "Traceback" not in err, err
        assert "broken.jpg" in err
        rows = json.loads(out)
        outputs.append({os.path.basename(r.pop("image")): r for r in rows})
    local, remote = outputs
    assert set(remote) == {"a.png", "b.jpg", "broken.jpg"}
    assert remote == local


def test_gcs_unreachable_endpoint_is_one_line_without_the_retry_traceback():
    """gcsfs logs a request out of retries with its traceback before raising: not shown."""
    args = ["clip_jax.train", f"--config={DEMO}:smoke", "--workdir=gs://no-bucket/run"]
    endpoint = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{free_port()}"}
    status, err = cli_error(args, endpoint)
    assert_one_line_error(status, err, "gs://no-bucket/run", "unreachable", "STORAGE_EMULATOR_HOST")
    assert "out of retries" not in err


@pytest.mark.parametrize("scheme,package", [("gs", "gcsfs"), ("s3", "s3fs")])
def test_bucket_path_without_its_client_package(scheme, package, tmp_path):
    blocked = f"import sys; sys.modules[{package!r}] = None; "  # `import gcsfs` now fails
    status, err = cli_error(
        ["clip_jax.train", f"--config={DEMO}:smoke", f"--workdir={scheme}://{BUCKET}/run"],
        prelude=blocked,
    )
    assert_one_line_error(status, err, f"{scheme}://{BUCKET}/run", package, "pip install")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_table_in_a_bucket_reads_as_its_local_copy(gcs, tmp_path, fmt):
    """A table naming images beside it, uploaded: the same candidates, examples and skip
    reasons as the local folder (a missing image and a path outside the folder included)."""
    folder = str(tmp_path / fmt)
    table = data_helpers.write_table(folder, data_helpers.make_cases(), fmt)
    extra = [("images/missing.jpg", "gone"), ("../outside.jpg", "out")]
    with open(table, "a", encoding="utf-8") as f:
        for image, caption in extra:
            row = {"image": image, "caption": caption}
            f.write(json.dumps(row) + "\n" if fmt == "jsonl" else f"{image},{caption}\n")
    url = f"gs://{BUCKET}/tables/{fmt}"
    storage.upload_tree(folder, url)
    assert sources.expand_sources(url) == [f"{url}/captions.{fmt}"]
    assert sources.expand_sources(f"{url}/*.{fmt}") == [f"{url}/captions.{fmt}"]

    check = image_text.Checker(image_text.ImportConfig(sources=[]))
    read = sources.ReadOptions()

    def checked(path):
        assert sources.check_source(path, read)
        return [(c.key, c.origin, *check(c)) for c in sources.iter_source(path, read)]

    remote = checked(f"{url}/captions.{fmt}")
    assert remote == checked(table)
    reasons = {
        note.split(" (")[0].split(":")[0] for _, _, example, note in remote if example is None
    }
    assert {
        "missing image file",
        "corrupt image",
        "image path outside the table's folder",
    } <= reasons
    assert sum(example is not None for _, _, example, _ in remote) >= 8


def test_move_tree_failing_part_way_leaves_no_last_file(gcs, monkeypatch):
    """A dataset moved into place whose move fails part-way never gets its dataset_info.json
    (tfds' own folder rename copies objects in no set order)."""
    src, dst = f"gs://{BUCKET}/move/staged", f"gs://{BUCKET}/move/published"
    names = ["a-train.array_record-00000-of-00002", "b-train.array_record-00001-of-00002"]
    for name in [*names, "dataset_info.json", "features.json"]:
        storage.write_text(f"{src}/{name}", name)
    import gcsfs  # noqa: PLC0415 (a client of the emulated bucket, after the env is set)

    original = gcsfs.GCSFileSystem._cp_file

    async def copy_but_one(self, path1, path2, **kwargs):
        if path1.endswith(names[1]):
            raise OSError("connection reset")
        return await original(self, path1, path2, **kwargs)

    with monkeypatch.context() as m, pytest.raises(storage.StorageError, match=f"move to {dst} "):
        m.setattr(gcsfs.GCSFileSystem, "_cp_file", copy_but_one)
        storage.move_tree(src, dst, last="dataset_info.json")
    assert not storage.is_file(f"{dst}/dataset_info.json")
    assert storage.is_file(f"{src}/dataset_info.json")  # nothing deleted before the end

    storage.move_tree(src, dst, last="dataset_info.json")
    assert storage.read_text(f"{dst}/dataset_info.json") == "dataset_info.json"
    assert not storage.path(src).exists()


def test_convert_writes_both_directions_into_a_bucket(gcs, tmp_path):
    """`python -m clip_jax.convert --output=gs://...`: a pretrained directory and a Hugging
    Face export in the bucket, equal to the ones written locally."""
    from test_convert import SOURCES, fixture  # noqa: PLC0415 (the converter's fixtures)

    from clip_jax import convert, pretrained  # noqa: PLC0415 (after the env is set)

    source, fmt, _, _ = SOURCES["hf_clip"]
    local = convert.convert(fixture(source), fmt, str(tmp_path / "pretrained"))
    local_hf = convert.export_hf(local, str(tmp_path / "hf"))
    remote, remote_hf = f"gs://{BUCKET}/convert/pretrained", f"gs://{BUCKET}/convert/hf"
    for args in (
        ["--source", fixture(source), "--format", fmt, "--output", remote],
        ["--to", "hf", "--source", remote, "--output", remote_hf],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "clip_jax.convert", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stdout.strip() == f"wrote {args[-1]}"
    chex.assert_trees_all_equal(pretrained.load(remote).variables, pretrained.load(local).variables)
    for name in ("model.safetensors", "config.json"):
        with open(os.path.join(local_hf, name), "rb") as f:
            assert storage.path(f"{remote_hf}/{name}").read_bytes() == f.read(), name
    # A second export into the same folder is refused, as locally.
    status, err = cli_error(
        ["clip_jax.convert", "--to=hf", f"--source={remote}", f"--output={remote_hf}"]
    )
    assert status == 2 and "Traceback" not in err and "not empty" in err, err
