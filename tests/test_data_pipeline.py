"""Loader: determinism (over threads, processes and resumption), the training crop against
PIL references, sharding over hosts, eval padding, corrupt images, hand-off to global
jax.Arrays (`sharding.to_global`). Real tfds datasets written to a temporary data_dir."""

import io
import json
import math
import shutil

import chex
import cv2
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from clip_jax.data import images
from clip_jax.data.builders import common
from clip_jax.data.errors import DataError
from clip_jax.data.info import dataset_info, read_captions
from clip_jax.data.pipeline import eval_loader, train_loader
from clip_jax.data.prepare import prepare_demo
from clip_jax.data.tokenizer import demo_tokenizer
from clip_jax.sharding import to_global

tfds.disable_progress_bar()
SIZE = 32


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("demo_tfds"))
    prepare_demo(d, num_train=96, num_validation=8, num_test=21, verbose=False)
    return d, demo_tokenizer(d, context_length=24)


def _loader(demo, **kw):
    d, tok = demo
    args = dict(
        global_batch_size=16, image_size=SIZE, tokenizer=tok, seed=3, shard_index=0, shard_count=1
    )
    args.update(kw)
    return train_loader("clip_demo", "train", d, **args)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batch_contract(demo):
    b = next(_loader(demo))
    assert set(b) == {"image", "text"}
    chex.assert_shape([b["image"], b["text"]], [(16, SIZE, SIZE, 3), (16, 24)])
    chex.assert_type([b["image"], b["text"]], [np.uint8, np.int32])
    tok = demo[1]
    assert (b["text"][:, 0] == tok.bot_id).all() and ((b["text"] == tok.eot_id).sum(1) == 1).all()


def test_same_seed_same_batches(demo):
    a, b = _take(_loader(demo), 3), _take(_loader(demo, prefetch=0), 3)
    for x, y in zip(a, b):
        chex.assert_trees_all_equal(x, y)
    c = _take(_loader(demo, seed=4), 1)[0]
    assert not np.array_equal(a[0]["image"], c["image"])


def test_resume_continues_exactly(demo):
    full = _take(_loader(demo), 9)  # 6 batches per epoch: crosses an epoch boundary
    first = _loader(demo)
    _take(first, 4)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    assert state["next_batch"] == 4
    resumed = _loader(demo)
    resumed.set_state(state)
    for k in range(4, 9):
        chex.assert_trees_all_equal(next(resumed), full[k])
    with pytest.raises(ValueError, match="global_batch_size"):
        _loader(demo, global_batch_size=8).set_state(state)


def test_two_hosts_cover_the_epoch_once(demo):
    hosts = [_loader(demo, shard_index=h, shard_count=2, num_epochs=1) for h in range(2)]
    assert [len(h) for h in hosts] == [6, 6] and hosts[0].host_batch_size == 8
    seen = [i for h in hosts for k in range(len(h)) for i in h.record_indices(k)]
    assert sorted(seen) == list(range(96))
    batches = [list(h) for h in hosts]
    assert [len(b) for b in batches] == [6, 6]
    # One host with the same global batch sees the same examples and pixels, interleaved.
    single = list(_loader(demo, num_epochs=1))
    for k in (0, 5):
        for key in ("image", "text"):
            merged = np.stack([batches[0][k][key], batches[1][k][key]], 1)
            chex.assert_trees_all_equal(merged.reshape(single[k][key].shape), single[k][key])


def test_epochs_are_reshuffled(demo):
    loader = _loader(demo, num_epochs=2)
    assert len(loader) == 12
    ep0 = [i for k in range(6) for i in loader.record_indices(k)]
    ep1 = [i for k in range(6, 12) for i in loader.record_indices(k)]
    assert sorted(ep0) == sorted(ep1) == list(range(96)) and ep0 != ep1
    assert len(list(loader)) == 12


def test_eval_loader_pads_and_masks_over_two_hosts(demo):
    d, tok = demo
    info = dataset_info("clip_demo", d)
    hosts = [
        list(
            eval_loader(
                "clip_demo",
                "test",
                d,
                batch_size=8,
                image_size=SIZE,
                tokenizer=tok,
                shard_index=h,
                shard_count=2,
            )
        )
        for h in range(2)
    ]
    assert len(hosts[0]) == len(hosts[1]) == 3  # ceil(21 / 8)
    index = np.concatenate([b["index"] for h in hosts for b in h])
    mask = np.concatenate([b["mask"] for h in hosts for b in h])
    label = np.concatenate([b["label"] for h in hosts for b in h])
    assert sorted(index[mask]) == list(range(21)) and (index[~mask] == -1).all()
    assert (label[~mask] == -1).all() and len(mask) == 24
    ds = tfds.data_source("clip_demo", split="test", data_dir=d, download=False)
    want = {i: ds[i] for i in range(21)}
    for h in hosts:
        for b in h:
            chex.assert_shape([b["image"], b["text"]], [(4, SIZE, SIZE, 3), (4, 24)])
            for j in np.flatnonzero(b["mask"]):
                rec = want[int(b["index"][j])]
                assert b["label"][j] == rec["label"]
                chex.assert_trees_all_equal(
                    b["image"][j], images.center_crop(images.decode_rgb(rec["image"]), SIZE)
                )
                chex.assert_trees_all_equal(b["text"][j], tok.encode(rec["caption"][0].decode()))
    assert info["num_examples"]["test"] == 21 and len(info["class_names"]) == 64
    caps = read_captions("clip_demo", "test", d)
    assert len(caps) == 21 and all(len(c) == 3 for c in caps)


