"""The training loop and its command line.

    python -m clip_jax.train --config=experiments/vit_b32.py[:variant] --workdir=DIR \
        [--config.batch_size=4096 ...]

`train(config, workdir)` is the same run, callable from Python. `setup(config, workdir)`
builds the `Run` that training and `clip_jax.evaluate` share.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import signal
import sys
import time
import traceback

import jax
import ml_collections
import numpy as np
import optax
from absl import flags
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from ml_collections import config_flags

from clip_jax import cli, flops, losses, optim, peer_loss, profiling, sharding, storage, warm_start
from clip_jax import config as config_lib
from clip_jax import step as step_lib
from clip_jax.checkpoint import Checkpointer
from clip_jax.data import info, paths, pipeline, prepare, truncation
from clip_jax.data.source import Source, record_captions
from clip_jax.data.tokenizer import Tokenizer, load_tokenizer
from clip_jax.device_prefetch import DevicePrefetch
from clip_jax.errors import UserError
from clip_jax.eval import preflight, runner
from clip_jax.eval.results import flat_metrics
from clip_jax.metric_writers import MetricWriter
from clip_jax.models import CLIP


class NonFiniteError(UserError, RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient."""


@dataclasses.dataclass(frozen=True)
class Run:
    """What the parts of a run read; built once by `setup`."""

    config: ml_collections.ConfigDict
    workdir: str
    data_dir: str
    tokenizer: Tokenizer
    model: CLIP
    mesh: Mesh
    tx: optax.GradientTransformation
    init_from: warm_start.Source | None = None  # model.init_from, checked against the model


def _check_workdir(workdir: str) -> None:
    """A folder or bucket prefix that exists (or is created now) and takes new files:
    checkpoints, metrics."""
    storage.check_writable_dir(workdir, "--workdir")  # an unreachable bucket is reported first
    storage.require(workdir, "checkpoints", "--workdir")


def setup(config: ml_collections.ConfigDict, workdir: str, eval_tasks: str | None = None) -> Run:
    """Everything that can fail on bad input, before anything compiles. ``eval_tasks``: the
    evaluation tasks to check, when not ``config.eval.tasks``."""
    config_lib.validate(config, jax.device_count(), jax.process_count())
    _check_workdir(workdir)
    data_dir = paths.resolve_data_dir(config.data.data_dir)
    storage.require(data_dir, "datasets", "--config.data.data_dir")
    init_from = None
    if config.model.init_from and not warm_start.has_checkpoint(workdir):
        init_from = warm_start.open_source(config.model.init_from, config.model.init_towers)
    # A text tower copied from a source that names its tokenizer uses that tokenizer,
    # unless tokenizer.path names another one.
    tokenizer = None
    if init_from is not None and not config.tokenizer.path:
        tokenizer = init_from.tokenizer(config.tokenizer.context_length)
    if tokenizer is None:
        tokenizer = load_tokenizer(
            config.tokenizer.path,
            dataset=config.data.name,
            data_dir=data_dir,
            context_length=config.tokenizer.context_length,
            lowercase=config.tokenizer.lowercase,
            kind=config.tokenizer.kind,
        )
    preflight.check_tasks(config.eval, config_lib.eval_data_dir(config), eval_tasks)
    model = step_lib.build_model(config, tokenizer.vocab_size, tokenizer.eot_id)
    if init_from is not None:
        init_from.check(config.model.name, model.config)
    return Run(
        config=config,
        workdir=workdir,
        data_dir=data_dir,
        tokenizer=tokenizer,
        model=model,
        mesh=sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.model),
        tx=optim.make_optimizer(config.optim, config.total_steps),
        init_from=init_from,
    )


def _prepare_training_data(run: Run) -> None:
    """Process 0 builds the demo dataset if it is missing while the others wait; then every
    process checks that the training and validation splits are there (an error names the
    prepare command)."""
    data = run.config.data

    def ensure_prepared():
        prepare.ensure_prepared(data.name, run.data_dir, splits=(data.train_split, data.eval_split))

    if jax.process_index() == 0:
        ensure_prepared()
    multihost_utils.sync_global_devices("clip_jax.train: training data prepared")
    if jax.process_index() != 0:
        ensure_prepared()


def _report_truncation(run: Run, sample: int = 1000) -> None:
    """One console line: the share of (a spread sample of) training captions that are longer
    than tokenizer.context_length, and so cut."""
    c = run.config
    src = Source(c.data.name, c.data.train_split, run.data_dir)
    indices = np.unique(np.linspace(0, len(src) - 1, min(sample, len(src))).astype(int))
    captions = [text for record in src.get(indices) for text in record_captions(record)]
    cut = truncation.truncated(run.tokenizer, captions)
    if captions and jax.process_index() == 0:
        print(
            f"captions longer than tokenizer.context_length={c.tokenizer.context_length} (cut): "
            f"{cut.mean():.1%} of {len(captions)} captions of {len(indices)} examples sampled from "
            f"{c.data.name}/{c.data.train_split}",
            flush=True,
        )


