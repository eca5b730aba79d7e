"""What every clip_jax tfds builder shares: the image/caption/key features, the base class."""

from __future__ import annotations

import os
import sys

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import writer as writer_lib

from clip_jax import storage


def text_features() -> dict:
    """'image': encoded bytes exactly as stored (decoded with PIL by the loader, never by
    TensorFlow); 'caption': one or more UTF-8 strings; 'key': the example's source key."""
    return {
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "caption": tfds.features.Tensor(shape=(None,), dtype=np.object_),
        "key": tfds.features.Text(),
    }


class BucketWriter(writer_lib.ExampleWriter):
    """tfds' shard writer, that also writes into a bucket: array_record's writer writes local
    files only, so a shard bound for a bucket is written to a local temporary file, then
    uploaded. Pickled with tfds' Beam writer, so each Beam worker writes its own shards."""

    def write(self, path, examples):
        with storage.local_file(path) as local:
            return super().write(local, examples)


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """GeneratorBasedBuilder writing ArrayRecord, locally or into a bucket, with a code path
    that does not depend on how clip_jax was installed (tfds' own lookup fails for
    namespace/editable packages)."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(os.path.abspath(sys.modules[cls.__module__].__file__))

    def _example_writer(self) -> writer_lib.ExampleWriter:
        return BucketWriter(file_format=self.info.file_format)
