"""The vocabulary of the tensor maps: how one source tensor becomes one clip_jax variable
(the kinds), a map's `Entry`, and the row helpers the per-source tables are written with."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

# How a source tensor becomes a clip_jax variable (t = the variable's shape):
#   copy        same array;
#   heads_bias  [H*Dh] -> [H, Dh];
#   linear      torch Linear weight [out, in] -> kernel [in, *out] (transpose, split heads);
#   linear_out  attention output weight [out, H*Dh] -> kernel [H, Dh, out];
#   conv        OIHW -> HWIO.
FORWARD = {
    "copy": lambda x, t: x.reshape(t),
    "heads_bias": lambda x, t: x.reshape(t),
    "linear": lambda x, t: x.T.reshape(t),
    "linear_out": lambda x, t: x.T.reshape(t),
    "conv": lambda x, t: x.transpose(2, 3, 1, 0),
}
INVERSE = {
    "copy": lambda y: y,
    "heads_bias": lambda y: y.reshape(-1),
    "linear": lambda y: y.reshape(y.shape[0], -1).T,
    "linear_out": lambda y: y.reshape(-1, y.shape[-1]).T,
    "conv": lambda y: y.transpose(3, 2, 0, 1),
}
SOURCE_SHAPE = {
    "copy": lambda t: t,
    "heads_bias": lambda t: (math.prod(t),),
    "linear": lambda t: (math.prod(t[1:]), t[0]),
    "linear_out": lambda t: (t[-1], math.prod(t[:-1])),
    "conv": lambda t: (t[3], t[2], t[0], t[1]),
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """``source`` tensor (or its ``chunk``-th third along axis 0, for fused q/k/v) ->
    variable ``target`` ('params/...' or 'batch_stats/...'), converted as ``kind``."""

    source: str
    target: str
    kind: str
    chunk: int | None = None


def ln_rows(src: str, dst: str) -> list[tuple]:
    return [(f"{src}.weight", f"{dst}/scale", "copy"), (f"{src}.bias", f"{dst}/bias", "copy")]


def bn_rows(src: str, dst: str) -> list[tuple]:
    return ln_rows(src, dst) + [
        (f"{src}.running_mean", f"{dst}/mean", "copy"),
        (f"{src}.running_var", f"{dst}/var", "copy"),
    ]


def linear_rows(src: str, dst: str, kind: str = "linear", bias_kind: str = "copy") -> list[tuple]:
    return [(f"{src}.weight", f"{dst}/kernel", kind), (f"{src}.bias", f"{dst}/bias", bias_kind)]


def entries(rows: Iterable[tuple], src_prefix: str = "", dst_prefix: str = "") -> list[Entry]:
    """Rows ``(source, target, kind[, chunk])`` with prefixes; BatchNorm statistics (leaves
    ``mean``/``var``) go to the ``batch_stats`` collection, everything else to ``params``."""
    out = []
    for source, target, kind, *chunk in rows:
        target = dst_prefix + target
        collection = "batch_stats" if target.rsplit("/", 1)[-1] in ("mean", "var") else "params"
        out.append(Entry(src_prefix + source, f"{collection}/{target}", kind, *chunk))
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """A nested dict of variables -> {'a/b/c': leaf}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out