def _micro_batches(run: Run) -> int:
    """Micro-batches per step that the loader hands out one at a time (1: whole batches)."""
    c = run.config
    if not c.stream_micro_batches:
        return 1
    return c.batch_size // sharding.batch_shards(run.mesh) // c.micro_batch_size


def _train_loader(run: Run) -> pipeline.TrainLoader:
    c = run.config
    return pipeline.train_loader(
        c.data.name,
        c.data.train_split,
        run.data_dir,
        global_batch_size=c.batch_size,
        image_size=run.model.config.vision.image_size,
        tokenizer=run.tokenizer,
        seed=c.seed,
        crop_scale=(c.data.crop_scale_min, c.data.crop_scale_max),
        num_workers=c.data.num_workers,
        num_threads=c.data.num_threads,
        prefetch=c.data.prefetch,
        slices=_micro_batches(run),
    )


def _restore_or_init(
    run: Run, abstract: step_lib.TrainState, ckpt: Checkpointer, loader: pipeline.TrainLoader
) -> tuple[step_lib.TrainState, int]:
    """(state, step): the latest checkpoint that restores (and the loader's position in it),
    or a fresh state when there is none. Never both: a resume holds one copy of the state."""
    restored = ckpt.restore_latest(abstract)
    if restored is None:
        state = step_lib.create_train_state(run.model, run.tx, abstract, run.config.seed)
        if run.init_from is not None:
            params, model_state = run.init_from.apply(state.params, state.model_state)
            state = state.replace(params=params, model_state=model_state)
            print(
                f"initialised {'+'.join(run.init_from.towers)} from {run.init_from.path}",
                flush=True,
            )
        return state, 0
    start, state, loader_state = restored
    loader.set_state(loader_state)
    print(f"resumed from step {start} in {run.workdir}", flush=True)
    return state, int(start)


class _PreemptionFlag:
    """Set by SIGTERM (what schedulers send before preemption); read at step boundaries.

    A single process only. In a multi-process run SIGTERM often reaches one host alone (a
    preempted VM); jax.distributed's preemption service catches it there and every process
    stops at the same step (`Checkpointer.reached_preemption`). A handler here would replace
    the service's and stop the signalled process alone, leaving the others in a collective.
    """

    def __init__(self):
        self.set = False
        self._previous = None
        if not jax.distributed.is_initialized():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.set = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# Waiting for input longer than this share of the time warns (once): the devices idle.
INPUT_BOUND_SHARE = 0.10


class _LogWindow:
    """Wall time, data-wait time and steps since the last logged step."""

    def __init__(
        self, batch_size: int, n_devices: int, step_flops: float, peak_tflops: float | None
    ):
        self.batch_size, self.n_devices = batch_size, n_devices
        self.step_flops, self.peak_tflops = step_flops, peak_tflops
        self.windows = 0  # windows ended so far; the first holds start-up and compilation
        self.warned = False
        self.reset()

    def reset(self):
        self.t0, self.data_wait, self.steps = time.time(), 0.0, 0

    @contextlib.contextmanager
    def waiting_for_data(self):
        t = time.time()
        yield
        self.data_wait += time.time() - t

    def rates(self) -> dict[str, float]:
        elapsed, steps = max(time.time() - self.t0, 1e-9), max(self.steps, 1)
        tflops = self.step_flops * steps / elapsed / self.n_devices / 1e12
        rates = {
            "step_time": elapsed / steps,
            "data_wait": self.data_wait / elapsed,  # share of the time spent waiting for input
            "samples_per_s": self.batch_size * steps / elapsed,
            "samples_per_s_per_device": self.batch_size * steps / elapsed / self.n_devices,
            "model_tflops_per_device": tflops,
        }
        if self.peak_tflops:
            rates["mfu"] = tflops / self.peak_tflops
        return rates

    def end(self) -> dict[str, float]:
        """This window's rates; the next window starts now."""
        rates = self.rates()
        self.windows += 1
        self.reset()
        return rates

    def input_bound_warning(self, data_wait: float, config: ml_collections.ConfigDict) -> str:
        """One line the first time that a window after the first waited for input more than
        INPUT_BOUND_SHARE of its time ('' otherwise); `data_wait` from the window just ended."""
        if self.warned or self.windows < 2 or data_wait <= INPUT_BOUND_SHARE:
            return ""
        self.warned = True
        where = f" on process {jax.process_index()}" if jax.process_count() > 1 else ""
        data = config.data
        rereading = config.stream_micro_batches and config.stream_second_pass == "reread"
        return (
            f"warning: the training loop waited for input {data_wait:.0%} of the time{where} "
            f"(over {INPUT_BOUND_SHARE:.0%}: the devices idle); raise data.num_workers (now "
            f"{data.num_workers}), data.num_threads (now {data.num_threads}) or data.prefetch "
            f"(now {data.prefetch}), "
            + ("decode each image once (stream_second_pass=keep), " if rereading else "")
            + "or store smaller images (python -m clip_jax.data.prepare --max_size)"
        )


