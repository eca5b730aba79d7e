"""Import of image-text sources (webdataset tar, JSONL, CSV) into tfds ArrayRecord."""

import io
import json
import os
import subprocess
import sys
import tarfile

import chex
import data_helpers
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from test_train import DEMO, smoke

from clip_jax import train as train_lib
from clip_jax.data import images
from clip_jax.data.builders.image_text import in_validation
from clip_jax.data.builders.sources import expand_braces, sort_class_names
from clip_jax.data.errors import DataError, DatasetNotPreparedError
from clip_jax.data.info import dataset_info, read_captions
from clip_jax.data.pipeline import eval_loader
from clip_jax.data.prepare import prepare_image_text
from clip_jax.data.source import Source

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
            chex.assert_trees_all_equal(
                np.asarray(Image.open(io.BytesIO(rec["image"]))), c["pixels"]
            )
        rgb = images.decode_rgb(rec["image"])
        assert rgb.mode == "RGB" and rgb.size == Image.open(io.BytesIO(c["data"])).size
        if c["rgb"] is not None:
            chex.assert_trees_all_equal(np.asarray(rgb), c["rgb"], custom_message=c["key"])


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


def _import_jsonl(tmp_path, name, rows: str) -> str:
    """Imports JSONL `rows` over two 5x5 images, a.png and b.jpg; returns the data_dir."""
    img = Image.new("RGB", (5, 5), (9, 9, 9))
    os.makedirs(tmp_path / "m")
    img.save(tmp_path / "m" / "a.png")
    img.save(tmp_path / "m" / "b.jpg")
    (tmp_path / "m" / "c.jsonl").write_text(rows, encoding="utf-8")
    d = str(tmp_path / "tfds")
    prepare_image_text(name, str(tmp_path / "m" / "c.jsonl"), d, val_fraction=0, verbose=False)
    return d


def test_multi_caption_rows_merge(tmp_path):
    d = _import_jsonl(
        tmp_path,
        "multi",
        '{"image": "a.png", "caption": "first"}\n{"image": "a.png", "caption": "second"}\n'
        '{"image": "b.jpg", "caption": ["one", "two", "three"]}\n',
    )
    assert read_captions("multi", "train", d) == [["first", "second"], ["one", "two", "three"]]


def test_training_read_gives_what_tfds_decodes(tmp_path, demo_data_dir):
    """Source.get_image_text parses the stored tf.train.Example itself; tfds' own decoding
    of every record (one and several captions, the demo's extra features) is the reference."""
    d = _import_jsonl(
        tmp_path,
        "pairs",
        '{"image": "a.png", "caption": "only one"}\n'
        '{"image": "b.jpg", "caption": ["one", "two", "three"]}\n',
    )
    for name, data_dir in (("pairs", d), ("clip_demo", demo_data_dir)):
        source = Source(name, "train", data_dir)
        indices = list(range(len(source)))
        for fast, full in zip(source.get_image_text(indices), source.get(indices), strict=True):
            assert fast["image"] == full["image"]
            assert fast["caption"] == list(full["caption"])
        assert len(indices) > 1


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


# ------------------------------------------------- nothing lost: every bad row is counted


def _written(summary) -> int:
    return sum(s["examples"] for s in summary["splits"].values())


def _assert_all_counted(summary, planted):
    """written + skipped = planted: no example vanishes without a reason."""
    assert _written(summary) + sum(summary["skipped"].values()) == planted, summary["skipped"]


def _reason(summary, start):
    """The skip count whose reason starts with `start` (reasons may carry a hint)."""
    hits = [n for reason, n in summary["skipped"].items() if reason.startswith(start)]
    assert len(hits) == 1, (start, summary["skipped"])
    return hits[0]


def test_duplicate_webdataset_keys_are_counted_not_lost(tmp_path):
    red, green, blue = (data_helpers.solid_png(c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255)))
    tar = data_helpers.write_tar_members(
        str(tmp_path / "dup.tar"),
        [
            ("k.png", red),
            ("k.txt", b"first"),
            ("k.png", green),  # the same key again, right after: a second example
            ("k.txt", b"second"),
            ("j.png", blue),
            ("j.txt", b"third"),
            ("k.png", blue),  # and once more, later in the shard
            ("k.txt", b"fourth"),
        ],
    )
    d = str(tmp_path / "tfds")
    summary = prepare_image_text("dup", tar, d, val_fraction=0, verbose=False)
    assert summary["skipped"] == {"duplicate key": 2}
    _assert_all_counted(summary, 4)
    records = _read_all("dup", d)
    assert set(records) == {"k", "j"}
    assert records["k"]["image"] == red and list(records["k"]["caption"]) == [b"first"]
    assert summary["skipped_examples"]["duplicate key"][0].startswith("dup.tar:k (duplicate key")


