"""The `image_text` import on Apache Beam: the same dataset, written by many workers.

`make_builder(name, data_dir, config)` is `image_text.make_builder` whose splits are Beam
PCollections instead of Python generators. Each source file is read by one worker, once for
every split; its candidates go through the single-process import's `Checker` and split
assignment (`ImportConfig.split_of`), and get the integer key (source index, ordinal in the
source). tfds' BeamWriter without shuffling sorts the records of each split by key, so the
splits hold the same examples in the same order as the single-process import.

Skip counts and examples, image bytes and re-encodings are counted per source and split on
the workers (`ImportStats` with the single-process reading order as rank) and merged by one
combine into a file in tfds' temporary dataset folder, read back into `builder.stats` once
the pipeline has run. A source that cannot be read does not stop its worker: once all are
read, the import fails with a DataError naming them, before tfds renames its temporary
folder, so nothing that looks prepared is left behind.

Sources and data_dir may be in a bucket: workers read their sources from it and write their
shards into it (`common.BucketWriter`), so runners whose workers share no disk (Dataflow)
work; for those, a local data_dir, source or temp_location is refused up front.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import pickle
import shlex
from collections.abc import Sequence

from clip_jax import storage
from clip_jax.data.builders import image_text
from clip_jax.data.errors import DataError


def _import_beam():
    """apache_beam, or a DataError saying how to install it. Its import warns, through the
    root logger, that Google Cloud's clients are missing: only Dataflow needs them, and its
    workers have them. That line is kept off the console."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        import apache_beam  # noqa: PLC0415 (an optional extra, imported with a quiet root logger)
    except ImportError as e:
        raise DataError(
            f"--beam_runner needs Apache Beam ({e}); install it: pip install 'clip_jax[beam]'"
        ) from None
    finally:
        root.setLevel(level)
    return apache_beam


beam = _import_beam()

_STATS = "stats"
_STATS_FILE = "beam_import_stats.pkl"  # in the temporary dataset folder, removed once read
_MAX_FAILED = 20  # unreadable sources named in the error
# DirectRunner's own defaults run one worker thread, and log each worker's start at INFO.
_DIRECT_DEFAULTS = {
    "--direct_num_workers": "0",  # one per CPU core
    "--direct_running_mode": "multi_processing",
    "--default_sdk_harness_log_level": "WARNING",
}


def pipeline_options(
    runner: str, options: str = "", data_dir: str = "", sources: Sequence[str] = ()
) -> dict:
    """`beam_runner` and `beam_options` for tfds' DownloadConfig, checked up front: an unknown
    runner or option is a DataError, and so is a local `data_dir`, source or temp_location
    on Dataflow. DirectRunner runs one worker process per CPU core unless the options say
    otherwise."""
    try:
        created = beam.runners.create_runner(runner)
    except ValueError:
        raise DataError(
            f"unknown --beam_runner {runner!r}; pass DirectRunner, DataflowRunner, SparkRunner, "
            "FlinkRunner, PrismRunner or a runner's full class name"
        ) from None
    except ImportError as e:
        raise DataError(
            f"--beam_runner {runner!r} cannot be loaded ({e}); install the Beam extra it needs"
        ) from None
    try:
        flags = shlex.split(options)
    except ValueError as e:
        raise DataError(f"cannot parse --beam_options {options!r}: {e}") from None
    parsed = beam.options.pipeline_options.PipelineOptions(flags)
    unknown = _unknown_options(parsed)
    if unknown:
        raise DataError(
            f"unknown --beam_options {', '.join(sorted('--' + u for u in unknown))}; check the "
            "spelling (Beam's options: https://beam.apache.org/releases/pydoc/current/"
            "apache_beam.options.pipeline_options.html)"
        )
    if parsed.view_as(beam.options.pipeline_options.DirectOptions).direct_running_mode == (
        "multi_threading"
    ):
        raise DataError(
            "--direct_running_mode=multi_threading loses examples between pipeline stages "
            "(measured with Beam 2.77: tfds' writer got fewer than were read); use "
            "--direct_running_mode=multi_processing"
        )
    if isinstance(created, beam.runners.DataflowRunner):
        _check_shared_nothing(runner, parsed, data_dir, sources)
    if runner in ("DirectRunner", "direct"):
        given = {f.split("=", 1)[0] for f in flags}
        flags += [f"{k}={v}" for k, v in _DIRECT_DEFAULTS.items() if k not in given]
        parsed = beam.options.pipeline_options.PipelineOptions(flags)
    return {"beam_runner": runner, "beam_options": parsed}


def _check_shared_nothing(runner: str, parsed, data_dir: str, sources: Sequence[str]) -> None:
    """Dataflow's workers share no disk with each other or this machine: what they read and
    write must be in a bucket."""
    local = [s for s in sources if not storage.is_remote(s)]
    if local:
        raise DataError(
            f"--beam_runner={runner} workers cannot read the local --source {local[0]}; copy the "
            "sources to a bucket and pass --source=gs://BUCKET/..."
        )
    if not storage.is_remote(data_dir):
        raise DataError(
            f"--beam_runner={runner} workers cannot write the local --data_dir {data_dir}; pass "
            "--data_dir=gs://BUCKET/tensorflow_datasets"
        )
    temp = parsed.view_as(beam.options.pipeline_options.GoogleCloudOptions).temp_location
    if not (temp or "").startswith("gs://"):
        raise DataError(
            f"--beam_runner={runner} needs a bucket for its temporary files; add "
            "--temp_location=gs://BUCKET/beam_tmp to --beam_options"
        )


