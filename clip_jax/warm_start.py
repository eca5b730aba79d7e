"""Warm start: a run's initial parameters for chosen towers from a pretrained model.

``model.init_from`` names either a pretrained directory written by ``clip_jax.convert``
(``config.json`` + Orbax ``params/``) or a clip_jax training workdir (its latest
checkpoint). ``model.init_towers`` picks what is copied:

* ``'image'``: every variable under ``visual`` (parameters and BatchNorm statistics);
* ``'text'``: every variable of the text tower (token and positional embeddings, blocks,
  final LayerNorm, projection);
* ``'both'``: both towers and the logit scale (and the logit bias where both models have
  one; a model with a bias the source lacks keeps its initial bias).

The rest keeps its random initialisation. Training reads this only when the run has no
checkpoint of its own, so a resume never goes back to the pretrained weights.

`open_source` and `Source.check` run in `train.setup`, before anything compiles: a source
whose model differs from the configured one (name, activation, text vocabulary) or whose
tensors do not have exactly the configured shapes is a one-line `ConfigError` naming the
tensor and both shapes. `Source.apply` then copies the tensors into the fresh train state,
in its shardings and parameter dtype.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from clip_jax import optim, pretrained, storage
from clip_jax.config import ConfigError
from clip_jax.models.clip import CLIPConfig
from clip_jax.models.registry import get_config

TOWERS = {"image": ("image",), "text": ("text",), "both": ("image", "text", "shared")}


def _flat(tree) -> dict[str, object]:
    """{'collection/a/b': leaf} of a nested dict of arrays or shape structs."""
    return {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _selected(flat: dict, towers: tuple[str, ...]) -> dict:
    """The entries of `flat` ('collection/top/...') that belong to `towers`."""
    return {k: v for k, v in flat.items() if optim.tower_of(k.split("/")[1:]) in towers}


@dataclasses.dataclass(frozen=True)
class Source:
    """A warm-start source: its model description and its tensors' shapes (arrays later)."""

    path: str
    kind: str  # 'pretrained' or 'workdir'
    name: str  # registry name, or 'custom'
    activation: str
    text: dict  # the source's text vocabulary: vocab_size and, where known, eot_token_id
    shapes: dict[str, tuple[int, ...]]  # 'collection/a/b' -> shape
    tokenizer_spec: dict | None
    towers: tuple[str, ...]

    def tokenizer(self, context_length: int):
        """The tokenizer the source names, when its text tower is copied (else None)."""
        if "text" not in self.towers or self.tokenizer_spec is None:
            return None
        spec = {**self.tokenizer_spec, "context_length": context_length}
        return pretrained.make_tokenizer(spec, self.path)

    def check(self, model_name: str, model_config: CLIPConfig) -> None:
        """ConfigError unless the copied tensors fit the configured model exactly."""
        where = f"model.init_from={self.path}"
        if self.name not in ("", "custom") and self.name != model_name:
            raise ConfigError(
                f"{where} holds a {self.name!r} model but model.name is {model_name!r}"
            )
        if self.activation != model_config.activation:
            raise ConfigError(
                f"{where} uses activation {self.activation!r} but the configured model uses "
                f"{model_config.activation!r}: set model.activation={self.activation!r}"
            )
        if "text" in self.towers:
            for key in ("vocab_size", "eot_token_id"):
                ours, theirs = getattr(model_config.text, key), self.text.get(key, None)
                if theirs is not None and ours != theirs:
                    raise ConfigError(
                        f"{where}: the text tower's {key} is {theirs} but the tokenizer gives "
                        f"{ours}; use the source's tokenizer or set model.init_towers='image'"
                    )
        wanted = _selected(_flat(pretrained.abstract_variables(model_config)), self.towers)
        have = _selected(self.shapes, self.towers)
        for key, leaf in wanted.items():
            if key not in have:
                if key.split("/")[1] == "logit_bias":
                    continue  # a bias the source lacks keeps its initial value
                raise ConfigError(
                    f"{where} has no tensor {key} (shape {tuple(leaf.shape)}) for "
                    f"model.init_towers={'+'.join(self.towers)!r}"
                )
            if tuple(have[key]) != tuple(leaf.shape):
                raise ConfigError(
                    f"{where}: tensor {key} has shape {tuple(have[key])} but the configured "
                    f"model needs {tuple(leaf.shape)}"
                )
        unused = sorted(k for k in have if k not in wanted and k.split("/")[1] != "logit_bias")
        if unused:
            raise ConfigError(
                f"{where}: tensor {unused[0]} {tuple(have[unused[0]])} has no place in the "
                f"configured model ({len(unused)} such tensors)"
            )

    def variables(self) -> dict:
        """The source's variables ({'params': ..., ...}) as host arrays."""
        if self.kind == "pretrained":
            return jax.device_get(pretrained.load(self.path).variables)
        state = _restore_workdir_state(self.path)
        return {"params": state["params"], **state.get("model_state", {})}

    def apply(self, params, model_state):
        """(params, model_state) with the chosen towers' tensors replaced by the source's,
        each placed like (sharding and dtype) the array it replaces."""
        source = _flat(self.variables())

        def replace(collection: str, tree):
            def put(path, leaf):
                key = "/".join([collection, *(str(k.key) for k in path)])
                if optim.tower_of(key.split("/")[1:]) not in self.towers or key not in source:
                    return leaf
                value = np.asarray(source[key]).astype(leaf.dtype)
                return jax.device_put(value, leaf.sharding)

            return jax.tree_util.tree_map_with_path(put, tree)

        state = {c: replace(c, tree) for c, tree in model_state.items()}
        return replace("params", params), state