class CorruptSet(common.Builder, skip_registration=True):
    """A dataset holding some undecodable images (the importer would have skipped them)."""

    name = "corrupt_set"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            disable_shuffling=True,
            features=tfds.features.FeaturesDict(common.text_features()),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(24):
            buf = io.BytesIO()
            Image.new("RGB", (20, 12), (i * 10, 0, 0)).save(buf, "PNG")
            data = buf.getvalue() if i % 4 else (b"" if i % 8 else buf.getvalue()[:30])
            yield i, {"image": data, "caption": [f"red {i}"], "key": str(i)}


def test_corrupt_images_are_replaced_deterministically(tmp_path, demo):
    d = str(tmp_path)
    CorruptSet(data_dir=d, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    tok = demo[1]

    def make():
        return train_loader(
            "corrupt_set",
            "train",
            d,
            global_batch_size=8,
            image_size=8,
            tokenizer=tok,
            seed=0,
            num_epochs=1,
            shard_index=0,
            shard_count=1,
        )

    a, b = list(make()), None
    loader = make()
    first = next(loader)
    state = loader.get_state()
    resumed = make()
    resumed.set_state(state)
    b = [first] + list(resumed)
    assert len(a) == 3
    chex.assert_shape([x["image"] for x in a], (8, 8, 8, 3))
    for x, y in zip(a, b):
        chex.assert_trees_all_equal(x, y)
    # 6 of 24 records are corrupt, so at least 6 replacements happened over one epoch.
    full = make()
    list(full)
    assert full.num_replaced >= 6 and resumed.num_replaced == full.num_replaced
    ev = eval_loader(
        "corrupt_set", "train", d, batch_size=8, image_size=8, shard_index=0, shard_count=1
    )
    batches = list(ev)
    masks = np.concatenate([x["mask"] for x in batches])
    assert ev.num_corrupt == 6 and masks.sum() == 18 and "label" not in batches[0]
    # Worker processes write their batches into shared memory: the same batches, black
    # images where corrupt.
    workers = eval_loader(
        "corrupt_set",
        "train",
        d,
        batch_size=8,
        image_size=8,
        shard_index=0,
        shard_count=1,
        num_workers=2,
    )
    chex.assert_trees_all_equal(list(workers), batches)


def test_to_global_shards_over_batch_axes(demo):
    mesh = jax.make_mesh(
        (4, 2, 1), ("data", "fsdp", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 3
    )
    batch = next(_loader(demo))
    out = to_global(batch, mesh)
    chex.assert_shape(out["image"], (16, SIZE, SIZE, 3))
    chex.assert_type(out["image"], np.uint8)
    assert out["text"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert {s.data.shape[0] for s in out["image"].addressable_shards} == {2}
    chex.assert_trees_all_equal(jax.device_get(out), batch)


def test_decode_handles_exif_rotation_and_crops():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    assert images.decode_rgb(buf.getvalue()).size == (20, 40)
    # Centre crop of [red | green | blue] thirds keeps the green middle only.
    arr = np.zeros((30, 90, 3), np.uint8)
    arr[:, :30, 0] = arr[:, 30:60, 1] = arr[:, 60:, 2] = 255
    crop = images.center_crop(Image.fromarray(arr), 15)
    assert crop[..., 1].min() > 230 and crop[..., 0].max() < 20 and crop[..., 2].max() < 20


# ---------------------------------------------------------------------------------------
# The training crop of JPEGs: DCT-scaled decoding, PIL fallbacks, determinism
# ---------------------------------------------------------------------------------------

CROP = (0.9, 1.0)


def _photo(rng, w, h, mode="RGB"):
    """A smooth colour field with grain: compresses and decodes like a photo."""
    base = rng.uniform(0, 255, size=(3, 4, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR))
    noisy = np.clip(field + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy).convert(mode)


def _jpeg(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def _rotated_jpeg(rng):
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: 60 x 84 upright
    return _jpeg(_photo(rng, 84, 60), exif=exif.tobytes())


# key prefix -> how the reference decodes it: 'full' at scale 1 (the crop needs every pixel),
# 'half' at 1/2 (crop side 68-80 for 32 px), 'fine' at 3/8 (no PIL reference: close only).
PHOTO_KINDS = {
    "full_rgb": lambda rng: _jpeg(_photo(rng, int(rng.integers(34, 41)), 40)),
    "full_gray": lambda rng: _jpeg(_photo(rng, 38, 36, "L")),
    "full_cmyk": lambda rng: _jpeg(_photo(rng, 44, 36, "CMYK")),
    "full_exif": _rotated_jpeg,
    "half_rgb": lambda rng: _jpeg(_photo(rng, int(rng.integers(76, 91)), 76)),
    "half_progressive": lambda rng: _jpeg(_photo(rng, 80, 78), progressive=True),
    "fine_rgb": lambda rng: _jpeg(_photo(rng, 110, int(rng.integers(104, 111)))),
    "png": lambda rng: _png(_photo(rng, 45, 52)),
}


def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


class PhotoSet(common.Builder, skip_registration=True):
    """JPEGs of every kind the training crop decodes differently (and a PNG)."""

    name = "photo_set"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            disable_shuffling=True,
            features=tfds.features.FeaturesDict(common.text_features()),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        kinds = list(PHOTO_KINDS)
        for i in range(24):
            kind = kinds[i % len(kinds)]
            caps = [f"photo {i}", f"picture {i}"]
            yield i, {"image": PHOTO_KINDS[kind](rng), "caption": caps, "key": f"{kind}/{i}"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory, demo):
    d = str(tmp_path_factory.mktemp("photo_tfds"))
    PhotoSet(data_dir=d, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return d, demo[1]


def _photo_loader(photos, **kw):
    d, tok = photos
    args = dict(
        global_batch_size=8, image_size=SIZE, tokenizer=tok, seed=7, shard_index=0, shard_count=1
    )
    args.update(kw)
    return train_loader("photo_set", "train", d, **args)


def _whole_pixels(pixels: np.ndarray, x0: float, y0: float, side: float):
    """The square box with its corner and side rounded to whole pixels, inside the image."""
    side = round(side)
    return min(round(x0), pixels.shape[1] - side), min(round(y0), pixels.shape[0] - side), side


def _cv2_crop(pixels: np.ndarray, x0: float, y0: float, side: float, size: int) -> np.ndarray:
    """The whole-pixel box resized by OpenCV: bicubic, or pixel area from a 1.5x shrink."""
    x0, y0, side = _whole_pixels(pixels, x0, y0, side)
    interp = cv2.INTER_AREA if 2 * side >= 3 * size else cv2.INTER_CUBIC
    return cv2.resize(pixels[y0 : y0 + side, x0 : x0 + side], (size, size), interpolation=interp)


def _pil_crop(pixels: np.ndarray, x0: float, y0: float, side: float, size: int) -> np.ndarray:
    """PIL's antialiased bicubic resize of the same whole-pixel box."""
    x0, y0, side = _whole_pixels(pixels, x0, y0, side)
    box = (x0, y0, x0 + side, y0 + side)
    out = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(out)


def _reference_crop(data: bytes, kind: str, seed: int, position: int, resize=_cv2_crop):
    """The crop computed directly: the box from numpy's uniform draws on the upright image,
    the pixels decoded by PIL at the scale the kind names, one OpenCV resize."""
    rng = np.random.default_rng([seed, position])
    img = Image.open(io.BytesIO(data))
    upright = ImageOps.exif_transpose(img).size if "exif" in kind else img.size
    w, h = upright
    side = min(w, h) * math.sqrt(rng.uniform(*CROP))
    x0, y0 = rng.uniform(0.0, w - side), rng.uniform(0.0, h - side)
    reduce = 2 if kind.startswith("half") else 1
    if reduce > 1:
        img.draft("RGB", (img.width // reduce, img.height // reduce))
    img = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    return resize(img, x0 / reduce, y0 / reduce, side / reduce, SIZE)


def test_jpeg_crops_match_pil_references(photos):
    """Every example of two batches (all kinds) against `_reference_crop`: equal where
    PIL decodes at the same scale, within 3 levels on average where only libjpeg-turbo's
    finer scale (3/8) applies (the full-resolution reference then); and every crop close
    to PIL's antialiased bicubic resize of the same whole-pixel box."""
    loader = _photo_loader(photos, prefetch=0, num_threads=0)
    ds = tfds.data_source("photo_set", split="train", data_dir=photos[0], download=False)
    seen = set()
    for k in range(2):
        batch = next(loader)
        for j, index in enumerate(loader.record_indices(k)):
            rec = ds[index]
            kind = rec["key"].decode().split("/")[0]
            seen.add(kind)
            want = _reference_crop(rec["image"], kind, 7, k * 8 + j)
            pil = _reference_crop(rec["image"], kind, 7, k * 8 + j, resize=_pil_crop)
            assert np.abs(batch["image"][j].astype(float) - pil).mean() < 3, kind
            if kind.startswith("fine"):
                err = np.abs(batch["image"][j].astype(float) - want).mean()
                assert err < 3, (kind, err)
            else:
                chex.assert_trees_all_equal(batch["image"][j], want, custom_message=kind)
    assert seen == set(PHOTO_KINDS)


def test_jpeg_batches_equal_over_threads_processes_and_resume(photos):
    ref = _take(_photo_loader(photos, prefetch=0, num_threads=0), 4)  # 3 batches per epoch
    chex.assert_trees_all_equal(_take(_photo_loader(photos, num_threads=2), 4), ref)
    workers = _photo_loader(photos, num_workers=2)
    got = _take(workers, 2)
    state = workers.get_state()
    workers.close()
    chex.assert_trees_all_equal(got, ref[:2])
    resumed = _photo_loader(photos, num_workers=1, num_threads=2)  # a pool beside its loop
    resumed.set_state(state)
    chex.assert_trees_all_equal(_take(resumed, 2), ref[2:])
    resumed.close()


def test_a_batch_larger_than_the_free_shared_memory_is_one_data_error(demo):
    """A worker process writes its batches into /dev/shm. A batch that cannot fit there is a
    DataError with the sizes and the fixes, not a worker killed by SIGBUS on a full tmpfs."""
    free = shutil.disk_usage("/dev/shm").free
    size = math.isqrt(free // (16 * 3)) + 1  # 16 images of size x size x 3 bytes: over it
    loader = _loader(demo, image_size=size, num_workers=1)
    with pytest.raises(DataError, match="shared memory is full") as e:
        next(loader)
    loader.close()
    message = str(e.value)
    assert "\n" not in message and "/dev/shm has" in message
    for fix in ("--shm-size", "data.num_workers", "data.num_threads"):
        assert fix in message


def test_a_crop_written_into_a_batch_row_is_the_crop_and_a_row_that_does_not_fit_raises():
    jpeg = _jpeg(_photo(np.random.default_rng(3), 60, 40))
    png = _png(_photo(np.random.default_rng(4), 50, 70))
    batch = np.zeros((2, 16, 16, 3), np.uint8)
    for j, data in enumerate((jpeg, png)):  # libjpeg-turbo's path, then PIL's
        want = images.random_square_crop(data, 16, np.random.default_rng(j))
        got = images.random_square_crop(data, 16, np.random.default_rng(j), out=batch[j])
        assert np.shares_memory(got, batch)
        chex.assert_trees_all_equal(batch[j], want)
    with pytest.raises(ValueError):  # OpenCV would silently make a new array instead
        images.random_square_crop(jpeg, 16, np.random.default_rng(0), out=batch[0, :15])


def test_random_square_crop_of_other_formats_and_bad_bytes():
    # A PNG: decoded whole, the same three draws as rng.uniform, one pixel-area resize (2x+).
    arr = np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8)
    rng = np.random.default_rng(5)
    side = 50 * math.sqrt(rng.uniform(0.5, 1.0))
    x0, y0 = rng.uniform(0.0, 70 - side), rng.uniform(0.0, 50 - side)
    got = images.random_square_crop(
        _png(Image.fromarray(arr)), 16, np.random.default_rng(5), (0.5, 1)
    )
    chex.assert_trees_all_equal(got, _cv2_crop(arr, x0, y0, side, 16))
    # A large PNG shrinks 8x by pixel area; the result stays close to PIL's antialiased resize.
    big = np.asarray(_photo(np.random.default_rng(1), 400, 400))
    rng = np.random.default_rng(2)
    side = 400 * math.sqrt(rng.uniform(*CROP))
    x0, y0 = rng.uniform(0.0, 400 - side), rng.uniform(0.0, 400 - side)
    fair = Image.fromarray(big).resize(
        (48, 48), Image.Resampling.BICUBIC, box=(x0, y0, x0 + side, y0 + side)
    )
    got = images.random_square_crop(_png(Image.fromarray(big)), 48, np.random.default_rng(2), CROP)
    assert np.abs(got.astype(float) - np.asarray(fair)).mean() < 2
    jpeg = _jpeg(_photo(np.random.default_rng(3), 60, 40))
    for data, reason in (
        (b"", "empty"),
        (jpeg[: len(jpeg) // 2], "truncated"),
        (b"junk", "corrupt"),
    ):
        with pytest.raises(images.BadImage, match=reason):
            images.random_square_crop(data, 16, np.random.default_rng(0))
