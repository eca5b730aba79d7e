"""Throughput and MFU of the train step of any experiment config, on synthetic batches.

    python benchmarks/train_step.py --config=experiments/demo.py
    python benchmarks/train_step.py --config=experiments/vit_b32.py --config.batch_size=64
    python benchmarks/train_step.py --config=experiments/vit_b32.py --config.batch_size=4096 \
        --config.model.remat_policy=dots --config.model.attention=cudnn --steps=20

Compiles exactly the step that training runs (`clip_jax.step.make_train_step`), times
steady-state steps on random images and tokens (so the input pipeline is not measured:
`benchmarks/input_pipeline.py` does that), and prints samples/s, the achieved model
TFLOP/s, and MFU against the device's peak. Model FLOPs are counted analytically
(`clip_jax.flops`: forward + backward of both towers and the similarity matrix, without
rematerialisation's recomputation) and cross-checked against XLA's cost analysis of the
compiled program, which does include recomputation and the optimizer update. The check
holds on CPU without gradient caching only: the cost analysis counts a loop's body once
(micro-batches) and leaves out library calls (cuBLAS and cuDNN on a GPU: a ratio of 0.05 for
ViT-B/16 on an H200), so MFU always comes from the analytic count.
"""

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from clip_jax import config as config_lib
from clip_jax import flops, losses, optim, sharding
from clip_jax import step as step_lib
from clip_jax.models.clip import attention_shapes
from clip_jax.models.layers import chosen_attention

config_flags.DEFINE_config_file(
    "config", None, "Experiment config file[:variant].", lock_config=False
)
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_integer("vocab_size", 49408, "Text vocabulary (no tokenizer is loaded).")
flags.DEFINE_bool(
    "compile_only",
    False,
    "Report FLOPs and per-device memory without running. "
    "Run it on the target accelerator to size batches: XLA:CPU's buffer assignment "
    "does not shrink with remat (benchmarks/activation_memory.py measures that).",
)
flags.mark_flag_as_required("config")
FLAGS = flags.FLAGS


def synthetic_batch(model, batch_size: int, vocab_size: int, mesh) -> dict:
    rng = np.random.default_rng(0)
    v, t = model.config.vision, model.config.text
    batch = {
        "image": rng.integers(0, 256, (batch_size, v.image_size, v.image_size, 3), np.uint8),
        "text": rng.integers(1, vocab_size - 1, (batch_size, t.context_length), np.int32),
    }
    batch["text"][:, -1] = vocab_size - 1  # every caption ends with EOT
    return jax.device_put(batch, sharding.batch_sharding(mesh))


def xla_flops(compiled) -> float | None:
    """FLOPs of the compiled program per device (None where the backend reports none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    value = (analysis or {}).get("flops")
    return float(value) if value and value > 0 else None


def attention_used(model_config) -> str:
    """model.attention; for 'auto', what it picks on these devices for each tower."""
    if model_config.attention != "auto":
        return model_config.attention
    image, text = (
        chosen_attention("auto", model_config.dtype, *shape)
        for shape in attention_shapes(model_config)
    )
    return f"auto (image {image}, text {text})"


def time_steps(compiled, state, batch) -> list[float]:
    """Seconds per step after `--warmup` untimed steps (the state is donated and replaced)."""
    for _ in range(FLAGS.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(FLAGS.steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    return times


def main(_):
    config = FLAGS.config
    config_lib.validate(config, jax.device_count(), jax.process_count())
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.model)
    model = step_lib.build_model(config, FLAGS.vocab_size, FLAGS.vocab_size - 1)
    tx = optim.make_optimizer(config.optim, config.total_steps)
    schedule = optim.schedule(config.optim, config.total_steps)
    loss_fn = losses.make_loss(
        config.loss.kind, mesh, config.loss.impl, chunk_size=config.loss.chunk_size
    )
    abstract = step_lib.abstract_train_state(model, tx, mesh, config.mesh.rules)
    shardings = step_lib.state_shardings(abstract)
    if FLAGS.compile_only:  # shapes and shardings only: nothing is allocated
        state = abstract
        batch = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
            for k, v in step_lib.dummy_batch(model, config.batch_size).items()
        }
    else:
        state = step_lib.create_train_state(model, tx, abstract, config.seed)
        batch = synthetic_batch(model, config.batch_size, FLAGS.vocab_size, mesh)
    train_step = step_lib.make_train_step(
        model,
        tx,
        loss_fn,
        schedule,
        shardings,
        mesh,
        config.micro_batch_size,
        config.optim.freeze,
    )
    num_params = sum(x.size for x in jax.tree.leaves(state.params))

    t0 = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    times = [] if FLAGS.compile_only else time_steps(compiled, state, batch)

    n = jax.device_count()
    model_flops = flops.train_step_flops(model.config, config.batch_size, config.optim.freeze)
    per_device_xla = xla_flops(compiled)
    memory = compiled.memory_analysis()
    kind = jax.devices()[0].device_kind
    peak = flops.peak_tflops(kind)

    print(
        f"config        {config.model.name}, global batch {config.batch_size}, "
        f"micro-batch {config.micro_batch_size or 'off'} per device, "
        f"dtype {config.model.dtype}, remat {config.model.remat_policy}, "
        f"attention {attention_used(model.config)}, "
        f"loss {config.loss.kind}/{config.loss.impl}, mesh data={config.mesh.data} "
        f"fsdp={config.mesh.fsdp} model={config.mesh.model}"
    )
    print(f"devices       {n} x {kind} ({jax.process_count()} process(es))")
    print(f"parameters    {num_params:,}")
    print(f"compile       {compile_s:.1f} s")
    print(f"model FLOPs   {model_flops / 1e9:,.1f} GFLOP per step (analytic, fwd+bwd)")
    if per_device_xla is not None:
        print(
            f"XLA FLOPs     {per_device_xla * n / 1e9:,.1f} GFLOP per step "
            f"(cost analysis x {n} devices; ratio to analytic "
            f"{per_device_xla * n / model_flops:.3f})"
        )
    else:
        print("XLA FLOPs     not reported by this backend")
    if memory is not None:
        print(
            f"memory        {memory.temp_size_in_bytes / 2**30:.2f} GiB temporaries, "
            f"{memory.argument_size_in_bytes / 2**30:.2f} GiB arguments per device"
        )
    if not times:
        return
    stats = jax.devices()[0].memory_stats()  # None on CPU
    if stats and "peak_bytes_in_use" in stats:
        print(
            f"peak memory   {stats['peak_bytes_in_use'] / 2**30:.2f} GiB in use on device 0 "
            f"(memory_stats(), state and batch included; limit "
            f"{stats.get('bytes_limit', 0) / 2**30:.1f} GiB)"
        )
    step_s = float(np.median(times))
    achieved = model_flops / step_s / n / 1e12  # per device
    print(
        f"step time     median {step_s * 1e3:.1f} ms over {len(times)} steps "
        f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})"
    )
    print(
        f"throughput    {config.batch_size / step_s:,.1f} samples/s, "
        f"{config.batch_size / step_s / n:,.1f} per device"
    )
    print(f"achieved      {achieved:.3f} model TFLOP/s per device")
    if peak:
        print(f"MFU           {100 * achieved / peak:.1f}% of {peak:.0f} TFLOP/s bf16 peak")
    else:
        print(f"MFU           n/a (no peak listed for '{kind}'; see clip_jax.flops.PEAK_TFLOPS)")


if __name__ == "__main__":
    jax.config.update("jax_threefry_partitionable", True)
    app.run(main)
