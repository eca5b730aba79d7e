"""Per-device memory and time of the contrastive loss + gradient: dense vs gather vs ring.

Runs on the host CPU with simulated devices (8 by default), so the memory figures are XLA's
per-device buffer assignment (``compiled.memory_analysis().temp_size_in_bytes``) for the
compiled loss + gradient w.r.t. both embeddings and the logit scale, and the times are those of
one evaluation on simulated CPU devices (all sharing the host's cores: compare the columns with
each other, not with accelerators).

    python benchmarks/loss_memory.py                      # B = 4096, 16384, 32768, D = 512
    python benchmarks/loss_memory.py --batches=4096 --kind=sigmoid
    python benchmarks/loss_memory.py --impls=ring --chunk_size=0,1024 --batches=32768

The ring gives one row per ``--chunk_size`` (0 = one chunk per tile, the plain ring; a size
``c`` folds each ``b x b`` tile in ``c x c`` chunks). The dense form runs unsharded on one
device. A timing whose host footprint (per-device temp x devices it runs on, plus inputs)
exceeds ``--mem_budget_gib`` (default: 60% of MemAvailable) is skipped and the table says how
much it would need; its memory column still comes from compiling alone.
"""

import argparse
import functools
import os
import sys

from simulated_devices import use_cpu_devices

_p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
_p.add_argument("--batches", default="4096,16384,32768", help="comma-separated global batches")
_p.add_argument("--width", type=int, default=512)
_p.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
_p.add_argument("--kind", default="softmax", choices=("softmax", "sigmoid"))
_p.add_argument("--impls", default="dense,gather,ring")
_p.add_argument(
    "--chunk_size", default="0,1024", help="comma-separated ring chunk sizes (0 = whole tile)"
)
_p.add_argument("--mem_budget_gib", type=float, default=None)
_p.add_argument("--no_time", action="store_true", help="compile only (memory column only)")
_p.add_argument("--repeats", type=int, default=1, help="timed evaluations; the best is shown")
ARGS = _p.parse_args()

use_cpu_devices(ARGS.devices)  # before jax is imported

import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from clip_jax import losses, sharding  # noqa: E402

GIB = 1024**3


def _mem_available() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GIB


def _fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024**2:.1f} MiB"


def _compile(kind: str, impl: str, batch: int, width: int, mesh, chunk_size: int):
    if impl == "dense":
        fn = losses.make_loss(kind)
        emb_sh = scalar_sh = SingleDeviceSharding(jax.devices()[0])
        n_dev = 1
    else:
        fn = losses.make_loss(kind, mesh, impl, chunk_size=chunk_size)
        emb_sh = sharding.batch_sharding(mesh)
        scalar_sh = sharding.replicated(mesh)
        n_dev = mesh.size
    bias = kind == "sigmoid"

    def loss_and_grads(img, txt, scale, b):
        return jax.value_and_grad(
            lambda i, t, s: fn(i, t, s, b if bias else None)[0], argnums=(0, 1, 2)
        )(img, txt, scale)

    emb = jax.ShapeDtypeStruct((batch, width), jnp.float32, sharding=emb_sh)
    scal = jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar_sh)
    compiled = jax.jit(loss_and_grads).lower(emb, emb, scal, scal).compile()
    return compiled, emb_sh, scalar_sh, n_dev


def _inputs(batch, width, emb_sh, scalar_sh):
    k1, k2 = jax.random.split(jax.random.key(0))

    @jax.jit
    def make():
        img = jax.random.normal(k1, (batch, width), jnp.float32)
        txt = img + jax.random.normal(k2, (batch, width), jnp.float32)
        norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
        return norm(img), norm(txt)

    img, txt = make()
    img, txt = jax.device_put(img, emb_sh), jax.device_put(txt, emb_sh)
    scale = jax.device_put(jnp.float32(14.3), scalar_sh)
    bias = jax.device_put(jnp.float32(-10.0), scalar_sh)
    return img, txt, scale, bias


def main():
    batches = [int(b) for b in ARGS.batches.split(",")]
    impls = ARGS.impls.split(",")
    chunk_sizes = [int(c) for c in ARGS.chunk_size.split(",")]
    # (impl, chunk size) per row: the ring once per chunk size, the others once.
    rows = [(impl, c) for impl in impls for c in (chunk_sizes if impl == "ring" else [0])]
    budget = (
        ARGS.mem_budget_gib * GIB if ARGS.mem_budget_gib is not None else 0.6 * _mem_available()
    )
    mesh = sharding.make_mesh(data=-1)  # all simulated devices on the batch axes
    n = mesh.size
    print(
        f"# {ARGS.kind} loss + grad (d/d image_emb, text_emb, logit_scale), width "
        f"{ARGS.width}, float32, {n} simulated CPU devices (jax {jax.__version__}, "
        f"{os.cpu_count()} host cores), host-memory budget for timed runs "
        f"{_fmt_bytes(budget)}"
    )
    print(
        "# temp = compiled.memory_analysis().temp_size_in_bytes per device "
        f"(dense: unsharded, one device); time = best of {ARGS.repeats} evaluation(s) after "
        "one warm-up"
    )
    header = (
        f"| {'global B':>9} | {'impl':<24} | {'b_local':>7} | {'temp / device':>14} "
        f"| {'largest loss matrix':>27} | {'time':>24} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for batch in batches:
        for impl, chunk_size in rows:
            compiled, emb_sh, scalar_sh, n_dev = _compile(
                ARGS.kind, impl, batch, ARGS.width, mesh, chunk_size
            )
            temp = compiled.memory_analysis().temp_size_in_bytes
            b = batch if impl == "dense" else batch // n
            c = min(chunk_size or b, b)  # the ring clamps a chunk larger than its tile
            rows_cols = {"dense": (b, batch), "gather": (b, batch), "ring": (c, c)}[impl]
            largest = f"{rows_cols[0]} x {rows_cols[1]} ({_fmt_bytes(4 * math.prod(rows_cols))})"
            need = temp * n_dev + 4 * 2 * batch * ARGS.width * 3
            label = {
                "dense": "dense (1 dev)",
                "gather": f"gather ({n} dev)",
                "ring": f"ring ({n} dev)" if c == b else f"ring, chunk {c} ({n} dev)",
            }[impl]
            if ARGS.no_time:
                timing = "not run"
            elif need > budget:
                timing = f"skipped (needs {_fmt_bytes(need)})"
            else:
                args = _inputs(batch, ARGS.width, emb_sh, scalar_sh)
                call = functools.partial(compiled, *args)
                jax.block_until_ready(call())  # warm-up
                best = float("inf")
                for _ in range(ARGS.repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(call())
                    best = min(best, time.perf_counter() - t0)
                timing = f"{best:.3f} s"
                del args
            print(
                f"| {batch:>9} | {label:<24} | {b:>7} | {_fmt_bytes(temp):>14} | "
                f"{largest:>27} | {timing:>24} |",
                flush=True,
            )
            del compiled
    return 0


if __name__ == "__main__":
    sys.exit(main())