def _unknown_options(parsed) -> set[str]:
    """The option names no Beam options class knows (Beam itself would warn and drop them;
    the error says so instead)."""
    log = logging.getLogger(beam.options.pipeline_options.__name__)
    log.disabled = True
    try:
        known = parsed.get_all_options()
    finally:
        log.disabled = False
    return set(parsed.get_all_options(retain_unknown_options=True)) - set(known)


class _Failures:
    """Sources that could not be read: the first few (index, path, message), and how many."""

    def __init__(self, first=(), count: int = 0):
        self.first, self.count = sorted(first)[:_MAX_FAILED], count

    def merge(self, other: _Failures) -> _Failures:
        return _Failures(self.first + other.first, self.count + other.count)

    def error(self) -> DataError:
        (_, _, message), *more = self.first
        if not more:
            return DataError(message)
        names = ", ".join(path for _, path, _ in more[:3])
        return DataError(f"{message}; and {self.count - 1} more unreadable source(s): {names}")


class _ReadSource(beam.DoFn):
    """(source index, path) -> (split index, (key, example)) for each example kept, and on
    the 'stats' output one (ImportStats, _Failures) for the source."""

    def __init__(self, config: image_text.ImportConfig, splits: list[str]):
        self._config, self._splits = config, splits

    def setup(self):
        self._check = image_text.Checker(self._config)
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, self._config.num_threads))

    def teardown(self):
        self._pool.shutdown(wait=False, cancel_futures=True)

    def process(self, numbered_source):
        index, path = numbered_source
        cfg, splits = self._config, self._splits
        stats, failures = image_text.ImportStats(), _Failures()
        # The single-process import reads only the splits it writes (a validation split
        # with no usable example is not read at all): so does this one.
        wanted = lambda c: cfg.split_of(c.key) in splits
        try:
            for n, cand, example, note in image_text.checked_candidates(
                path, cfg, self._check, self._pool, wanted
            ):
                split = cfg.split_of(cand.key)
                if example is None:
                    stats.skip(note, cand.origin, rank=(splits.index(split), index, n))
                    continue
                stats.add(split, example, note)
                yield splits.index(split), (index << 32 | n, example)
        except DataError as e:
            failures = _Failures([(index, path, str(e))], 1)
        yield beam.pvalue.TaggedOutput(_STATS, (stats, failures))


class _MergeStats(beam.CombineFn):
    def create_accumulator(self):
        return image_text.ImportStats(), _Failures()

    def add_input(self, acc, item):
        return acc[0].merge(item[0]), acc[1].merge(item[1])

    def merge_accumulators(self, accs):
        stats, failures = self.create_accumulator()
        for s, f in accs:
            stats, failures = stats.merge(s), failures.merge(f)
        return stats, failures

    def extract_output(self, acc):
        return acc


def _save(merged, path: str) -> None:
    storage.path(path).write_bytes(pickle.dumps(merged))


class BeamImageText(image_text.ImageText, skip_registration=True):
    """`ImageText` whose splits are built by a Beam pipeline (tfds passes `pipeline`)."""

    def _split_generators(self, dl_manager, pipeline):
        del dl_manager
        splits = self._splits_to_write()
        read = (
            pipeline
            | "Sources" >> beam.Create(list(enumerate(self._import.sources)))
            | "Spread" >> beam.Reshuffle()  # one source per work item, over all workers
            | "Read"
            >> beam.ParDo(_ReadSource(self._import, splits)).with_outputs(_STATS, main="ok")
        )
        _ = (
            read[_STATS]
            | "MergeStats" >> beam.CombineGlobally(_MergeStats())
            | "SaveStats" >> beam.Map(_save, path=os.fspath(self.data_path / _STATS_FILE))
        )
        parts = read.ok | "BySplit" >> beam.Partition(lambda item, n: item[0], len(splits))
        return {
            split: parts[i] | f"Keyed_{split}" >> beam.Values() for i, split in enumerate(splits)
        }

    def _process_pipeline_result(self, pipeline_result) -> None:
        del pipeline_result
        path = storage.path(self.data_path / _STATS_FILE)  # still the temporary folder
        stats, failures = pickle.loads(path.read_bytes())
        path.unlink()
        if failures.count:
            raise failures.error()
        stats.notes = self.stats.notes  # written by `_splits_to_write` on this host
        self.stats = stats

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        super()._download_and_prepare(dl_manager, download_config)
        # Still in tfds' temporary folder: a runner that lost examples leaves nothing.
        for split, info in self.info.splits.items():
            if info.num_examples != self.stats.written[split]:
                raise DataError(
                    f"the Beam runner wrote {info.num_examples} of the {self.stats.written[split]} "
                    f"examples read for split {split!r} of {self.name!r}, so it wrote nothing; "
                    "run the import again"
                )


def make_builder(name: str, data_dir: str, config: image_text.ImportConfig) -> BeamImageText:
    return image_text.make_builder(name, data_dir, config, base=BeamImageText)
