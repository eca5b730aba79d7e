"""`python -m clip_jax.data.prepare --beam_runner=...`: the import on Apache Beam (DirectRunner,
2 worker processes) writes the dataset of the single-process import, from local shards into
a local folder, and from shards in a bucket into a bucket (the GCS emulator) with each worker
writing its own shards there, as on Dataflow; an unreadable shard fails it by name, leaving
nothing that looks prepared."""

import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile

import data_helpers
import fsspec
import pytest
import tensorflow_datasets as tfds
from local_servers import BUCKET

from clip_jax import storage
from clip_jax.data.builders import common
from clip_jax.data.catalog import prepared_dir
from clip_jax.data.errors import DataError
from clip_jax.data.prepare import prepare, prepare_image_text

tfds.disable_progress_bar()

SHARDS = "shard-{00000..00003}.tar"
VAL_FRACTION = 0.2
TWO_WORKERS = "--direct_num_workers=2 --direct_running_mode=multi_processing"
# make_cases' broken files and the reason each is skipped for.
SKIP_REASON = {
    "k10_corrupt_jpeg": "corrupt image",
    "k11_truncated_png": "truncated image",
    "k12_zero_byte": "empty image file",
    "k13_empty_caption": "empty caption",
    "k14_no_caption": "missing caption",
    "k15_text_not_image": "corrupt image",
}