def test_table_rows_sharing_a_key_but_not_the_image_are_counted(tmp_path):
    folder = tmp_path / "t"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.png").write_bytes(data_helpers.solid_png((1, 1, 1)))
    (folder / "images" / "b.png").write_bytes(data_helpers.solid_png((2, 2, 2)))
    table = data_helpers.write_lines(
        str(folder / "rows.jsonl"),
        [
            b'{"image": "images/a.png", "caption": "a", "id": "same"}',
            b'{"image": "images/b.png", "caption": "b", "id": "same"}',
        ],
    )
    d = str(tmp_path / "tfds")
    summary = prepare_image_text("dupkey", table, d, key_field="id", val_fraction=0, verbose=False)
    assert summary["skipped"] == {"duplicate key": 1}
    _assert_all_counted(summary, 2)
    assert read_captions("dupkey", "train", d) == [["a"]]


def _outside_rows_folder(tmp_path):
    """t/rows.jsonl and t/rows.csv naming 2 images inside t/ and 2 outside it."""
    secret = tmp_path / "secret"
    secret.mkdir(parents=True)
    (secret / "s.png").write_bytes(data_helpers.solid_png((9, 9, 9)))
    folder = tmp_path / "t"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.png").write_bytes(data_helpers.solid_png((1, 1, 1)))
    os.symlink(secret, folder / "linked")  # the folder owner's own link: followed
    paths = ["images/a.png", "../secret/s.png", str(secret / "s.png"), "linked/s.png"]
    lines = [f'{{"image": "{p}", "caption": "c{i}"}}'.encode() for i, p in enumerate(paths)]
    data_helpers.write_lines(str(folder / "rows.jsonl"), lines)
    csv_lines = [b"image,caption"] + [f"{p},c{i}".encode() for i, p in enumerate(paths)]
    data_helpers.write_lines(str(folder / "rows.csv"), csv_lines)
    return folder


def test_table_image_paths_outside_the_folder_are_refused_unless_allowed(tmp_path):
    folder = _outside_rows_folder(tmp_path)
    d = str(tmp_path / "tfds")
    for fmt in ("jsonl", "csv"):
        table = str(folder / f"rows.{fmt}")
        summary = prepare_image_text(f"out_{fmt}", table, d, val_fraction=0, verbose=False)
        assert _reason(summary, "image path outside the table's folder") == 2
        assert "--allow_outside_paths" in next(iter(summary["skipped"]))
        _assert_all_counted(summary, 4)
        assert read_captions(f"out_{fmt}", "train", d) == [["c0"], ["c3"]]
        summary = prepare_image_text(
            f"out_all_{fmt}", table, d, val_fraction=0, allow_outside_paths=True, verbose=False
        )
        assert summary["skipped"] == {} and _written(summary) == 4


def _latin1_tables(tmp_path):
    """t/rows.jsonl and t/rows.csv in latin-1: rows 1 and 3 hold a non-ASCII caption."""
    folder = tmp_path / "t"
    (folder / "images").mkdir(parents=True)
    for i in range(3):
        (folder / "images" / f"{i}.png").write_bytes(data_helpers.solid_png((i, i, i)))
    caps = ["café au lait", "plain", "Müller's Straße"]
    jsonl = [
        f'{{"image": "images/{i}.png", "caption": "{c}"}}'.encode("latin-1")
        for i, c in enumerate(caps)
    ]
    data_helpers.write_lines(str(folder / "rows.jsonl"), jsonl)
    csv_lines = [b"image,caption"] + [
        f"images/{i}.png,{c}".encode("latin-1") for i, c in enumerate(caps)
    ]
    data_helpers.write_lines(str(folder / "rows.csv"), csv_lines)
    return folder, caps


