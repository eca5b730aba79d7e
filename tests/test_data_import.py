"""Import of image-text sources (webdataset tar, JSONL, CSV) into tfds ArrayRecord."""

import io
import os
import subprocess
import sys
import tarfile

import data_helpers
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clip_jax.data import images
from clip_jax.data.builders.image_text import in_validation
from clip_jax.data.builders.sources import expand_braces
from clip_jax.data.errors import DataError, DatasetNotPreparedError
from clip_jax.data.pipeline import dataset_info, eval_loader, read_captions
from clip_jax.data.prepare import prepare_image_text

tfds.disable_progress_bar()

GOOD_KINDS = {
    "empty image file",
    "corrupt image",
    "truncated image",
    "empty caption",
    "missing caption",
}


def _read_all(name, data_dir, split="train"):
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    # Keys: the webdataset key, or (JSONL/CSV) the image path, e.g. images/k00_rgb_jpeg.jpg.
    return {
        os.path.splitext(os.path.basename(r["key"].decode()))[0]: r
        for r in ds.__getitems__(list(range(len(ds))))
    }


def _check_import(summary, records, cases):
    good = [c for c in cases if c["good"]]
    bad = [c for c in cases if not c["good"]]
    assert summary["splits"]["train"]["examples"] == len(good) == len(records)
    assert sum(summary["skipped"].values()) == len(bad)
    assert set(summary["skipped"]) <= GOOD_KINDS
    skipped_origins = " ".join(o for v in summary["skipped_examples"].values() for o in v)
    for c in bad:
        assert c["key"] in skipped_origins, c["key"]
        assert c["key"] not in records
    for c in good:
        rec = records[c["key"]]
        # Exact caption, and the original file bytes (JPEG/PNG/WEBP alike) kept unchanged.
        assert [x.decode("utf-8") for x in rec["caption"]] == [c["caption"]]
        assert rec["image"] == c["data"], c["key"]
        if c["pixels"] is not None:  # PNGs: what PIL reads back is exactly what was written
            np.testing.assert_array_equal(
                np.asarray(Image.open(io.BytesIO(rec["image"]))), c["pixels"]
            )
        rgb = images.decode_rgb(rec["image"])
        assert rgb.mode == "RGB" and rgb.size == Image.open(io.BytesIO(c["data"])).size
        if c["rgb"] is not None:
            np.testing.assert_array_equal(np.asarray(rgb), c["rgb"], err_msg=c["key"])


def test_webdataset_tar_import(tmp_path):
    cases = data_helpers.make_cases()
    tar = data_helpers.write_tar(str(tmp_path / "shard-00000.tar"), cases)
    summary = prepare_image_text("wds", tar, str(tmp_path / "tfds"), val_fraction=0, verbose=False)
    assert summary["skipped"] == {
        "corrupt image": 2,
        "truncated image": 1,
        "empty image file": 1,
        "empty caption": 1,
        "missing caption": 1,
    }
    records = _read_all("wds", str(tmp_path / "tfds"))
    _check_import(summary, records, cases)
    # The CMYK JPEG decodes to RGB (red-ish) and 16-bit colour to 8 bits.
    red = np.asarray(images.decode_rgb(records["k03_cmyk_jpeg"]["image"])).mean((0, 1))
    assert red[0] > 150 and red[1] < 100 and red[2] < 100
    assert os.path.isfile(os.path.join(summary["path"], "import_summary.json"))


def test_jsonl_and_csv_folder_import(tmp_path, capsys):
    cases = data_helpers.make_cases(seed=1)
    jsonl = data_helpers.write_table(str(tmp_path / "jl"), cases, "jsonl")
    summary = prepare_image_text(
        "from_jsonl", str(tmp_path / "jl"), str(tmp_path / "tfds"), val_fraction=0
    )
    out = capsys.readouterr().out
    assert "examples written" in out and "skipped: 6" in out and "empty caption" in out
    _check_import(summary, _read_all("from_jsonl", str(tmp_path / "tfds")), cases)
    assert jsonl.endswith("captions.jsonl")
    # CSV with custom column names; the zero-byte row etc. are skipped the same way.
    data_helpers.write_table(str(tmp_path / "csv"), cases, "csv", "file", "text")
    summary = prepare_image_text(
        "from_csv",
        str(tmp_path / "csv" / "captions.csv"),
        str(tmp_path / "tfds"),
        val_fraction=0,
        image_field="file",
        caption_field="text",
        verbose=False,
    )
    assert summary["splits"]["train"]["examples"] == sum(c["good"] for c in cases)


