"""Per-device memory of the train step as the global batch grows, with gradient caching.

    python benchmarks/batch_scaling.py                    # tiny-vit, 8 simulated devices
    python benchmarks/batch_scaling.py --micro=off,64     # 'off' = the plain step
    python benchmarks/batch_scaling.py --run_step         # + one real step at 65,536
    python benchmarks/batch_scaling.py --stream           # + the streamed step's memory
    python benchmarks/batch_scaling.py --model=ViT-B/32 --context_length=77 --vocab=49408 \
        --dtype=bfloat16 --micro=off,512 --stream         # a real model (6 min, 2 cores)

Compiles (does not run) the real train step (`clip_jax.step.make_train_step`, the ring loss
folded in `--chunk_size` chunks) for every global batch x micro-batch size (rows per device)
and prints XLA's per-device temporary memory (`compiled.memory_analysis()`), next to the
temporary memory of the loss + its gradient alone on the same batch. With gradient caching the
step holds one micro-batch's activations plus the embeddings and their gradients, `O(b * D)`
for `b` rows per device, so at fixed micro-batch it grows only by that term; the plain step
holds every example's activations. CPU buffer assignment, not an accelerator's: compare rows
with each other (`benchmarks/activation_memory.py` gives the per-example activation memory).
`--run_step` then runs one optimizer step at `--run_batch` on the host CPU and prints its time
(with `--stream`, also the streamed step's, in the same process).

`--stream` adds a second table: per-device memory held at the peak, temporaries plus
arguments (state, and the input batch: a 224-px example is 150,836 bytes, the tiny model's
32-px one 3,136), of the gradient-cached step with the whole batch on the devices against
the streamed step (`stream_micro_batches=True`: `grad_cache.StreamedGradients`, the largest
of its phases).
"""

import argparse

from simulated_devices import use_cpu_devices

_p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
_p.add_argument("--model", default="tiny-vit")
_p.add_argument("--context_length", type=int, default=16, help="text tokens (77 for real models)")
_p.add_argument("--vocab", type=int, default=512, help="vocabulary (49,408 for real models)")
_p.add_argument("--dtype", default="float32", help="model.dtype (bfloat16 for real models)")
_p.add_argument("--batches", default="4096,16384,65536,262144,1048576", help="global batches")
_p.add_argument("--micro", default="off,64,512", help="rows per device per micro-batch; off: plain")
_p.add_argument("--kind", default="softmax", choices=("softmax", "sigmoid"))
_p.add_argument("--chunk_size", type=int, default=1024, help="ring loss chunk (loss.chunk_size)")
_p.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
_p.add_argument("--run_step", action="store_true", help="also time one real optimizer step")
_p.add_argument("--run_batch", type=int, default=65536)
_p.add_argument("--run_micro", type=int, default=512)
_p.add_argument("--stream", action="store_true", help="also the streamed step's memory")
ARGS = _p.parse_args()

use_cpu_devices(ARGS.devices)  # before jax is imported

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from clip_jax import config as config_lib  # noqa: E402
from clip_jax import grad_cache, losses, optim, sharding  # noqa: E402
from clip_jax import step as step_lib  # noqa: E402

MIB = 2**20
VOCAB = ARGS.vocab


def experiment(batch_size: int, micro_batch_size: int):
    c = config_lib.defaults()
    c.model.name = ARGS.model
    c.model.use_logit_bias = ARGS.kind == "sigmoid"
    c.model.dtype = ARGS.dtype
    c.tokenizer.context_length = ARGS.context_length
    c.batch_size, c.micro_batch_size = batch_size, micro_batch_size
    c.loss.kind, c.loss.impl, c.loss.chunk_size = ARGS.kind, "ring", ARGS.chunk_size
    c.optim.warmup_steps = 1
    config_lib.validate(c, jax.device_count())
    return c


class Step:
    """The compiled-on-demand train step of one config, and what it needs to run."""

    def __init__(self, c):
        self.config = c
        self.mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.model)
        self.model = step_lib.build_model(c, VOCAB, VOCAB - 1)
        self.tx = optim.make_optimizer(c.optim, c.total_steps)
        self.loss_fn = losses.make_loss(
            c.loss.kind, self.mesh, "ring", chunk_size=c.loss.chunk_size
        )
        self.abstract = step_lib.abstract_train_state(self.model, self.tx, self.mesh)
        self.step = step_lib.make_train_step(
            self.model,
            self.tx,
            self.loss_fn,
            optim.schedule(c.optim, c.total_steps),
            step_lib.state_shardings(self.abstract),
            self.mesh,
            c.micro_batch_size,
        )
        rows = sharding.batch_sharding(self.mesh)
        self.batch = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows)
            for k, v in step_lib.dummy_batch(self.model, c.batch_size).items()
        }

    def compile(self):
        return self.step.lower(self.abstract, self.batch).compile()

    def streamed(self) -> grad_cache.StreamedGradients:
        return grad_cache.StreamedGradients(
            self.model,
            step_lib.make_objective(self.loss_fn),
            self.mesh,
            self.config.micro_batch_size,
            param_shardings=step_lib.state_shardings(self.abstract).params,
        )

    def micro_batches(self) -> int:
        return self.config.batch_size // jax.device_count() // self.config.micro_batch_size

    def streamed_peak(self) -> int:
        """Bytes per device (temporaries + arguments) of the largest streamed phase."""
        rows = self.config.micro_batch_size * jax.device_count()
        micro = {
            k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype, sharding=v.sharding)
            for k, v in self.batch.items()
        }
        lowered = self.streamed().lower(
            self.abstract.params, self.abstract.model_state, micro, self.micro_batches()
        )
        return max(_resident(low.compile()) for low in lowered.values())

    def loss_temp(self) -> int:
        """Temporary bytes per device of the loss + its gradient alone, on this batch."""
        rows = sharding.batch_sharding(self.mesh)
        emb = jax.ShapeDtypeStruct(
            (self.config.batch_size, self.model.config.embed_dim), jnp.float32, sharding=rows
        )
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(self.mesh))
        bias = scalar if self.config.loss.kind == "sigmoid" else None
        fn = jax.value_and_grad(self.loss_fn, argnums=(0, 1, 2), has_aux=True)
        return (
            jax.jit(fn).lower(emb, emb, scalar, bias).compile().memory_analysis().temp_size_in_bytes
        )


