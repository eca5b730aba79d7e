"""Blockwise top-k similarity search: the k keys with the largest dot product per query.

The ``[queries, keys]`` similarity matrix is never built: ``topk_over_keys`` scans the keys a
block at a time with a running top-k, and ``ranked_neighbours`` feeds it a block of queries at
a time, so temporary memory is ``O(query_block x (key_block + k))`` whatever the sizes.
Zero-shot classification (keys = class embeddings) and retrieval (keys = the other modality)
both rank with it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
    """``x`` with zero rows appended up to a positive multiple of ``multiple`` (at least one)."""
    n = x.shape[0]
    target = max(multiple, int(math.ceil(n / multiple)) * multiple)
    if target == n:
        return x
    return np.concatenate([x, np.zeros((target - n,) + x.shape[1:], x.dtype)], axis=0)


@functools.partial(jax.jit, static_argnames=("k", "key_block", "precision"))
def topk_over_keys(queries, keys, num_keys, *, k: int, key_block: int, precision: str = "highest"):
    """Running top-k of ``queries @ keys.T`` over key blocks, never holding more than one block.

    queries: ``[B, D]``; keys: ``[nb * key_block, D]`` (zero-padded rows past ``num_keys`` are
    ignored). Returns ``(values [B, k], indices [B, k])``, best first; slots that found no key
    hold ``-inf`` / ``-1``. Ties go to the lower key index. Temporary memory is
    ``O(B * (key_block + k))`` whatever the number of keys.
    """
    b, d = queries.shape
    if keys.shape[0] % key_block:
        raise ValueError(
            f"keys rows ({keys.shape[0]}) must be a multiple of key_block ({key_block})"
        )
    nb = keys.shape[0] // key_block
    blocks = keys.reshape(nb, key_block, d)
    prec = jax.lax.Precision[precision.upper()] if isinstance(precision, str) else precision

    def body(carry, inputs):
        vals, idx = carry
        block, start = inputs
        sims = jnp.matmul(queries, block.T, precision=prec).astype(jnp.float32)
        cols = start + jnp.arange(key_block, dtype=jnp.int32)
        sims = jnp.where(cols[None, :] < num_keys, sims, -jnp.inf)
        all_vals = jnp.concatenate([vals, sims], axis=1)
        all_idx = jnp.concatenate([idx, jnp.broadcast_to(cols, (b, key_block))], axis=1)
        new_vals, pos = jax.lax.top_k(all_vals, k)
        return (new_vals, jnp.take_along_axis(all_idx, pos, axis=1)), None

    init = (jnp.full((b, k), -jnp.inf, jnp.float32), jnp.full((b, k), -1, jnp.int32))
    starts = jnp.arange(nb, dtype=jnp.int32) * key_block
    (vals, idx), _ = jax.lax.scan(body, init, (blocks, starts))
    idx = jnp.where(jnp.isfinite(vals), idx, -1)
    return vals, idx


@functools.lru_cache(maxsize=32)
def _sharded_topk(mesh, k: int, key_block: int, precision: str):
    """topk_over_keys with queries split over every device of ``mesh`` and a replicated result."""
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))
    fn = functools.partial(topk_over_keys, k=k, key_block=key_block, precision=precision)
    return jax.jit(fn, in_shardings=(rows, rep, rep), out_shardings=(rep, rep)), rows, rep


def _global_from_host(x: np.ndarray, sharding) -> jax.Array:
    """A global array from a copy that every process holds in full (multi-host safe)."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def ranked_neighbours(
    queries,
    keys,
    k: int,
    *,
    query_block: int = 1024,
    key_block: int = 4096,
    mesh: jax.sharding.Mesh | None = None,
    precision: str = "highest",
) -> np.ndarray:
    """``[Nq, k]`` indices of each query's k most similar keys (dot product), best first.

    Queries are processed ``query_block`` rows at a time; within a block, keys are scanned
    ``key_block`` rows at a time (``topk_over_keys``). With a ``mesh``, each query block is
    split over all its devices (keys replicated) and every process gets the full answer; each
    process must then pass the same ``queries`` and ``keys``. ``-1`` fills the slots when there
    are fewer than k keys.
    """
    queries = np.asarray(queries, np.float32)
    keys = np.asarray(keys, np.float32)
    nq, nk = queries.shape[0], keys.shape[0]
    k = int(k)
    key_block = int(min(key_block, max(nk, 1)))
    keys_p = pad_rows(keys, key_block)
    if mesh is None:
        query_block = int(min(query_block, max(nq, 1)))
        keys_dev = jnp.asarray(keys_p)
        run = functools.partial(topk_over_keys, k=k, key_block=key_block, precision=precision)
        put = jnp.asarray
    else:
        nd = mesh.devices.size
        query_block = int(math.ceil(min(query_block, max(nq, 1)) / nd)) * nd
        run, rows, rep = _sharded_topk(mesh, k, key_block, precision)
        keys_dev = _global_from_host(keys_p, rep)
        put = functools.partial(_global_from_host, sharding=rows)
    out = np.empty((nq, k), np.int64)
    for start in range(0, nq, query_block):
        q = queries[start : start + query_block]
        n = q.shape[0]
        _, idx = run(put(pad_rows(q, query_block)), keys_dev, np.int32(nk))
        out[start : start + n] = np.asarray(idx.addressable_data(0))[:n]
    return out