def test_validation_split_by_stable_key_hash(tmp_path):
    img = data_helpers.encode(Image.new("RGB", (4, 4), (1, 2, 3)), "PNG")
    cases = [
        dict(
            key=f"{i:05d}",
            ext="png",
            data=img,
            caption=f"caption {i}",
            good=True,
            pixels=None,
            rgb=None,
        )
        for i in range(60)
    ]
    data_helpers.write_tar(str(tmp_path / "a.tar"), cases[:30], extra_json=False)
    data_helpers.write_tar(str(tmp_path / "b.tar"), cases[30:], extra_json=False)
    d = str(tmp_path / "tfds")
    summary = prepare_image_text(
        "split", str(tmp_path / "{a,b}.tar"), d, val_fraction=0.3, verbose=False
    )
    train, val = _read_all("split", d, "train"), _read_all("split", d, "validation")
    assert set(train) | set(val) == {c["key"] for c in cases} and not set(train) & set(val)
    assert all(in_validation(k, 0.3) for k in val) and not any(in_validation(k, 0.3) for k in train)
    assert 5 <= len(val) <= 30
    info = dataset_info("split", d)
    assert info["num_examples"] == {"train": len(train), "validation": len(val)}
    assert info["class_names"] is None
    assert summary["splits"]["validation"]["examples"] == len(val)
    # Examples keep source order; read_captions follows the eval loader's index.
    caps = read_captions("split", "train", d)
    assert caps == [[f"caption {int(k)}"] for k in sorted(train)]


def test_max_size_downscales_only_large_images(tmp_path):
    rng = np.random.default_rng(0)
    big = data_helpers.encode(
        Image.fromarray(rng.integers(0, 255, (300, 200, 3), np.uint8)), "JPEG"
    )
    small = data_helpers.encode(
        Image.fromarray(rng.integers(0, 255, (50, 60, 3), np.uint8)), "JPEG"
    )
    cases = [
        dict(key="big", ext="jpg", data=big, caption="big"),
        dict(key="small", ext="jpg", data=small, caption="small"),
    ]
    data_helpers.write_tar(str(tmp_path / "x.tar"), cases)
    d = str(tmp_path / "tfds")
    summary = prepare_image_text(
        "sized", str(tmp_path / "x.tar"), d, val_fraction=0, max_size=100, verbose=False
    )
    assert summary["reencoded"] == 1
    recs = _read_all("sized", d)
    assert Image.open(io.BytesIO(recs["big"]["image"])).size == (100, 150)
    assert recs["small"]["image"] == small


def test_multi_caption_rows_merge(tmp_path):
    img = Image.new("RGB", (5, 5), (9, 9, 9))
    os.makedirs(tmp_path / "m")
    img.save(tmp_path / "m" / "a.png")
    img.save(tmp_path / "m" / "b.png")
    (tmp_path / "m" / "c.jsonl").write_text(
        '{"image": "a.png", "caption": "first"}\n{"image": "a.png", "caption": "second"}\n'
        '{"image": "b.png", "caption": ["one", "two", "three"]}\n',
        encoding="utf-8",
    )
    d = str(tmp_path / "tfds")
    prepare_image_text("multi", str(tmp_path / "m" / "c.jsonl"), d, val_fraction=0, verbose=False)
    assert read_captions("multi", "train", d) == [["first", "second"], ["one", "two", "three"]]