def test_tables_not_valid_utf8_skip_the_row_or_take_an_encoding(tmp_path):
    folder, caps = _latin1_tables(tmp_path)
    d = str(tmp_path / "tfds")
    for fmt in ("jsonl", "csv"):
        table = str(folder / f"rows.{fmt}")
        summary = prepare_image_text(f"l1_{fmt}", table, d, val_fraction=0, verbose=False)
        assert summary["skipped"] == {"caption is not valid UTF-8": 2}
        _assert_all_counted(summary, 3)
        assert any("--encoding" in note for note in summary["notes"])
        assert read_captions(f"l1_{fmt}", "train", d) == [["plain"]]
        summary = prepare_image_text(
            f"l1_enc_{fmt}", table, d, val_fraction=0, encoding="latin-1", verbose=False
        )
        assert summary["skipped"] == {}
        assert read_captions(f"l1_enc_{fmt}", "train", d) == [[c] for c in caps]
    # A spreadsheet's UTF-8 byte-order mark is not part of the first column's name.
    bom = data_helpers.write_lines(
        str(folder / "bom.csv"), [b"\xef\xbb\xbfimage,caption", b"images/0.png,caf\xc3\xa9"]
    )
    prepare_image_text("bom", bom, d, val_fraction=0, verbose=False)
    assert read_captions("bom", "train", d) == [["café"]]


# ------------------------------------------------------------- labelled datasets of one's own

COLOURS = {"red_ball": (255, 0, 0), "green_leaf": (0, 255, 0), "blue_sky": (0, 0, 255)}


def _labels_by_key(name, split, d):
    ds = tfds.data_source(name, split=split, data_dir=d, download=False)
    return {r["key"].decode(): int(r["label"]) for r in ds.__getitems__(list(range(len(ds))))}


def test_class_folders_give_a_labelled_dataset_and_a_split_is_added(tmp_path):
    d = str(tmp_path / "tfds")
    train = {
        c: [data_helpers.solid_png(rgb, 8 + i) for i in range(3)] for c, rgb in COLOURS.items()
    }
    planted = data_helpers.write_image_folder(str(tmp_path / "train"), train)
    (tmp_path / "train" / "loose.png").write_bytes(data_helpers.solid_png((0, 0, 0)))
    summary = prepare_image_text("pets", str(tmp_path / "train"), d, val_fraction=0, verbose=False)
    assert summary["skipped"] == {"file outside a class sub-folder": 1}
    _assert_all_counted(summary, planted + 1)
    names = sorted(COLOURS)  # ImageFolder order: class folders sorted by name
    assert summary["class_names"] == names
    train_file = os.path.join(summary["path"], "pets-train.array_record-00000-of-00001")
    train_bytes = open(train_file, "rb").read()

    # A test split without one of the classes, added beside train.
    test = {
        "red_ball": [data_helpers.solid_png((250, 5, 5))] * 2,
        "blue_sky": [data_helpers.solid_png((5, 5, 250))],
    }
    data_helpers.write_image_folder(str(tmp_path / "test"), test)
    summary = prepare_image_text("pets", str(tmp_path / "test"), d, split="test", verbose=False)
    assert list(summary["splits"]) == ["test"] and summary["kept_splits"] == ["train"]
    info = dataset_info("pets", d)
    assert info["class_names"] == names and "label" in info["features"]
    assert info["num_examples"] == {"train": planted, "test": 3}
    assert open(train_file, "rb").read() == train_bytes  # train is not re-written
    for split, expected in (("train", train), ("test", test)):
        labels = _labels_by_key("pets", split, d)
        assert labels == {
            f"{c}/{i:03d}.png": names.index(c)
            for c, imgs in expected.items()
            for i in range(len(imgs))
        }
    assert read_captions("pets", "test", d) == [["blue sky"], ["red ball"], ["red ball"]]
    batches = list(
        eval_loader("pets", "test", d, batch_size=4, image_size=8, shard_index=0, shard_count=1)
    )
    chex.assert_trees_all_equal(batches[0]["label"], np.array([0, 2, 2, -1], np.int32))

    # Again: kept unless --overwrite, which replaces the split (not appends to it).
    again = prepare_image_text("pets", str(tmp_path / "test"), d, split="test", verbose=False)
    assert "already prepared" in again["note"]
    prepare_image_text(
        "pets", str(tmp_path / "test"), d, split="test", overwrite=True, verbose=False
    )
    assert dataset_info("pets", d)["num_examples"] == {"train": planted, "test": 3}

    # A class the dataset does not have, or no labels at all, cannot join it.
    data_helpers.write_image_folder(
        str(tmp_path / "odd"), {"purple_rain": [data_helpers.solid_png((1, 0, 1))]}
    )
    with pytest.raises(DataError, match=r"classes not in dataset 'pets': purple_rain \(it has"):
        prepare_image_text("pets", str(tmp_path / "odd"), d, split="odd", verbose=False)
    tar = data_helpers.write_tar(str(tmp_path / "u.tar"), data_helpers.make_cases()[:2])
    with pytest.raises(
        DataError, match=r"dataset 'pets' is labelled \(3 classes\); pass --label_field"
    ):
        prepare_image_text("pets", tar, d, split="extra", verbose=False)
    assert dataset_info("pets", d)["num_examples"] == {"train": planted, "test": 3}
    assert not [f for f in os.listdir(d) if f.startswith(".")]  # no temporary folder left


def test_a_split_added_to_an_unlabelled_dataset(tmp_path):
    d = str(tmp_path / "tfds")
    cases = data_helpers.make_cases()
    data_helpers.write_tar(str(tmp_path / "a.tar"), cases[:3])
    data_helpers.write_tar(str(tmp_path / "b.tar"), cases[3:5])
    prepare_image_text("caps", str(tmp_path / "a.tar"), d, val_fraction=0, verbose=False)
    summary = prepare_image_text("caps", str(tmp_path / "b.tar"), d, split="test", verbose=False)
    assert summary["class_names"] is None and summary["kept_splits"] == ["train"]
    assert dataset_info("caps", d)["num_examples"] == {"train": 3, "test": 2}
    assert read_captions("caps", "test", d) == [[c["caption"]] for c in cases[3:5]]
    assert os.path.isfile(os.path.join(summary["path"], "import_summary_test.json"))
    folder = tmp_path / "cls"
    data_helpers.write_image_folder(str(folder), {"a": [data_helpers.solid_png((1, 2, 3))]})
    with pytest.raises(DataError, match="dataset 'caps' has no labels"):
        prepare_image_text("caps", str(folder), d, split="labelled", verbose=False)


def test_table_with_a_label_field(tmp_path):
    folder = tmp_path / "t"
    (folder / "images").mkdir(parents=True)
    for i in range(4):
        (folder / "images" / f"{i}.png").write_bytes(data_helpers.solid_png((i, 0, 0)))
    table = data_helpers.write_lines(
        str(folder / "rows.jsonl"),
        [
            b'{"image": "images/0.png", "cls": "dog"}',
            b'{"image": "images/1.png", "cls": "cat", "caption": "a cat on a mat"}',
            b'{"image": "images/2.png", "cls": ""}',
            b'{"image": "images/3.png", "cls": "hot_dog"}',
        ],
    )
    d = str(tmp_path / "tfds")
    summary = prepare_image_text(
        "animals", table, d, label_field="cls", val_fraction=0, verbose=False
    )
    assert summary["class_names"] == ["cat", "dog", "hot_dog"]
    assert summary["skipped"] == {"missing label": 1}
    _assert_all_counted(summary, 4)
    assert _labels_by_key("animals", "train", d) == {
        "images/0.png": 1,
        "images/1.png": 0,
        "images/3.png": 2,
    }
    # Without a caption the class name is the caption.
    assert read_captions("animals", "train", d) == [["dog"], ["a cat on a mat"], ["hot dog"]]
    assert dataset_info("animals", d)["class_names"] == ["cat", "dog", "hot_dog"]


def test_integer_class_names_sort_as_numbers():
    assert sort_class_names(["10", "2", "1"]) == ["1", "2", "10"]
    assert sort_class_names(["b", "10", "a"]) == ["10", "a", "b"]


def test_zeroshot_evaluate_command_on_an_imported_labelled_split(demo_data_dir, tmp_path):
    """`python -m clip_jax.evaluate --workdir=W --tasks=zeroshot:SET@test` with no other flag:
    the class names come from the imported ClassLabel."""
    c = smoke(DEMO, demo_data_dir, total_steps=1)
    workdir = str(tmp_path / "run")
    train_lib.train(c, workdir)
    test = {c: [data_helpers.solid_png(rgb, 12)] * 2 for c, rgb in COLOURS.items()}
    data_helpers.write_image_folder(str(tmp_path / "test"), test)
    prepare_image_text(
        "colours_eval", str(tmp_path / "test"), demo_data_dir, split="test", verbose=False
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_jax.evaluate",
            f"--workdir={workdir}",
            "--tasks=zeroshot:colours_eval@test",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "zeroshot_colours_eval_test" in res.stdout
    [step] = os.listdir(os.path.join(workdir, "eval"))
    result = json.load(open(os.path.join(workdir, "eval", step, "zeroshot_colours_eval_test.json")))
    assert result["num_examples"] == 6 and result["num_classes"] == 3
    assert result["class_names_source"] == "dataset metadata"


# ------------------------------------------------------------- the command line: exit 2, one line


def _prepare_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "clip_jax.data.prepare", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
        check=False,
    )


def _assert_one_line_error(res, *words):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and res.stderr.strip().count("\n") == 0, res.stderr
    for w in words:
        assert w in res.stderr, (w, res.stderr)


def test_prepare_cli_bad_inputs_exit_2_with_one_line(tmp_path):
    folder, _ = _latin1_tables(tmp_path)
    table = str(folder / "rows.jsonl")
    d = str(tmp_path / "tfds")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    tar = data_helpers.write_tar(str(tmp_path / "s.tar"), data_helpers.make_cases()[:2])
    (tmp_path / "bare").mkdir()
    (tmp_path / "nested" / "part1").mkdir(parents=True)
    data_helpers.write_tar(
        str(tmp_path / "nested" / "part1" / "s.tar"), data_helpers.make_cases()[:1]
    )
    data_helpers.write_image_folder(
        str(tmp_path / "cls"), {"a": [data_helpers.solid_png((1, 2, 3))]}
    )
    data_helpers.write_image_folder(
        str(tmp_path / "cls2"), {"b": [data_helpers.solid_png((1, 2, 3))]}
    )
    cases = [
        ([f"--source={table}", "--encoding=klingon"], ["unknown --encoding 'klingon'"]),
        ([f"--source={table}", f"--data_dir={a_file}"], ["is a file", "pass a folder"]),
        ([f"--source={table}", "--split=Test-1"], ["invalid --split 'Test-1'"]),
        ([f"--source={tar}", "--label_field=cls"], ["--label_field applies to JSONL/CSV"]),
        ([f"--source={tmp_path / 'bare'}"], ["no class sub-folder", "bare"]),
        ([f"--source={tmp_path / 'nested'}"], ["sub-folders of shards", "/*/*.tar"]),
    ]
    for args, words in cases:
        _assert_one_line_error(_prepare_cli("--name=cli_bad", f"--data_dir={d}", *args), *words)
    res = _prepare_cli("--name=clip_demo", f"--data_dir={d}", "--num_train=-1")
    _assert_one_line_error(res, "--num_train >= 1")
    res = _prepare_cli("--name=cli_cls", f"--data_dir={d}", f"--source={tmp_path / 'cls'}")
    assert res.returncode == 0, res.stderr
    res = _prepare_cli(
        "--name=cli_cls", f"--data_dir={d}", f"--source={tmp_path / 'cls2'}", "--split=test"
    )
    _assert_one_line_error(res, "classes not in dataset 'cli_cls': b")


def test_prepare_cli_counts_bad_rows_and_names_the_flags(tmp_path):
    folder, _ = _latin1_tables(tmp_path)
    out = _outside_rows_folder(tmp_path / "o")
    d = str(tmp_path / "tfds")
    res = _prepare_cli(
        "--name=l1", f"--data_dir={d}", "--val_fraction=0", f"--source={folder / 'rows.csv'}"
    )
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "train: 1 examples written" in res.stdout
    assert "2 x caption is not valid UTF-8" in res.stdout and "--encoding" in res.stdout
    res = _prepare_cli(
        "--name=l1_enc",
        f"--data_dir={d}",
        "--val_fraction=0",
        "--encoding=latin-1",
        f"--source={folder / 'rows.csv'}",
    )
    assert res.returncode == 0 and "train: 3 examples written" in res.stdout, res.stderr[-2000:]
    res = _prepare_cli(
        "--name=o", f"--data_dir={d}", "--val_fraction=0", f"--source={out / 'rows.jsonl'}"
    )
    assert "2 x image path outside the table's folder (pass --allow_outside_paths" in res.stdout
    res = _prepare_cli(
        "--name=o_all",
        f"--data_dir={d}",
        "--val_fraction=0",
        "--allow_outside_paths",
        f"--source={out / 'rows.jsonl'}",
    )
    assert "train: 4 examples written" in res.stdout and "skipped: 0" in res.stdout
