"""Random access to one split of a prepared dataset: tfds' ArrayRecord data source.

A `Source` pickles as (name, split, data_dir) and reopens its files lazily, so grain worker
processes each hold their own file handles.
"""

from __future__ import annotations

from collections.abc import Sequence

from clip_jax import storage
from clip_jax.data import paths
from clip_jax.data.catalog import not_prepared_error, prepared_dir
from clip_jax.data.prepare import ensure_prepared


def _open(name: str, split: str, data_dir: str):
    # tensorflow_datasets takes seconds to import; only a process that reads records needs it.
    import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy, deferred until a split is read)

    if prepared_dir(name, data_dir) is None:
        raise not_prepared_error(name, data_dir)
    ensure_prepared(name, data_dir, splits=split)  # raises naming the available splits
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


class Source:
    """Records of split `split` of dataset `name`; `len()` and `get(indices)`."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        self.name, self.split, self.data_dir = name, split, paths.resolve_data_dir(data_dir)
        self._ds = _open(name, split, self.data_dir)
        self._len = len(self._ds)

    def __len__(self) -> int:
        return self._len

    def __getstate__(self):
        return {
            "name": self.name,
            "split": self.split,
            "data_dir": self.data_dir,
            "_len": self._len,
        }

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._ds = None

    def _read(self, source, indices: Sequence[int]) -> list:
        indices = [int(i) for i in indices]
        if storage.is_remote(self.data_dir):  # array_record's parallel read hides the latency
            return list(source.__getitems__(indices))
        # From a local disk, one read at a time costs less CPU than the parallel read and its
        # thread hand-offs (benchmarks/input_pipeline.py prints both).
        return [source[i] for i in indices]

    def get(self, indices: Sequence[int]) -> list[dict]:
        """Whole records, every feature decoded by tfds."""
        if self._ds is None:
            self._ds = _open(self.name, self.split, self.data_dir)
        return self._read(self._ds, indices)

    def get_image_text(self, indices: Sequence[int]) -> list[dict]:
        """{'image': encoded bytes, 'caption': [bytes, ...]} of each record, taken straight
        from the stored tf.train.Example: what training reads, without tfds decoding every
        other feature (20 against 37 us per 26 KiB record, benchmarks/input_pipeline.py)."""
        # tfds' own copy of the tf.train.Example message (no TensorFlow import); imported with
        # tfds, which only a process that reads records needs.
        from tensorflow_datasets.proto import tf_example_pb2  # noqa: PLC0415

        if self._ds is None:
            self._ds = _open(self.name, self.split, self.data_dir)
        out = []
        for serialized in self._read(self._ds.data_source, indices):
            feature = tf_example_pb2.Example.FromString(serialized).features.feature
            out.append(
                {
                    "image": feature["image"].bytes_list.value[0],
                    "caption": list(feature["caption"].bytes_list.value),
                }
            )
        return out


def record_captions(record: dict) -> list[str]:
    """A record's captions as str (one or several are stored, as bytes)."""
    cap = record["caption"]
    if isinstance(cap, (bytes, str)):
        cap = [cap]
    return [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in cap]