def _steps(workdir: str) -> list[int]:
    """The complete checkpoints of a training workdir (Orbax renames a step when done)."""
    root = storage.path(workdir) / "checkpoints"
    with storage.access(workdir, "list"):
        return (
            sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
        )


def has_checkpoint(workdir: str) -> bool:
    """Whether a run in `workdir` resumes (and so takes nothing from `model.init_from`)."""
    return bool(_steps(workdir))


def _latest_step_dir(workdir: str) -> epath.Path:
    steps = _steps(workdir)
    if not steps:
        raise ConfigError(f"model.init_from={workdir}: no checkpoints in {workdir}/checkpoints")
    return storage.path(workdir) / "checkpoints" / str(steps[-1]) / "state"


def _state_metadata(workdir: str) -> dict:
    """The tree of array metadata (shape, dtype) of the latest checkpoint's train state."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.metadata(_latest_step_dir(workdir)).tree
    finally:
        handler.close()


def _restore_workdir_state(workdir: str) -> dict:
    """The latest checkpoint's train state of a training workdir, as host numpy arrays."""
    restore_args = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), _state_metadata(workdir)
    )
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.restore(
            _latest_step_dir(workdir), args=ocp.args.PyTreeRestore(restore_args=restore_args)
        )
    finally:
        handler.close()


def _workdir_source(workdir: str, towers: tuple[str, ...]) -> Source:
    path = storage.join(workdir, "config.json")
    try:
        model = json.loads(storage.read_text(path))["model"]
        activation = model.get("activation") or get_config(model["name"]).activation
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"model.init_from={workdir}: cannot read the run's {path} ({e})"
        ) from None
    tree = _state_metadata(workdir)
    shapes = {**_flat({"params": tree["params"]}), **_flat(tree.get("model_state") or {})}
    return Source(
        path=storage.resolve(workdir),
        kind="workdir",
        name=model["name"],
        activation=activation,
        # The run's tokenizer is not recorded as ids: only the vocabulary size is compared.
        text={"vocab_size": tree["params"]["text"]["token_embedding"].shape[0]},
        shapes={k: tuple(v.shape) for k, v in shapes.items()},
        tokenizer_spec=None,
        towers=towers,
    )


def open_source(init_from: str, init_towers: str) -> Source:
    """The source named by `model.init_from` (metadata only); ConfigError if unreadable."""
    towers = TOWERS[init_towers]
    init_from = os.path.expanduser(init_from)
    if os.path.isdir(os.path.join(init_from, "checkpoints")):
        return _workdir_source(init_from, towers)
    try:
        meta = pretrained.read_meta(init_from)
        config = pretrained.config_from_dict(meta["model"])
    except (pretrained.PretrainedError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"model.init_from={init_from}: not a pretrained directory (clip_jax.convert) nor a "
            f"training workdir with checkpoints/ ({e})"
        ) from None
    shapes = _flat(pretrained.abstract_variables(config))
    return Source(
        path=os.path.abspath(init_from),
        kind="pretrained",
        name=meta.get("name", "custom"),
        activation=config.activation,
        text=dataclasses.asdict(config.text),
        shapes={k: tuple(v.shape) for k, v in shapes.items()},
        tokenizer_spec=meta.get("tokenizer"),
        towers=towers,
    )