def _check_and_log(step, metrics, writer, window, feed, config, force=False):
    bad = int(metrics["bad_steps"])
    if bad >= config.max_bad_steps:
        raise NonFiniteError(
            f"{bad} steps in a row had a non-finite loss or gradient (last at step {step}); "
            "parameters were left untouched on each. Lower optim.lr, set optim.grad_clip_norm, "
            "or raise max_bad_steps."
        )
    if step % config.log_every and not force:
        return None
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    seen = step * config.batch_size
    values.update(
        window.end(),
        examples_seen=seen,
        epoch=seen / feed.loader.num_records,
        # this host's count: unreadable images replaced by a deterministic substitute
        images_replaced=feed.num_replaced,
    )
    warning = window.input_bound_warning(values["data_wait"], config)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    writer.write(step, values)
    return values


def _validation_batch_size(run: Run) -> int:
    """eval.batch_size, or for a smaller validation split the largest batch that it fills and
    the devices split evenly (a padded batch is never used); 0 when not even that fits."""
    c = run.config
    num_examples = info.dataset_info(c.data.name, run.data_dir)["num_examples"][c.data.eval_split]
    if num_examples >= c.eval.batch_size:
        return c.eval.batch_size
    shards = sharding.batch_shards(run.mesh)
    size = num_examples // shards * shards
    if jax.process_index() == 0:
        use = f"uses batches of {size}" if size else "is skipped (fewer examples than devices)"
        print(
            f"warning: validation split {c.data.name}/{c.data.eval_split} has {num_examples} "
            f"examples, fewer than eval.batch_size={c.eval.batch_size}: the validation loss {use}",
            file=sys.stderr,
            flush=True,
        )
    return size


def _validation(run: Run, eval_step, state, batch_size: int) -> dict[str, float]:
    """Validation-split contrastive loss and in-batch accuracy over its full batches."""
    c = run.config
    if not batch_size:
        return {}
    loader = pipeline.eval_loader(
        c.data.name,
        c.data.eval_split,
        run.data_dir,
        batch_size=batch_size,
        image_size=run.model.config.vision.image_size,
        tokenizer=run.tokenizer,
    )
    totals, batches = {}, 0
    for batch in loader:
        if not np.all(batch["mask"]):
            continue  # a padded batch would add fake pairs to the contrastive loss
        batch = sharding.to_global({"image": batch["image"], "text": batch["text"]}, run.mesh)
        metrics = jax.device_get(eval_step(state.params, state.model_state, batch))
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + float(value)
        batches += 1
    return {f"val/{k}": v / batches for k, v in totals.items()} if batches else {}


def _evaluate(run: Run, eval_step, state, writer, step, val_batch_size) -> dict[str, float]:
    results = _validation(run, eval_step, state, val_batch_size)
    if run.config.eval.tasks:
        c = run.config
        results.update(
            flat_metrics(
                runner.evaluate_state(
                    c.eval,
                    run.model,
                    state.params,
                    state.model_state,
                    run.tokenizer,
                    run.mesh,
                    step,
                    data_dir=config_lib.eval_data_dir(c),
                    workdir=run.workdir,
                )
            )
        )
    if results:
        writer.write(step, results, console=False)
        if jax.process_index() == 0:
            print(
                f"eval at step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in results.items()),
                flush=True,
            )
    return results


class _Keeping:
    """The loader (its state and attributes too), also appending each host batch it hands
    out to `kept`."""

    def __init__(self, loader, kept: collections.deque):
        self._loader, self._kept = loader, kept

    def __next__(self) -> dict:
        batch = next(self._loader)
        self._kept.append(batch)
        return batch

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Replay:
    """The kept host batches again, oldest first (a loader for `DevicePrefetch`)."""

    def __init__(self, kept: collections.deque):
        self.kept = kept

    def __next__(self) -> dict:
        return self.kept.popleft()

    def get_state(self) -> dict:
        return {"num_replaced": 0}  # the first pass counts replaced images


