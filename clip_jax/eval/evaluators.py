"""Evaluators: zero-shot classification, retrieval, linear probe and Tip-Adapter on a model.

The training loop (every ``eval.every_steps``) and ``python -m clip_jax.evaluate`` both call
``evaluate_state``, so they give the same numbers for the same checkpoint. A task is written
``KIND:DATASET[@SPLIT]`` in the comma-separated
``eval.tasks`` (or ``--tasks``), for example::

    zeroshot:imagenet2012, zeroshot:imagenet_a, retrieval:coco_captions@test,
    linear_probe:cifar10, tip_adapter:imagenet2012

``KIND`` is one of ``EVALUATORS``; per-kind settings live in ``eval.<kind>`` (``config_schema``).

Features are extracted on the whole mesh: each process reads its shard of the split
(``pipeline.eval_loader(..., shard_index, shard_count)``, padded so every process runs the
same number of batches), the batch is one global array sharded over the batch axes, the
embeddings come back replicated, and padded rows are dropped by ``mask`` and put in dataset
order by ``index``. Every process therefore holds all features and computes the same metrics;
only process 0 writes files.

Results: ``DIR/eval/STEP/TASK.json`` (``write_results``), a console table (``format_table``),
and flat ``{'TASK/metric': value}`` scalars returned to the caller for TensorBoard.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax.eval import classnames as classnames_lib
from clip_jax.eval import metrics as M
from clip_jax.eval import templates as templates_lib

# ------------------------------------------------------------------------------------ config


def config_schema() -> ml_collections.ConfigDict:
    """The ``eval`` group of the training config: every key, its type and default."""
    c = ml_collections.ConfigDict()
    c.every_steps = 0  # 0 = only at the end of training
    c.batch_size = 256  # global feature-extraction batch (all devices, all hosts)
    c.tasks = ""  # 'KIND:DATASET[@SPLIT],...'
    c.data_dir = ""  # '' = data.data_dir

    c.zeroshot = ml_collections.ConfigDict()
    c.zeroshot.templates = ""  # set name or file; '' = the CLIP paper's set for the dataset
    c.zeroshot.class_names = ""  # file, or 'DATASET=FILE;DATASET=FILE'; '' = built-in/metadata
    c.zeroshot.ks = (1, 5)

    c.retrieval = ml_collections.ConfigDict()
    c.retrieval.ks = (1, 5, 10)
    c.retrieval.query_block = 1024
    c.retrieval.key_block = 4096

    c.linear_probe = ml_collections.ConfigDict()
    c.linear_probe.train_split = "train"
    c.linear_probe.val_fraction = 0.2
    c.linear_probe.c_values = tuple(float(x) for x in np.logspace(-6, 6, 13))
    c.linear_probe.refine_steps = 2
    c.linear_probe.max_iter = 1000
    c.linear_probe.max_train_examples = 0  # 0 = the whole train split
    c.linear_probe.seed = 0

    c.tip_adapter = ml_collections.ConfigDict()
    c.tip_adapter.train_split = "train"
    c.tip_adapter.shots = (1, 2, 4, 8, 16)
    c.tip_adapter.val_per_class = 4  # search split, drawn from train outside the cache
    c.tip_adapter.search_scale = (7.0, 3.0)  # (beta max, alpha max), as the paper
    c.tip_adapter.search_step = (200, 20)  # (beta steps, alpha steps)
    c.tip_adapter.linear_probe = True  # also a K-shot linear probe, for comparison
    c.tip_adapter.max_train_examples = 0
    c.tip_adapter.seed = 0
    return c


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    kind: str
    dataset: str
    split: str = ""

    @property
    def name(self) -> str:
        """File-safe task name: 'zeroshot_imagenet_v2_matched-frequency'."""
        base = f"{self.kind}_{self.dataset}" + (f"_{self.split}" if self.split else "")
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_")


def parse_tasks(tasks: str | Sequence[str]) -> list[TaskSpec]:
    """'zeroshot:cifar10, retrieval:coco@test' -> TaskSpecs; unknown kinds are errors."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        kind, sep, rest = item.partition(":")
        kind = kind.strip()
        if not sep or not rest.strip():
            raise ValueError(
                f"eval task {item!r} must be written KIND:DATASET[@SPLIT], e.g. 'zeroshot:cifar10'"
            )
        if kind not in EVALUATORS:
            raise ValueError(
                f"unknown evaluator {kind!r} in task {item!r}; "
                f"known: {', '.join(sorted(EVALUATORS))}"
            )
        dataset, _, split = rest.strip().partition("@")
        out.append(TaskSpec(kind, dataset.strip(), split.strip()))
    names = [t.name for t in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"eval tasks repeat: {', '.join(dupes)}")
    return out


