"""Mesh construction, logical-axis rules and shardings for parameters and batches.

The mesh always has the three axes ``('data', 'fsdp', 'model')`` (size-1 axes are fine). The
batch is sharded over ``('data', 'fsdp')`` (row-major: ``data`` outer); parameters are
sharded by logical-axis rules (``logical_rules``) that map the logical names models attach to
every parameter (``nn.with_logical_partitioning``) to mesh axes.

Mesh axes are ``AxisType.Auto`` (the partitioner propagates shardings; ``shard_map`` regions
such as the sharded losses are manual). ``jax.make_mesh`` would default to ``Explicit`` axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax.core import meta
from flax.linen.spmd import LogicallyPartitioned
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax.models.layers import LOGICAL_AXES

__all__ = [
    "BATCH_AXES",
    "MESH_AXES",
    "STRATEGIES",
    "make_mesh",
    "logical_rules",
    "param_shardings",
    "param_partition_specs",
    "batch_sharding",
    "replicated",
]

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
STRATEGIES = ("dp", "fsdp")
Rules = tuple[tuple[str, Any], ...]


# --------------------------------------------------------------------------------------------
# Mesh.
# --------------------------------------------------------------------------------------------


def make_mesh(
    data: int = -1, fsdp: int = 1, model: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all devices of all processes) with axes
    ``('data', 'fsdp', 'model')``.

    One size may be -1, meaning "the rest" (device count divided by the others). Devices are
    laid out by ``mesh_utils`` for the platform's topology; on multi-slice TPU (devices with
    more than one ``slice_index``) the ``data`` axis spans the slices (DCN), ``fsdp``/``model``
    stay within a slice.
    """
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "model": model}
    for name, size in sizes.items():
        if (
            not isinstance(size, (int, np.integer))
            or isinstance(size, bool)
            or (size < 1 and size != -1)
        ):
            raise ValueError(f"mesh axis size {name}={size!r} must be a positive int or -1.")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(
            f'at most one mesh axis may be -1 ("the rest"); got {sizes}. Fix all but one.'
        )
    if free:
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if count % fixed:
            raise ValueError(
                f"cannot fill {free[0]}=-1: the other axes {sizes} multiply to {fixed}, which "
                f"does not divide the {count} devices. Choose sizes whose product divides "
                f"{count}."
            )
        sizes[free[0]] = count // fixed
    shape = tuple(int(sizes[a]) for a in MESH_AXES)
    if math.prod(shape) != count:
        raise ValueError(
            f"mesh sizes data={shape[0]} x fsdp={shape[1]} x model={shape[2]} = "
            f"{math.prod(shape)} do not match the {count} devices. Make the product "
            f"{count}, or pass -1 for one axis to take the rest (e.g. data=-1)."
        )

    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
        n_slices = len(slices)
        if shape[0] % n_slices:
            raise ValueError(
                f"the devices span {n_slices} slices; the data axis ({shape[0]}) must be a "
                f"multiple of {n_slices} so that only data parallelism crosses slices."
            )
        grid = mesh_utils.create_hybrid_device_mesh(
            (shape[0] // n_slices, shape[1], shape[2]), (n_slices, 1, 1), devices
        )
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            # Topology-aware placement can refuse unusual shapes; any order is still correct.
            grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# --------------------------------------------------------------------------------------------
# Logical-axis rules.
# --------------------------------------------------------------------------------------------


def logical_rules(strategy: str) -> Rules:
    """``(logical_name, mesh_axis_or_None)`` pairs in priority order.

    - ``'dp'``: every parameter replicated (pure data parallelism).
    - ``'fsdp'``: the residual width ``embed`` (present in almost every large matrix) is split
      over ``fsdp``; ``mlp``/``heads`` over ``model`` (tensor parallelism when that axis is
      larger than 1). Later rules are fall-backs that apply only when the mesh axis is still
      free for that parameter and divides the dimension (``param_shardings`` resolves them
      per parameter, so no parameter ever uses a mesh axis twice): ``head_dim`` takes
      ``model`` when ``heads`` cannot; ``conv_out``, ``proj``, ``conv_in`` take ``fsdp`` when
      no ``embed`` dim did. ``vocab``, ``position``, ``norm`` and the conv kernel dims stay
      replicated.

    The result can also be given to ``flax.linen.logical_to_mesh_sharding`` (which applies the
    same first-free-rule order but without the divisibility fall-back).
    """
    if strategy == "dp":
        return tuple((name, None) for name in LOGICAL_AXES)
    if strategy == "fsdp":
        return (
            ("mlp", "model"),
            ("heads", "model"),
            ("head_dim", "model"),
            ("embed", "fsdp"),
            ("conv_out", "fsdp"),
            ("proj", "fsdp"),
            ("conv_in", "fsdp"),
            ("vocab", None),
            ("position", None),
            ("norm", None),
            ("conv_h", None),
            ("conv_w", None),
        )
    raise ValueError(f"unknown sharding strategy {strategy!r}; expected one of {STRATEGIES}.")


def _as_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _resolve(shape: Sequence[int], dim_names: Sequence[Any], rules: Rules | None, mesh: Mesh) -> P:
    """PartitionSpec for one array.

    With ``rules`` (logical names): the rules are visited in order; a rule applies to a dim
    named by it that is still unassigned when none of its mesh axes is used yet by this array,
    all of them are in the mesh, and their product (> 1) divides the dim. Without ``rules``
    (``nn.Partitioned``: names are mesh axes already): each dim keeps its axes when they divide
    it and are not used by an earlier dim.
    """
    ndim = len(shape)
    if len(dim_names) != ndim:
        raise ValueError(
            f"partition names {tuple(dim_names)} do not match array shape {tuple(shape)}."
        )
    assigned: list[tuple[str, ...]] = [()] * ndim
    used: set[str] = set()

    def fits(i, axes):
        if not axes or not all(a in mesh.shape for a in axes):
            return False
        size = math.prod(mesh.shape[a] for a in axes)
        # Size-1 axes split nothing: leave them out of the spec (keeps specs readable).
        return (
            size > 1
            and not used.intersection(axes)
            and len(set(axes)) == len(axes)
            and shape[i] % size == 0
        )

    if rules is None:
        for i, entry in enumerate(dim_names):
            axes = _as_axes(entry)
            if fits(i, axes):
                assigned[i] = axes
                used.update(axes)
    else:
        done = [False] * ndim
        for logical, entry in rules:
            axes = _as_axes(entry)
            for i, name in enumerate(dim_names):
                if name != logical or done[i]:
                    continue
                if not axes:  # an explicit "replicate" rule settles the dim
                    done[i] = True
                elif fits(i, axes):
                    assigned[i] = axes
                    used.update(axes)
                    done[i] = True
    spec = [None if not a else (a[0] if len(a) == 1 else a) for a in assigned]
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _is_box(x) -> bool:
    return isinstance(x, meta.AxisMetadata)


def param_partition_specs(abstract_boxed_params: Any, mesh: Mesh, rules: Rules) -> Any:
    """Like ``param_shardings`` but returns ``PartitionSpec`` leaves."""
    rules = tuple(rules)

    def leaf_spec(x):
        if _is_box(x) and not hasattr(x.value, "shape"):
            # A box around an empty subtree (optax's MaskedNode for parameters that another
            # optimizer partition owns): keep the subtree, it holds no arrays to place.
            return x.value
        if isinstance(x, meta.Partitioned):
            # nn.LogicallyPartitioned names are logical (resolved by the rules); plain
            # nn.Partitioned names are mesh axes already.
            logical = isinstance(x, LogicallyPartitioned)
            return _resolve(np.shape(x.value), tuple(x.names), rules if logical else None, mesh)
        return P()  # plain leaves and boxes without partitioning information: replicated

    return jax.tree_util.tree_map(leaf_spec, abstract_boxed_params, is_leaf=_is_box)


def param_shardings(abstract_boxed_params: Any, mesh: Mesh, rules: Rules) -> Any:
    """``NamedSharding`` for every parameter, as a pytree shaped like the UNBOXED params.

    ``abstract_boxed_params`` is typically ``jax.eval_shape(model.init, ...)`` (leaves
    ``nn.LogicallyPartitioned`` / ``nn.Partitioned`` boxes around ``ShapeDtypeStruct``); plain
    leaves are replicated. A dim whose size the chosen mesh axis does not divide stays
    replicated (so tiny test models work on any mesh), and no parameter uses a mesh axis twice.
    """
    specs = param_partition_specs(abstract_boxed_params, mesh, rules)
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of batch arrays: dim 0 over ``('data', 'fsdp')``, other dims replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many ways a batch is split: the size of ``BATCH_AXES`` on ``mesh``."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())


def to_global(batch: dict, mesh: Mesh) -> dict:
    """Host batch -> dict of global ``jax.Array``s, dim 0 sharded over the mesh's batch axes.

    Each process passes its own rows (the data loader's host batch); the global batch is
    their union, placed on the devices each process holds
    (``jax.make_array_from_process_local_data``).
    """
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    sharding = NamedSharding(mesh, P(axes))
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }
