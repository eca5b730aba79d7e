"""Simulated CPU devices for the benchmarks that measure sharded programs on one host."""

import os


def use_cpu_devices(count: int) -> None:
    """Makes jax's CPU backend expose `count` devices. Call before jax is imported: XLA reads
    the flag once, when the backend starts."""
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