def default_test_split(dataset: str) -> str:
    """imagenet2012 is scored on 'validation' (its test labels are not public); others on 'test'."""
    return "validation" if templates_lib.base_dataset_name(dataset) == "imagenet2012" else "test"


def _class_names_file(spec: str, dataset: str) -> str | None:
    """'' -> None; 'FILE' -> FILE; 'ds1=F1;ds2=F2' -> the file for this dataset (or None)."""
    spec = (spec or "").strip()
    if not spec:
        return None
    if "=" not in spec:
        return spec
    for part in spec.split(";"):
        key, _, path = part.partition("=")
        if key.strip() in (dataset, templates_lib.base_dataset_name(dataset)):
            return path.strip()
    return None


# ------------------------------------------------------------------------------ features


def _pipeline():
    from clip_jax.data import pipeline  # noqa: PLC0415 (kept lazy: tests substitute a fake)

    return pipeline


class Encoders:
    """Jitted, L2-normalised image and text encoders of one model state, on a mesh.

    ``images(global_uint8_batch)`` and ``texts(host_tokens)`` return float32 numpy arrays on
    every process (the embeddings are replicated by the jitted function).
    """

    def __init__(self, encode_image: Callable, encode_text: Callable, mesh, batch_size: int):
        self.mesh = mesh
        self.batch_size = int(batch_size)
        self._image = encode_image
        self._text = encode_text
        from clip_jax import sharding  # noqa: PLC0415

        self._batch_sharding = sharding.batch_sharding(mesh)
        shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES if a in mesh.shape)
        if self.batch_size < 1 or self.batch_size % shards:
            raise ValueError(
                f"eval.batch_size={self.batch_size} must be a positive multiple of the "
                f"{shards} devices that split the batch (mesh data x fsdp)"
            )

    @classmethod
    def from_model(cls, model, params, model_state, mesh, batch_size: int) -> Encoders:
        variables = {"params": params, **(model_state or {})}
        encode_image, encode_text = _jitted_encoders(model, mesh)
        return cls(
            functools.partial(encode_image, variables),
            functools.partial(encode_text, variables),
            mesh,
            batch_size,
        )

    def images(self, global_images) -> np.ndarray:
        return _host(self._image(global_images))

    def texts(self, tokens: np.ndarray) -> np.ndarray:
        """Embeds ``[M, L]`` host tokens (the same on every process) in global batches."""
        tokens = np.asarray(tokens, np.int32)
        bs = self.batch_size
        out = []
        for start in range(0, tokens.shape[0], bs):
            chunk = tokens[start : start + bs]
            n = chunk.shape[0]
            if n < bs:
                chunk = np.concatenate([chunk, np.zeros((bs - n, chunk.shape[1]), np.int32)])
            arr = jax.make_array_from_callback(
                chunk.shape, self._batch_sharding, lambda i, c=chunk: c[i]
            )
            out.append(_host(self._text(arr))[:n])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@functools.lru_cache(maxsize=8)
def _jitted_encoders(model, mesh):
    """Built once per (model, mesh), so evaluating every E steps of a run compiles once."""
    rep = NamedSharding(mesh, P())

    @functools.partial(jax.jit, out_shardings=rep)
    def encode_image(variables, images):
        return M.l2_normalize(model.apply(variables, images, method="encode_image"))

    @functools.partial(jax.jit, out_shardings=rep)
    def encode_text(variables, tokens):
        return M.l2_normalize(model.apply(variables, tokens, method="encode_text"))

    return encode_image, encode_text