def held_out(key: str) -> bool:
    """The documented hold-out rule: sha256(key)'s first 8 bytes below fraction * 2**64."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") < VAL_FRACTION * 2**64


def prepare_cli(source_dir, data_dir, name, *flags):
    cmd = [sys.executable, "-m", "clip_jax.data.prepare", f"--name={name}"]
    cmd += [f"--data_dir={data_dir}", f"--val_fraction={VAL_FRACTION}", *flags]
    cmd += ["--source", os.path.join(source_dir, SHARDS)]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=300)


def records(name, data_dir, split):
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    # One at a time: array_record's parallel reads take ~0.1 s a record from the emulator.
    rows = [ds[i] for i in range(len(ds))]
    return [(r["key"].decode(), [c.decode() for c in r["caption"]], r["image"]) for r in rows]


def cut_inside_a_member(path):
    """Cuts the tar short in the middle of a file's data, as a broken download. (A tar cut
    at a member boundary reads as a shorter, valid one: tar has no length or checksum.)"""
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    member = next(m for m in members[len(members) // 2 :] if m.size > 100)
    with open(path, "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)


def bucket_files(url):
    """Every object under the bucket folder `url`, as paths relative to it."""
    fs, root = fsspec.core.url_to_fs(url)
    return sorted(f[len(root) + 1 :] for f in fs.find(root))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """500 pairs in 4 img2dataset shards; 3 in 8 are broken (make_cases' bad files)."""
    folder = str(tmp_path_factory.mktemp("shards"))
    return folder, data_helpers.write_shards(folder, shards=4, pairs=125)


@pytest.fixture(scope="module")
def single(shards, tmp_path_factory):
    """The single-process import of the shards into a local folder: (data_dir, summary)."""
    d = str(tmp_path_factory.mktemp("single_tfds"))
    source = os.path.join(shards[0], SHARDS)
    return d, prepare_image_text("single", source, d, val_fraction=VAL_FRACTION, verbose=False)


def test_beam_import_writes_the_single_process_dataset(shards, single, tmp_path):
    folder, cases = shards
    single_dir, single = single
    d = str(tmp_path / "tfds")
    res = prepare_cli(
        folder, d, "beamed", "--beam_runner=DirectRunner", f"--beam_options={TWO_WORKERS}"
    )
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "validation: " in res.stdout
    with open(os.path.join(prepared_dir("beamed", d), "import_summary.json")) as f:
        beamed = json.load(f)

    good = [c for c in cases if c["good"]]
    for split in ("train", "validation"):
        # Source order, the hold-out by the key hash, the original bytes and captions.
        expected = [
            (c["key"], [c["caption"]], c["data"])
            for c in good
            if held_out(c["key"]) == (split == "validation")
        ]
        assert 40 <= len(expected) <= len(good) - 40
        assert records("single", single_dir, split) == expected
        assert records("beamed", d, split) == expected
        assert beamed["splits"][split]["examples"] == len(expected)
        assert beamed["image_bytes"][split] == sum(len(data) for _, _, data in expected)
    bad = [c["key"].split("_", 2)[2] for c in cases if not c["good"]]  # s0_0010_k10_corrupt_jpeg
    reasons = collections.Counter(SKIP_REASON[key] for key in bad)
    assert sum(reasons.values()) == 180
    assert beamed["skipped"] == single["skipped"] == dict(reasons)
    for field in ("splits", "skipped_examples", "image_bytes", "reencoded", "notes"):
        assert beamed[field] == single[field], field


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_unreadable_shards_fail_the_beam_import_by_name_and_leave_nothing(
    where, shards, tmp_path, request
):
    folder = str(tmp_path / "shards")
    shutil.copytree(shards[0], folder)
    for bad in ("shard-00002.tar", "shard-00003.tar"):
        cut_inside_a_member(os.path.join(folder, bad))
    source, d = folder, str(tmp_path / "tfds")
    if where == "bucket":
        request.getfixturevalue("gcs")
        source, d = f"gs://{BUCKET}/broken/shards", f"gs://{BUCKET}/broken/tfds"
        storage.upload_tree(folder, source)
    res = prepare_cli(
        source, d, "broken", "--beam_runner=DirectRunner", f"--beam_options={TWO_WORKERS}"
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    # Both named: the workers read every shard (the first is named, the others counted).
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot read tar file {source}/shard-00002.tar: "), last
    assert last.endswith(f"and 1 more unreadable source(s): {source}/shard-00003.tar"), last
    # Nothing that looks prepared: no version folder, no staging or temporary folder left.
    assert prepared_dir("broken", d) is None
    if where == "bucket":
        assert bucket_files(d) == []
        return
    assert not os.path.exists(os.path.join(d, "broken")) or not os.listdir(
        os.path.join(d, "broken")
    )
    with pytest.raises(Exception, match="broken"):
        tfds.data_source("broken", split="train", data_dir=d, download=False)


def test_beam_flags_are_checked_before_reading(shards, tmp_path):
    folder = shards[0]
    d = str(tmp_path / "tfds")
    res = prepare_cli(
        folder, d, "typo", "--beam_runner=DirectRunner", "--beam_options=--num_worker=4"
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("error: unknown --beam_options --num_worker; check the spelling")
    assert res.stderr.count("\n") == 1
    source = os.path.join(folder, SHARDS)
    with pytest.raises(DataError, match="unknown --beam_runner 'Sparks'; pass DirectRunner"):
        prepare_image_text("x", source, d, beam_runner="Sparks")
    with pytest.raises(DataError, match="--beam_options needs --beam_runner"):
        prepare_image_text("x", source, d, beam_options="--direct_num_workers=2")
    # Dataflow's workers share no disk: local paths are refused before anything is read.
    dataflow = dict(beam_runner="DataflowRunner", beam_options="--temp_location=gs://b/tmp")
    with pytest.raises(DataError, match=f"workers cannot read the local --source {source}; copy"):
        prepare("x", "gs://b/tfds", source, **dataflow)
    with pytest.raises(DataError, match=f"workers cannot write the local --data_dir {d}; pass"):
        prepare("x", d, "gs://b/shards/s.tar", **dataflow)
    with pytest.raises(DataError, match="add --temp_location=gs://BUCKET/beam_tmp to --beam_opt"):
        prepare("x", "gs://b/tfds", "gs://b/shards/s.tar", beam_runner="DataflowRunner")
    # array_record cannot read a dataset from s3://: refused before the bucket is reached.
    with pytest.raises(storage.StorageError, match="s3://b/tfds: array_record reads dataset"):
        prepare("x", "s3://b/tfds", source, beam_runner="DirectRunner")
    with pytest.raises(DataError, match="clip_demo is generated in one process"):
        prepare("clip_demo", d, beam_runner="DirectRunner")
    assert not os.path.exists(d)


@pytest.fixture
def bucket_shards(gcs, shards):
    """The shards uploaded to the emulated bucket: the folder's URL."""
    url = f"gs://{BUCKET}/beam/shards"
    storage.upload_tree(shards[0], url)
    return url


def test_beam_import_from_and_into_a_bucket(bucket_shards, single, monkeypatch, tmp_path):
    """Shards and data_dir in the bucket, as on Dataflow: the local single-process dataset,
    written by the workers into the bucket, with nothing left beside it."""
    single_dir, single = single
    d = f"gs://{BUCKET}/beam/tfds"
    worker_tmp = tmp_path / "worker_tmp"
    worker_tmp.mkdir()
    with monkeypatch.context() as m:
        # Worker processes import clip_jax afresh, so this stops shard writes in this process
        # only: the dataset below is written by the workers, straight into the bucket.
        m.setattr(common.BucketWriter, "write", lambda *a: pytest.fail("the launcher wrote"))
        m.setenv("TMPDIR", str(worker_tmp))  # read by the workers, started after this
        beamed = prepare(
            "beamed",
            d,
            f"{bucket_shards}/{SHARDS}",
            val_fraction=VAL_FRACTION,
            beam_runner="DirectRunner",
            beam_options="--direct_num_workers=2",
            verbose=False,
        )
    path = f"{d}/beamed/1.0.0"
    assert beamed["path"] == prepared_dir("beamed", d) == path
    for split in ("train", "validation"):
        assert records("beamed", d, split) == records("single", single_dir, split)
    for field in ("splits", "skipped", "skipped_examples", "image_bytes", "reencoded", "notes"):
        assert beamed[field] == single[field], field
    assert json.loads(storage.read_text(f"{path}/import_summary.json")) == beamed
    # The version folder and nothing else: no staging or temporary folder in the bucket,
    # and no shard or staging file left in the workers' local temporary folder.
    expected = [
        "beamed-train.array_record-00000-of-00001",
        "beamed-validation.array_record-00000-of-00001",
        "dataset_info.json",
        "features.json",
        "import_summary.json",
        "metadata.json",
    ]
    assert bucket_files(d) == [f"beamed/1.0.0/{f}" for f in expected]
    assert not [f for _, _, files in os.walk(worker_tmp) for f in files]

    # The single-process import from the bucket replaces it with the same dataset.
    source = f"{bucket_shards}/{SHARDS}"
    again = prepare("beamed", d, source, val_fraction=VAL_FRACTION, overwrite=True, verbose=False)
    assert again["path"] == path and again["splits"] == single["splits"]
    assert records("beamed", d, "validation") == records("single", single_dir, "validation")
    assert bucket_files(d) == [f"beamed/1.0.0/{f}" for f in expected]
