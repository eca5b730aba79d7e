"""One default data directory: $TFDS_DATA_DIR, else ~/tensorflow_datasets, for every entry
point (loaders, prepare, tokenizers)."""

import os
import re

import pytest

from clip_jax.data import paths
from clip_jax.data.errors import DataError, DatasetNotPreparedError
from clip_jax.data.info import dataset_info
from clip_jax.data.tokenizer import demo_tokenizer_path, load_tokenizer


def test_default_follows_tfds_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env"))
    assert paths.default_data_dir() == str(tmp_path / "env")
    assert paths.resolve_data_dir("") == paths.resolve_data_dir(None) == str(tmp_path / "env")
    monkeypatch.delenv("TFDS_DATA_DIR")
    home = os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    assert paths.default_data_dir() == paths.resolve_data_dir("") == home


def test_given_directory_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path)
    assert paths.resolve_data_dir("rel/dir") == str(tmp_path / "rel" / "dir")
    assert paths.resolve_data_dir(tmp_path / "p") == str(tmp_path / "p")
    assert paths.resolve_data_dir("~/x") == os.path.join(os.path.expanduser("~"), "x")


def test_every_entry_point_uses_the_same_default(tmp_path, monkeypatch):
    env = str(tmp_path / "env")
    monkeypatch.setenv("TFDS_DATA_DIR", env)
    # Readers name the folder they looked in ...
    with pytest.raises(DatasetNotPreparedError, match=re.escape(f"not prepared in {env};")):
        dataset_info("nowhere")
    # ... the tokenizer's hint points there ...
    with pytest.raises(DataError, match=re.escape(f"--data_dir={env} ")):
        load_tokenizer("", dataset="my_set")
    # ... and the demo tokenizer is cached there.
    path = demo_tokenizer_path("")
    assert os.path.dirname(path) == os.path.join(env, "clip_demo", "tokenizer")
    assert os.path.isfile(path)