def test_bad_sources_give_one_line_errors(tmp_path):
    d = str(tmp_path / "tfds")
    missing = str(tmp_path / "nowhere" / "shard-0.tar")
    with pytest.raises(DataError, match=r"source not found: .*nowhere/shard-0.tar \(expected"):
        prepare_image_text("x", missing, d, verbose=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"source is empty: .*empty.jsonl"):
        prepare_image_text("x", str(empty), d, verbose=False)
    folder = tmp_path / "jl"
    data_helpers.write_table(str(folder), data_helpers.make_cases()[:2])
    with pytest.raises(
        DataError,
        match=r"caption field 'text' not found in .*captions.jsonl "
        r"\(available: image, caption\)",
    ):
        prepare_image_text(
            "x", str(folder / "captions.jsonl"), d, caption_field="text", verbose=False
        )
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(3000))
    with pytest.raises(DataError, match=r"cannot read tar file .*junk.tar"):
        prepare_image_text("x", str(junk), d, verbose=False)
    # A tar cut in the middle of a member fails while reading, still naming the file.
    good = data_helpers.write_tar(str(tmp_path / "good.tar"), data_helpers.make_cases())
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(good, "rb").read()[:5000])
    with pytest.raises(DataError, match=r"cannot read tar file .*cut.tar"):
        prepare_image_text("x", str(cut), d, val_fraction=0, verbose=False)
    bad = [c for c in data_helpers.make_cases() if not c["good"]]
    data_helpers.write_tar(str(tmp_path / "bad.tar"), bad)
    with pytest.raises(
        DataError,
        match=r"no usable training example in .*bad.tar \(2 corrupt "
        r"image, 1 truncated image, 1 empty image file",
    ):
        prepare_image_text("x", str(tmp_path / "bad.tar"), d, verbose=False)
    assert not os.path.exists(os.path.join(d, "x"))
    with pytest.raises(DataError, match="invalid dataset name"):
        prepare_image_text("Bad-Name", good, d, verbose=False)
    for e in (DataError,):
        assert issubclass(e, ValueError)


def test_not_prepared_errors_say_how(tmp_path):
    d = str(tmp_path / "tfds")
    with pytest.raises(DatasetNotPreparedError) as e:
        eval_loader(
            "my_set", "validation", d, batch_size=4, image_size=8, shard_index=0, shard_count=1
        )
    msg = str(e.value)
    assert "\n" not in msg
    assert (
        f"python -m clip_jax.data.prepare --source=<your tars/jsonl/csv> --name=my_set "
        f"--data_dir={d}" in msg
    )
    img = data_helpers.encode(Image.new("RGB", (4, 4)), "PNG")
    data_helpers.write_tar(
        str(tmp_path / "t.tar"), [dict(key="a", ext="png", data=img, caption="a")]
    )
    # With one example the hash split leaves validation empty: it is not written.
    summary = prepare_image_text(
        "tiny", str(tmp_path / "t.tar"), d, val_fraction=0.01, verbose=False
    )
    assert list(summary["splits"]) == ["train"] and summary["notes"]
    with pytest.raises(
        DatasetNotPreparedError,
        match=r"split 'validation' of dataset 'tiny' "
        r"is not prepared .*available: train",
    ):
        read_captions("tiny", "validation", d)


def test_prepare_cli(tmp_path):
    cases = data_helpers.make_cases()[:3]
    data_helpers.write_tar(str(tmp_path / "s-000.tar"), cases)
    data_helpers.write_tar(str(tmp_path / "s-001.tar"), data_helpers.make_cases(2)[10:13])
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    d = str(tmp_path / "tfds")
    cmd = [
        sys.executable,
        "-m",
        "clip_jax.data.prepare",
        "--name=cli_set",
        f"--data_dir={d}",
        "--val_fraction=0",
        "--source",
        str(tmp_path / "s-{000..001}.tar"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 0, res.stderr
    assert "train: 3 examples written" in res.stdout and "skipped: 3" in res.stdout
    bad = cmd[:-1] + [str(tmp_path / "missing-{0..1}.tar")]
    res = subprocess.run(bad, capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 2
    assert res.stderr.startswith("error: source not found:") and res.stderr.count("\n") == 1
    assert "missing-0.tar" in res.stderr


def test_brace_expansion():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/{8..10}") == ["a/8", "a/9", "a/10", "b/8", "b/9", "b/10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_tar_written_by_tarfile_is_readable(tmp_path):
    # Guard for the helper itself: the shard really is a plain POSIX tar.
    path = data_helpers.write_tar(str(tmp_path / "t.tar"), data_helpers.make_cases()[:2])
    with tarfile.open(path) as tf:
        assert [m.name for m in tf.getmembers()][:2] == ["k00_rgb_jpeg.jpg", "k00_rgb_jpeg.txt"]
