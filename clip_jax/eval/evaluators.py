"""The four evaluators: zero-shot classification, retrieval, linear probe and Tip-Adapter.

``Evaluator.run(ctx, step)`` turns the model state and data of an ``EvalContext`` into a result
``{'task', 'kind', 'dataset', 'split', 'metrics', 'num_examples', 'templates', ...}``.
``build_evaluators`` makes one per task of ``eval.tasks`` with its ``eval.<kind>`` settings.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import numpy as np

from clip_jax.eval import classnames as classnames_lib
from clip_jax.eval import metrics
from clip_jax.eval import templates as templates_lib
from clip_jax.eval.features import EvalContext
from clip_jax.eval.schema import config_schema
from clip_jax.eval.tasks import TaskSpec, class_names_file, default_test_split, parse_tasks


class Evaluator:
    """One task: ``cfg`` is its ``eval.<kind>`` group, ``zeroshot_cfg`` the ``eval.zeroshot``
    group (class names and templates for any evaluator that builds a zero-shot classifier)."""

    kind = ""

    def __init__(
        self,
        spec: TaskSpec,
        cfg: ml_collections.ConfigDict,
        zeroshot_cfg: ml_collections.ConfigDict,
    ):
        self.spec, self.cfg = spec, cfg
        self.zeroshot_cfg = zeroshot_cfg
        self.dataset = spec.dataset
        self.split = spec.split or default_test_split(spec.dataset)

    @property
    def name(self) -> str:
        return self.spec.name

    def run(self, ctx: EvalContext, step: int) -> dict:
        raise NotImplementedError

    def _result(self, scores: dict, num_examples: int, **extra) -> dict:
        return {
            "task": self.name,
            "kind": self.kind,
            "dataset": self.dataset,
            "split": self.split,
            "metrics": scores,
            "num_examples": int(num_examples),
            **extra,
        }

    def _classifier(self, ctx: EvalContext):
        """(class names, templates, ``[C, D]`` zero-shot weights) from ``eval.zeroshot``."""
        info = ctx.data.dataset_info(self.dataset, ctx.data_dir)
        info_names = info.get("class_names")
        features = info.get("features")
        has_label = ("label" in features) if features is not None else info_names is not None
        if not has_label:
            raise ValueError(
                f"dataset {self.dataset!r} has no 'label' feature; {self.kind} needs an image "
                "classification dataset (image + class label)"
            )
        names = classnames_lib.class_names_for(
            self.dataset,
            list(info_names) if info_names is not None else None,
            class_names_file(self.zeroshot_cfg.class_names, self.dataset),
        )
        templates = templates_lib.load_templates(
            self.zeroshot_cfg.templates or templates_lib.default_template_set(self.dataset)
        )
        return names, templates, ctx.classifier(names.names, templates)

    def _labels(self, names: classnames_lib.ClassNames, raw: np.ndarray, split: str) -> np.ndarray:
        """Dataset labels as classifier columns; every one must be an evaluated class."""
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


class ZeroShotEvaluator(Evaluator):
    kind = "zeroshot"

    def run(self, ctx: EvalContext, step: int) -> dict:
        names, templates, weights = self._classifier(ctx)
        data = ctx.image_features(self.dataset, self.split)
        labels = self._labels(names, data["label"], self.split)
        ks = tuple(int(k) for k in self.cfg.ks)
        topk = metrics.rank_classes(data["features"], weights, max(ks))
        scores = metrics.classification_metrics_from_topk(topk, labels, len(names), ks=ks)
        n = scores.pop("num_examples")
        return self._result(
            scores,
            n,
            templates=list(templates),
            num_classes=len(names),
            class_names_source=names.source,
        )


class RetrievalEvaluator(Evaluator):
    kind = "retrieval"

    def run(self, ctx: EvalContext, step: int) -> dict:
        captions = ctx.data.read_captions(self.dataset, self.split, ctx.data_dir)
        data = ctx.image_features(self.dataset, self.split)
        if len(data["index"]) and data["index"][-1] >= len(captions):
            raise ValueError(
                f"{self.dataset}/{self.split}: {len(captions)} caption lists but image index "
                f"{int(data['index'][-1])}; expected one caption list per example"
            )
        flat, owner = [], []
        for i, j in enumerate(data["index"]):  # images that decoded, in order
            caps = [captions[j]] if isinstance(captions[j], str) else list(captions[j])
            flat.extend(caps)
            owner.extend([i] * len(caps))
        if not flat:
            raise ValueError(
                f"dataset {self.dataset!r} split {self.split!r} has no captions; retrieval "
                "needs an image-caption dataset"
            )
        text = ctx.encoders.texts(ctx.tokenizer.encode(flat))
        scores = metrics.retrieval_recall(
            data["features"],
            text,
            np.asarray(owner),
            tuple(int(k) for k in self.cfg.ks),
            query_block=self.cfg.query_block,
            key_block=self.cfg.key_block,
            mesh=ctx.mesh,
        )
        n_img, n_txt = scores.pop("num_images"), scores.pop("num_texts")
        return self._result(scores, n_img, num_texts=n_txt, templates=None)


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
        tr, va = metrics.split_train_val(len(train["label"]), cfg.val_fraction, cfg.seed)
        x, y = train["features"], train["label"]
        probe = metrics.linear_probe(
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
        return self._result(
            {k: probe[k] for k in ("top1", "best_C", "val_top1")},
            probe["num_test"],
            templates=None,
            train_split=cfg.train_split,
            num_train=probe["num_train"],
            num_val=probe["num_val"],
            val_top1_by_C=probe["val_top1_by_C"],
        )


class TipAdapterEvaluator(Evaluator):
    kind = "tip_adapter"

    def run(self, ctx: EvalContext, step: int) -> dict:
        cfg = self.cfg
        if cfg.val_per_class < 1:
            raise ValueError(
                f"eval.tip_adapter.val_per_class={cfg.val_per_class}: alpha and beta are "
                "searched on a validation split drawn from train; expected at least 1 per class"
            )
        names, templates, weights = self._classifier(ctx)
        num_classes = len(names)
        train = ctx.image_features(self.dataset, cfg.train_split, cfg.max_train_examples)
        test = ctx.image_features(self.dataset, self.split)
        test_x, test_y = test["features"], self._labels(names, test["label"], self.split)
        train_y = names.map_labels(train["label"])
        usable = np.flatnonzero(train_y >= 0)
        train_x, train_y = train["features"][usable], train_y[usable]
        classes = np.unique(train_y)

        zs_pred = metrics.rank_classes(test_x, weights, 1)[:, 0]
        scores = {"zero_shot_top1": float(np.mean(zs_pred == test_y))}
        # The search split is disjoint from every cache.
        val = metrics.sample_k_shot(train_y, cfg.val_per_class, seed=cfg.seed + 1, classes=classes)
        rest = np.setdiff1d(np.arange(len(train_y)), val)
        alphas, betas = metrics.default_tip_grid(tuple(cfg.search_scale), tuple(cfg.search_step))
        search = {}
        for k in (int(k) for k in cfg.shots):
            cache = rest[metrics.sample_k_shot(train_y[rest], k, seed=cfg.seed, classes=classes)]
            keys, values = metrics.build_cache(train_x[cache], train_y[cache], num_classes)
            found = metrics.tip_adapter_search(
                train_x[val], train_y[val], keys, values, weights, alphas=alphas, betas=betas
            )
            pred = metrics.tip_adapter_predict(
                test_x, keys, values, weights, found["alpha"], found["beta"]
            )
            scores[f"tip_top1_{k}shot"] = float(np.mean(pred == test_y))
            search[f"{k}shot"] = {key: found[key] for key in ("alpha", "beta", "val_top1")}
            if cfg.linear_probe:
                probe = metrics.linear_probe(
                    train_x[cache],
                    train_y[cache],
                    train_x[val],
                    train_y[val],
                    test_x,
                    test_y,
                    num_classes=num_classes,
                    refine_steps=1,
                )
                scores[f"linear_probe_top1_{k}shot"] = probe["top1"]
                search[f"{k}shot"]["linear_probe_C"] = probe["best_C"]
        return self._result(
            scores,
            len(test_y),
            templates=list(templates),
            num_classes=num_classes,
            class_names_source=names.source,
            train_split=cfg.train_split,
            val_examples=int(len(val)),
            search=search,
        )


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
    specs = parse_tasks(eval_config.tasks if tasks is None else tasks, EVALUATORS)

    def settings(kind):
        cfg = ml_collections.ConfigDict(schema[kind].to_dict())
        if kind in eval_config:
            cfg.update(eval_config[kind])
        return cfg

    return [EVALUATORS[s.kind](s, settings(s.kind), settings("zeroshot")) for s in specs]