def _resident(compiled) -> int:
    memory = compiled.memory_analysis()
    return memory.temp_size_in_bytes + memory.argument_size_in_bytes


def stream_table():
    batches = [int(b) for b in ARGS.batches.split(",")]
    micro = ARGS.run_micro
    print(
        f"\nmicro-batch {micro} per device: temporaries + arguments per device (MiB), the "
        "whole batch on the devices against streamed micro-batches"
    )
    print(f"{'global batch':>12} {'whole batch':>12} {'streamed':>10}")
    for batch in batches:
        if micro > batch // jax.device_count():
            continue
        step = Step(experiment(batch, micro))
        whole, streamed = _resident(step.compile()), step.streamed_peak()
        print(f"{batch:>12,} {whole / MIB:>12.1f} {streamed / MIB:>10.1f}", flush=True)


def table():
    batches = [int(b) for b in ARGS.batches.split(",")]
    micros = [0 if m == "off" else int(m) for m in ARGS.micro.split(",")]
    n = jax.device_count()
    print(
        f"{ARGS.model}, {ARGS.kind} loss (ring, chunk {ARGS.chunk_size}), {n} simulated CPU "
        "devices: temporary memory per device (MiB), compile only"
    )
    header = f"{'global batch':>12} {'per device':>10} {'loss':>9}"
    for m in micros:
        header += f" {'step, ' + (f'micro {m}' if m else 'plain'):>18}"
    print(header)
    first = {}
    for batch in batches:
        per_device = batch // n
        line = f"{batch:>12,} {per_device:>10,}"
        loss = None
        for m in micros:
            if m > per_device:
                line += f" {'-':>18}"
                continue
            step = Step(experiment(batch, m))
            if loss is None:
                loss = step.loss_temp()
                line += f" {loss / MIB:>9.1f}"
            temp = step.compile().memory_analysis().temp_size_in_bytes
            first.setdefault(m, temp)
            line += f" {temp / MIB:>10.1f} ({temp / first[m]:>4.2f}x)"
        print(line, flush=True)
    print("(Nx) = the step's temporary memory relative to the first batch that fits the column.")


def run_step():
    step = Step(experiment(ARGS.run_batch, ARGS.run_micro))
    rng = np.random.default_rng(0)
    v = step.model.config.vision
    text = rng.integers(1, VOCAB - 1, (ARGS.run_batch, ARGS.context_length), np.int32)
    text[:, -1] = VOCAB - 1
    batch = jax.device_put(
        {
            "image": rng.integers(
                0, 256, (ARGS.run_batch, v.image_size, v.image_size, 3), np.uint8
            ),
            "text": text,
        },
        sharding.batch_sharding(step.mesh),
    )
    state = step_lib.create_train_state(step.model, step.tx, step.abstract, seed=0)
    t0 = time.perf_counter()
    compiled = step.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    loss = float(metrics["loss"])
    print(
        f"one optimizer step at global batch {ARGS.run_batch:,} (micro-batch {ARGS.run_micro} "
        f"per device, {jax.device_count()} simulated CPU devices): "
        f"{time.perf_counter() - t0:.1f} s (compile {compile_s:.1f} s), loss {loss:.4f} "
        f"(log {ARGS.run_batch:,} = {np.log(ARGS.run_batch):.4f})"
    )
    if not ARGS.stream:
        return
    # The same step fed micro-batch by micro-batch, from host copies of the same batch.
    host = jax.device_get(batch)
    rows, count = ARGS.run_micro * jax.device_count(), step.micro_batches()

    def micro_batches():
        for i in range(count):
            micro = {k: v[i * rows : (i + 1) * rows] for k, v in host.items()}
            yield jax.device_put(micro, sharding.batch_sharding(step.mesh))

    streamed = step.streamed()
    for label in ("compile + first", "second"):  # the first call compiles the phases
        t0 = time.perf_counter()
        (loss, _), grads = streamed(
            state.params, state.model_state, micro_batches(), micro_batches(), count
        )
        jax.block_until_ready(grads)
        print(
            f"streamed gradients ({count} micro-batches of {rows:,}), {label} call: "
            f"{time.perf_counter() - t0:.1f} s, loss {float(loss):.4f}"
        )


if __name__ == "__main__":
    jax.config.update("jax_threefry_partitionable", True)
    table()
    if ARGS.stream:
        stream_table()
    if ARGS.run_step:
        run_step()