def _host(x) -> np.ndarray:
    """A replicated (or single-device) jax.Array as numpy, on any process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


@functools.lru_cache(maxsize=8)
def _replicator(mesh):
    return jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, P()))


@dataclasses.dataclass
class EvalContext:
    """What every evaluator needs; caches features and classifiers within one evaluation."""

    encoders: Encoders
    tokenizer: Any
    mesh: Any
    data_dir: str
    image_size: int
    cache: dict = dataclasses.field(default_factory=dict)

    def image_features(
        self, dataset: str, split: str, max_examples: int = 0
    ) -> dict[str, np.ndarray]:
        """``{'features' [N, D], 'index' [N], 'label' [N] (labelled sets)}`` in index order."""
        key = ("images", dataset, split, int(max_examples))
        if key not in self.cache:
            self.cache[key] = extract_image_features(self, dataset, split, max_examples)
        return self.cache[key]

    def classifier(self, names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        key = ("classifier", tuple(names), tuple(templates))
        if key not in self.cache:
            self.cache[key] = zero_shot_weights(self.encoders, self.tokenizer, names, templates)
        return self.cache[key]


def extract_image_features(
    ctx: EvalContext, dataset: str, split: str, max_examples: int = 0
) -> dict:
    """Image embeddings of a split on the whole mesh, gathered to every process, index-ordered."""
    pipeline = _pipeline()
    nproc, pid = jax.process_count(), jax.process_index()
    global_bs = ctx.encoders.batch_size
    if global_bs % nproc:
        raise ValueError(f"eval.batch_size={global_bs} is not divisible by the {nproc} processes")
    # batch_size is global: each process reads its 1/nproc of every batch.
    loader = pipeline.eval_loader(
        dataset,
        split,
        ctx.data_dir,
        batch_size=global_bs,
        image_size=ctx.image_size,
        shard_index=pid,
        shard_count=nproc,
    )
    max_batches = math.ceil(max_examples / global_bs) if max_examples else None
    replicate = _replicator(ctx.mesh)
    feats, index, labels = [], [], []
    has_label = None
    for b, batch in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break  # every process stops at the same batch: the loader pads them to equal length
        if has_label is None:
            has_label = "label" in batch
        side = {
            "mask": np.asarray(batch["mask"], bool),
            "index": np.asarray(batch["index"], np.int32),
        }
        if has_label:
            side["label"] = np.asarray(batch["label"], np.int32)
        glob = pipeline.to_global({"image": batch["image"], **side}, ctx.mesh)
        emb = ctx.encoders.images(glob["image"])
        rest = {k: _host(v) for k, v in replicate({k: glob[k] for k in side}).items()}
        keep = rest["mask"].astype(bool)  # drops padding and images that failed to decode
        feats.append(emb[keep])
        index.append(rest["index"][keep].astype(np.int64))
        if has_label:
            labels.append(rest["label"][keep].astype(np.int64))
    if not feats:
        raise ValueError(f"split {split!r} of dataset {dataset!r} yielded no examples")
    index = np.concatenate(index)
    order = np.argsort(index, kind="stable")
    index = index[order]
    if index.size > 1 and np.any(index[1:] == index[:-1]):
        raise RuntimeError(f"example indices repeat in {dataset}/{split}: process shards overlap")
    out = {"features": np.concatenate(feats)[order], "index": index}
    if has_label:
        out["label"] = np.concatenate(labels)[order]
    if max_examples:
        out = {k: v[:max_examples] for k, v in out.items()}
    return out


def zero_shot_weights(
    encoders: Encoders, tokenizer, names: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """``[C, D]`` prompt-ensembled class embeddings (every class x every template)."""
    prompts = [templates_lib.fill(t, n) for n in names for t in templates]
    emb = encoders.texts(tokenizer.encode(prompts))
    return np.asarray(M.zero_shot_classifier(emb.reshape(len(names), len(templates), -1)))


def _dataset_label_names(dataset: str, data_dir: str):
    """(has_label, label names or None) from ``pipeline.dataset_info`` (its ``features`` list
    and the ``class_names`` of the ``label`` ClassLabel)."""
    info = _pipeline().dataset_info(dataset, data_dir)
    names = info.get("class_names")
    features = info.get("features")
    has_label = ("label" in features) if features is not None else names is not None
    return bool(has_label), (list(names) if names is not None else None)


@functools.partial(jax.jit, static_argnames=("k",))
def _topk_scores(features, weights, k):
    logits = jnp.matmul(features, weights.T, precision=jax.lax.Precision.HIGHEST)
    return jax.lax.top_k(logits, k)[1]


def _topk_chunked(
    features: np.ndarray, weights: np.ndarray, k: int, chunk: int = 8192
) -> np.ndarray:
    k = min(k, weights.shape[0])
    w = jnp.asarray(weights)
    out = []
    for s in range(0, features.shape[0], chunk):
        part = (
            M._pad_rows(features[s : s + chunk], chunk)
            if features.shape[0] > chunk
            else features[s : s + chunk]
        )
        out.append(
            np.asarray(_topk_scores(jnp.asarray(part), w, k))[: min(chunk, features.shape[0] - s)]
        )
    return np.concatenate(out)


# ------------------------------------------------------------------------------ evaluators


class Evaluator:
    kind = ""

    def __init__(
        self,
        spec: TaskSpec,
        cfg: ml_collections.ConfigDict,
        zeroshot_cfg: ml_collections.ConfigDict | None = None,
    ):
        self.spec, self.cfg = spec, cfg
        # Tip-Adapter builds its zero-shot classifier with the zero-shot settings.
        self.zeroshot_cfg = zeroshot_cfg if zeroshot_cfg is not None else config_schema().zeroshot
        self.dataset = spec.dataset
        self.split = spec.split or default_test_split(spec.dataset)

    @property
    def name(self) -> str:
        return self.spec.name

    def run(self, ctx: EvalContext, step: int) -> dict:
        raise NotImplementedError

    def _result(self, metrics: dict, num_examples: int, **extra) -> dict:
        return {
            "task": self.name,
            "kind": self.kind,
            "dataset": self.dataset,
            "split": self.split,
            "metrics": metrics,
            "num_examples": int(num_examples),
            **extra,
        }


class _ClassifierMixin:
    """Class names, templates and labels for zero-shot style evaluators."""

    def _classes(self, ctx: EvalContext, templates_spec: str, names_spec: str):
        has_label, info_names = _dataset_label_names(self.dataset, ctx.data_dir)
        if not has_label:
            raise ValueError(
                f"dataset {self.dataset!r} has no 'label' feature; {self.kind} needs an image "
                "classification dataset (image + class label)"
            )
        names = classnames_lib.class_names_for(
            self.dataset, info_names, _class_names_file(names_spec, self.dataset)
        )
        templates = templates_lib.load_templates(
            templates_spec or templates_lib.default_template_set(self.dataset)
        )
        return names, templates

    def _labels(self, names: classnames_lib.ClassNames, raw: np.ndarray, split: str) -> np.ndarray:
        labels = names.map_labels(raw)
        bad = labels < 0
        if np.any(bad):
            raise ValueError(
                f"{int(bad.sum())} examples of {self.dataset}/{split} have labels outside the "
                f"{len(names)} evaluated classes "
                f"(first: dataset label {int(np.asarray(raw)[bad][0])})"
            )
        if np.any(labels >= len(names)):
            raise ValueError(
                f"{self.dataset}/{split} has label {int(labels.max())} but only {len(names)} class "
                "names; the class names do not match the dataset's labels"
            )
        return labels


class ZeroShotEvaluator(Evaluator, _ClassifierMixin):
    kind = "zeroshot"

    def run(self, ctx: EvalContext, step: int) -> dict:
        names, templates = self._classes(ctx, self.cfg.templates, self.cfg.class_names)
        weights = ctx.classifier(names.names, templates)
        data = ctx.image_features(self.dataset, self.split)
        labels = self._labels(names, data["label"], self.split)
        ks = tuple(int(k) for k in self.cfg.ks)
        topk = _topk_chunked(data["features"], weights, max(ks))
        metrics = M.classification_metrics_from_topk(topk, labels, len(names), ks=ks)
        n = metrics.pop("num_examples")
        return self._result(
            metrics,
            n,
            templates=list(templates),
            num_classes=len(names),
            class_names_source=names.source,
        )


class RetrievalEvaluator(Evaluator):
    kind = "retrieval"

    def run(self, ctx: EvalContext, step: int) -> dict:
        captions = _pipeline().read_captions(self.dataset, self.split, ctx.data_dir)
        data = ctx.image_features(self.dataset, self.split)
        if len(data["index"]) and data["index"][-1] >= len(captions):
            raise ValueError(
                f"{self.dataset}/{self.split}: {len(captions)} caption lists but image index "
                f"{int(data['index'][-1])}; expected one caption list per example"
            )
        captions = [captions[i] for i in data["index"]]  # images that decoded, in order
        flat, owner = [], []
        for i, caps in enumerate(captions):
            caps = [caps] if isinstance(caps, str) else list(caps)
            flat.extend(caps)
            owner.extend([i] * len(caps))
        if not flat:
            raise ValueError(
                f"dataset {self.dataset!r} split {self.split!r} has no captions; retrieval "
                "needs an image-caption dataset"
            )
        text = ctx.encoders.texts(ctx.tokenizer.encode(flat))
        ks = tuple(int(k) for k in self.cfg.ks)
        metrics = M.retrieval_recall(
            data["features"],
            text,
            np.asarray(owner),
            ks,
            query_block=self.cfg.query_block,
            key_block=self.cfg.key_block,
            mesh=ctx.mesh,
        )
        n_img, n_txt = metrics.pop("num_images"), metrics.pop("num_texts")
        return self._result(metrics, n_img, num_texts=n_txt, templates=None)


class LinearProbeEvaluator(Evaluator):
    kind = "linear_probe"

    def run(self, ctx: EvalContext, step: int) -> dict:
        cfg = self.cfg
        train = ctx.image_features(self.dataset, cfg.train_split, cfg.max_train_examples)
        test = ctx.image_features(self.dataset, self.split)
        if "label" not in train:
            raise ValueError(
                f"dataset {self.dataset!r} has no 'label' feature; the linear probe needs labels"
            )
        tr, va = M.split_train_val(len(train["label"]), cfg.val_fraction, cfg.seed)
        x, y = train["features"], train["label"]
        result = M.linear_probe(
            x[tr],
            y[tr],
            x[va],
            y[va],
            test["features"],
            test["label"],
            c_values=cfg.c_values,
            refine_steps=cfg.refine_steps,
            max_iter=cfg.max_iter,
        )
        metrics = {
            "top1": result["top1"],
            "best_C": result["best_C"],
            "val_top1": result["val_top1"],
        }
        return self._result(
            metrics,
            result["num_test"],
            templates=None,
            train_split=cfg.train_split,
            num_train=result["num_train"],
            num_val=result["num_val"],
            val_top1_by_C=result["val_top1_by_C"],
        )


class TipAdapterEvaluator(Evaluator, _ClassifierMixin):
    kind = "tip_adapter"

    def run(self, ctx: EvalContext, step: int) -> dict:
        cfg, zcfg = self.cfg, self.zeroshot_cfg
        names, templates = self._classes(ctx, zcfg.templates, zcfg.class_names)
        weights = ctx.classifier(names.names, templates)
        num_classes = len(names)
        train = ctx.image_features(self.dataset, cfg.train_split, cfg.max_train_examples)
        test = ctx.image_features(self.dataset, self.split)
        test_y = self._labels(names, test["label"], self.split)
        train_y = names.map_labels(train["label"])
        usable = np.flatnonzero(train_y >= 0)
        train_x, train_y = train["features"][usable], train_y[usable]
        classes = np.unique(train_y)

        if cfg.val_per_class < 1:
            raise ValueError(
                f"eval.tip_adapter.val_per_class={cfg.val_per_class}: alpha and beta are "
                "searched on a validation split drawn from train; expected at least 1 per class"
            )
        zs_pred = _topk_chunked(test["features"], weights, 1)[:, 0]
        metrics = {"zero_shot_top1": float(np.mean(zs_pred == test_y))}
        val_idx = M.sample_k_shot(train_y, cfg.val_per_class, seed=cfg.seed + 1, classes=classes)
        rest = np.setdiff1d(np.arange(len(train_y)), val_idx)
        alphas, betas = M.default_tip_grid(tuple(cfg.search_scale), tuple(cfg.search_step))
        details = {}
        for k in cfg.shots:
            k = int(k)
            cache_idx = rest[M.sample_k_shot(train_y[rest], k, seed=cfg.seed, classes=classes)]
            keys, values = M.build_cache(train_x[cache_idx], train_y[cache_idx], num_classes)
            found = M.tip_adapter_search(
                train_x[val_idx],
                train_y[val_idx],
                keys,
                values,
                weights,
                alphas=alphas,
                betas=betas,
            )
            pred = _tip_predict(
                test["features"], keys, values, weights, found["alpha"], found["beta"]
            )
            metrics[f"tip_top1_{k}shot"] = float(np.mean(pred == test_y))
            details[f"{k}shot"] = {
                "alpha": found["alpha"],
                "beta": found["beta"],
                "val_top1": found["val_top1"],
            }
            if cfg.linear_probe:
                lp = M.linear_probe(
                    train_x[cache_idx],
                    train_y[cache_idx],
                    train_x[val_idx],
                    train_y[val_idx],
                    test["features"],
                    test_y,
                    num_classes=num_classes,
                    refine_steps=1,
                )
                metrics[f"linear_probe_top1_{k}shot"] = lp["top1"]
                details[f"{k}shot"]["linear_probe_C"] = lp["best_C"]
        return self._result(
            metrics,
            len(test_y),
            templates=list(templates),
            num_classes=num_classes,
            class_names_source=names.source,
            train_split=cfg.train_split,
            val_examples=int(len(val_idx)),
            search=details,
        )


def _tip_predict(features, keys, values, weights, alpha, beta, chunk: int = 4096) -> np.ndarray:
    out = []
    for s in range(0, features.shape[0], chunk):
        logits = M.tip_adapter_logits(features[s : s + chunk], keys, values, weights, alpha, beta)
        out.append(np.asarray(jnp.argmax(logits, axis=-1)))
    return np.concatenate(out)


EVALUATORS: dict[str, type[Evaluator]] = {
    "zeroshot": ZeroShotEvaluator,
    "retrieval": RetrievalEvaluator,
    "linear_probe": LinearProbeEvaluator,
    "tip_adapter": TipAdapterEvaluator,
}


def build_evaluators(
    eval_config: ml_collections.ConfigDict, tasks: str | Sequence[str] | None = None
) -> list[Evaluator]:
    """Evaluators for ``tasks`` (default ``eval_config.tasks``), with their ``eval.<kind>`` keys."""
    schema = config_schema()
    specs = parse_tasks(eval_config.tasks if tasks is None else tasks)

    def settings(kind):
        cfg = ml_collections.ConfigDict(schema[kind].to_dict())
        if kind in eval_config:
            cfg.update(eval_config[kind])
        return cfg

    return [EVALUATORS[s.kind](s, settings(s.kind), settings("zeroshot")) for s in specs]


# ------------------------------------------------------------------------------- results


def write_results(workdir: str, step: int, task: str, result: dict) -> str:
    """Writes ``workdir/eval/STEP/TASK.json`` (process 0 only); returns the path."""
    path = os.path.join(workdir, "eval", str(int(step)), f"{task}.json")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(
                {"step": int(step), **result}, f, indent=2, sort_keys=True, default=_json_default
            )
        os.replace(tmp, path)
    return path


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _fmt(metric: str, value) -> str:
    if isinstance(value, float) and ("top" in metric or "R@" in metric or "recall" in metric):
        return f"{100 * value:.2f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(results: Sequence[dict]) -> str:
    """A plain-text table: task, dataset, split, examples, metric, value (accuracies in %)."""
    rows = [("task", "dataset", "split", "examples", "metric", "value")]
    for r in results:
        first = True
        for metric, value in r["metrics"].items():
            head = (
                (r["task"], r["dataset"], r["split"], str(r["num_examples"]))
                if first
                else ("", "", "", "")
            )
            rows.append(head + (metric, _fmt(metric, value)))
            first = False
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 5 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def flat_metrics(results: Sequence[dict]) -> dict[str, float]:
    """``{'TASK/metric': value}`` for scalar writers (TensorBoard, metrics.jsonl)."""
    return {
        f"{r['task']}/{k}": float(v)
        for r in results
        for k, v in r["metrics"].items()
        if isinstance(v, (int, float, np.number))
    }


def evaluate(
    evaluators: Sequence[Evaluator],
    ctx: EvalContext,
    step: int,
    workdir: str | None = None,
    *,
    print_table: bool = True,
) -> list[dict]:
    """Runs the evaluators, writes their JSON files, prints the table; returns the results."""
    results = []
    for ev in evaluators:
        t0 = time.time()
        result = ev.run(ctx, step)
        result["time_s"] = round(time.time() - t0, 3)
        if workdir:
            write_results(workdir, step, ev.name, result)
        results.append(result)
    if print_table and results and jax.process_index() == 0:
        print(f"evaluation at step {step}\n" + format_table(results), flush=True)
    return results


def evaluate_state(
    config,
    model,
    params,
    model_state,
    tokenizer,
    mesh,
    step: int,
    workdir: str | None = None,
    tasks: str | None = None,
) -> list[dict]:
    """Runs the evaluators of ``config.eval`` (or ``tasks``) on one model state.

    The one path shared by the training loop and ``python -m clip_jax.evaluate``, so the two
    give the same numbers for the same checkpoint.
    """
    evaluators = build_evaluators(config.eval, tasks)
    if not evaluators:
        return []
    from clip_jax.config import resolve_data_dir  # noqa: PLC0415 (config imports this module)

    data_dir = config.eval.data_dir or resolve_data_dir(config)
    encoders = Encoders.from_model(model, params, model_state, mesh, config.eval.batch_size)
    ctx = EvalContext(encoders, tokenizer, mesh, data_dir, model.config.vision.image_size)
    return evaluate(evaluators, ctx, step, workdir)