def _make_advance(run: Run, loss_fn, schedule, shardings, loader, window):
    """(`advance(state) -> (state, metrics)`, `feed`). `feed` puts the loader's batches on
    the devices ahead of the step (its state is what a checkpoint saves); `advance` runs one
    optimizer step on the next global batch, or, with stream_micro_batches, on its
    micro-batches: `feed` gives them to the embedding pass, and the back-propagation pass
    gets the same ones again from a second loader started at the same position
    (stream_second_pass='reread') or from the host copies the first pass kept ('keep').
    Every wait for input counts in `window`."""
    c = run.config
    args = (run.model, run.tx, loss_fn, schedule, shardings, run.mesh, c.micro_batch_size)
    if not c.stream_micro_batches:
        train_step = step_lib.make_train_step(*args, c.optim.freeze)
        feed = DevicePrefetch(loader, run.mesh, c.data.device_prefetch)

        def advance(state):
            with window.waiting_for_data():
                batch = next(feed)
            return train_step(state, batch)

        return advance, feed

    streamed_step = step_lib.make_streamed_train_step(*args, c.optim.freeze)
    if c.stream_second_pass == "keep":
        kept = collections.deque()
        feed = DevicePrefetch(_Keeping(loader, kept), run.mesh, c.data.device_prefetch)
        # No read-ahead: the copies of the next step's micro-batches may not exist yet.
        second_feed = DevicePrefetch(_Replay(kept), run.mesh, depth=0)
    else:
        feed = DevicePrefetch(loader, run.mesh, c.data.device_prefetch)
        second_loader = _train_loader(run)
        second_loader.set_state(loader.get_state())
        second_feed = DevicePrefetch(second_loader, run.mesh, c.data.device_prefetch)
    micro_batches = _micro_batches(run)

    def timed(micro_batch_feed):
        while True:
            with window.waiting_for_data():
                micro_batch = next(micro_batch_feed)
            yield micro_batch

    def advance(state):
        return streamed_step(state, timed(feed), timed(second_feed), micro_batches)

    return advance, feed


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) in `workdir`; returns the last logged metrics."""
    run = setup(config, workdir)
    _prepare_training_data(run)
    _report_truncation(run)
    if jax.process_index() == 0:
        storage.write_text(storage.join(workdir, "config.json"), config_lib.to_json(config))

    model, mesh = run.model, run.mesh
    schedule = optim.schedule(config.optim, config.total_steps)
    loss_fn = losses.make_loss(
        config.loss.kind, mesh, config.loss.impl, chunk_size=config.loss.chunk_size
    )
    abstract = step_lib.abstract_train_state(model, run.tx, mesh, config.mesh.rules)
    shardings = step_lib.state_shardings(abstract)
    eval_step = step_lib.make_eval_step(model, loss_fn, shardings, mesh)
    loader = _train_loader(run)
    ckpt = Checkpointer(
        storage.join(workdir, "checkpoints"),
        keep=config.checkpoint.keep,
        keep_period=config.checkpoint.keep_period,
        async_save=config.checkpoint.async_save,
    )
    state, start = _restore_or_init(run, abstract, ckpt, loader)
    val_batch_size = _validation_batch_size(run)

    writer = MetricWriter(workdir, config.total_steps, resume_step=start)
    preempted = _PreemptionFlag()
    # The preemption service counts steps from its last call (0 before any); a resumed run
    # tells it where it starts, or a SIGTERM before the first step would pick a passed step.
    ckpt.reached_preemption(start)
    window = _LogWindow(
        config.batch_size,
        jax.device_count(),
        flops.train_step_flops(model.config, config.batch_size, config.optim.freeze),
        flops.peak_tflops(jax.devices()[0].device_kind),
    )
    # The loader reads ahead of the steps; `feed` knows its state after the batches used.
    advance, feed = _make_advance(run, loss_fn, schedule, shardings, loader, window)
    profiler = profiling.StepProfiler(config.profile_steps, workdir)
    last: dict[str, float] = {}
    pending = None  # (step, metrics) of the previous step, read while this one runs
    evaluated: dict[str, float] = {}
    step = start
    try:
        while step < config.total_steps:
            profiler.before_step(step + 1)  # the trace shows the wait for input too
            state, metrics = advance(state)
            step += 1
            window.steps += 1
            profiler.after_step(step, metrics)
            if pending is not None:
                last = _check_and_log(*pending, writer, window, feed, config) or last
            pending = (step, metrics)
            stop = preempted.set or ckpt.reached_preemption(step)
            if stop or step % config.checkpoint.every_steps == 0 or step == config.total_steps:
                ckpt.save(step, state, feed.get_state())
                writer.flush_after(step)  # a bucket's metrics.jsonl is uploaded once it is logged
            if stop:
                ckpt.wait()
                print(f"preemption signal: saved step {step}, exiting", flush=True)
                break
            periodic = config.eval.every_steps and step % config.eval.every_steps == 0
            if periodic or step == config.total_steps:
                evaluated = _evaluate(run, eval_step, state, writer, step, val_batch_size)
        if pending is not None:
            last = _check_and_log(*pending, writer, window, feed, config, force=True) or last
        if step == config.total_steps and not preempted.set:
            last.update(evaluated)
    finally:
        profiler.stop()
        loader.close()  # worker processes stop, and the shared memory in flight is freed
        ckpt.wait()
        ckpt.close()
        writer.close()
        preempted.restore()
    return last


def initialize_distributed(
    coordinator: str,
    num_processes: int,
    process_id: int,
    auto: bool,
    heartbeat_timeout_s: int,
    workdir: str,
) -> None:
    """Joins a multi-process run: explicit (local runs) or auto-detected (SLURM, TPU pods).

    A process that stops heartbeating for `heartbeat_timeout_s` counts as dead, and jax's
    coordination service then ends every other one (a coordinator that dies ends them at
    once). The stderr of each goes through `peer_loss`, which turns the fatal dump into one
    line that names the lost process and the checkpoint a relaunch resumes from.
    """
    if not (coordinator or auto):
        return
    explicit = {}
    if coordinator:
        # Cross-process collectives for the CPU backend; accelerator backends ignore it.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        explicit = dict(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
    jax.distributed.initialize(**explicit, heartbeat_timeout_seconds=heartbeat_timeout_s)
    peer_loss.start_filter(
        jax.process_count(), jax.process_index(), storage.join(workdir, "checkpoints")
    )


@contextlib.contextmanager
def _awaiting_peer_loss(heartbeat_timeout_s: int):
    """A collective that fails in a multi-process run (gloo: "connection reset by peer") most
    often means that another process died. The coordination service confirms that within the
    heartbeat timeout and ends this process, reported in one line by `peer_loss`; waiting for
    it, rather than raising at once, gives one message for one cause. An error that outlives
    the wait is raised as it came."""
    try:
        yield
    except jax.errors.JaxRuntimeError:
        if jax.process_count() > 1:
            time.sleep(2 * heartbeat_timeout_s)
        raise


@contextlib.contextmanager
def _alone_on_error():
    """A multi-process run whose process fails on its own (a bug, a path only this host
    cannot read) exits at once. A normal exit would wait in jax.distributed's shutdown
    barrier (up to 5 minutes) for peers that are waiting for it in a collective; gone, it
    stops heartbeating, and the coordination service ends the others within the timeout."""
    try:
        yield
    except BaseException as e:
        if jax.process_count() == 1 or isinstance(e, SystemExit):
            raise
        if isinstance(e, cli.USER_ERRORS):
            status = cli.report(e)
        else:
            traceback.print_exc()
            status = 1
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(status)


def main(argv=None) -> int:
    config_flags.DEFINE_config_file(
        "config", None, "Experiment config file[:variant].", lock_config=False
    )
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and evaluations go.")
    flags.DEFINE_string(
        "coordinator", "", "host:port of process 0, for explicit multi-process runs."
    )
    flags.DEFINE_integer("num_processes", 1, "Processes in an explicit multi-process run.")
    flags.DEFINE_integer("process_id", 0, "This process's index in an explicit multi-process run.")
    flags.DEFINE_bool("multihost", False, "Auto-detect the cluster (SLURM, TPU pod) and join it.")
    flags.DEFINE_integer(
        "heartbeat_timeout_s",
        100,
        "Multi-process runs: seconds without a heartbeat after which a process counts as dead "
        "and every other one stops (exit status 134, one line on stderr).",
        lower_bound=1,
    )
    flags.mark_flags_as_required(["config", "workdir"])

    def run():
        f = flags.FLAGS
        initialize_distributed(
            f.coordinator,
            f.num_processes,
            f.process_id,
            f.multihost,
            f.heartbeat_timeout_s,
            f.workdir,
        )
        with _alone_on_error(), _awaiting_peer_loss(f.heartbeat_timeout_s):
            train(f.config, f.workdir)

    cli.run_absl(run, argv, check_argv=config_lib.check_command_line)
    return 0


if __name__ == "__main__":
    jax.config.update("jax_threefry_partitionable", True)
    main()
