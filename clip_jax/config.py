"""The training config schema and its validation.

Every key a run may set is declared in `defaults()`, with its type. Experiment files start
from `defaults()` and change values; `validate()` then rejects unknown keys (with the
closest known key as a hint), wrong types and inconsistent sizes before anything is
compiled, so a typo costs seconds instead of a compile and a crash.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from clip_jax import losses, profiling, sharding
from clip_jax.data import paths
from clip_jax.data.tokenizer import TOKENIZER_KINDS
from clip_jax.errors import UserError
from clip_jax.eval.schema import RANGES as EVAL_RANGES
from clip_jax.eval.schema import config_schema
from clip_jax.models.clip import attention_shapes
from clip_jax.models.layers import (
    ACTIVATIONS,
    ATTENTION_IMPLS,
    REMAT_POLICIES,
    cudnn_attention_problem,
)
from clip_jax.models.registry import get_config, list_models

LOSS_KINDS = ("softmax", "sigmoid")
LOSS_IMPLS = ("dense", "gather", "ring")
DTYPES = ("float32", "bfloat16")
FREEZE = ("", "image", "text")
INIT_TOWERS = ("image", "text", "both")
STREAM_SECOND_PASSES = ("reread", "keep")


# The allowed values of every numeric key that has a range ('> 0', '>= 1', or an interval);
# micro_batch_size and loss.chunk_size have checks of their own below.
RANGES = {
    "batch_size": "> 0",
    "total_steps": "> 0",
    "log_every": "> 0",
    "max_bad_steps": ">= 1",
    "model.logit_scale_init": "> 0",
    "data.crop_scale_min": "(0, 1]",
    "data.crop_scale_max": "(0, 1]",
    "data.num_workers": ">= 0",
    "data.num_threads": ">= 0",
    "data.prefetch": ">= 1",
    "data.device_prefetch": ">= 0",
    "tokenizer.context_length": ">= 2",  # at least the start and end tokens
    "optim.lr": "> 0",
    "optim.warmup_steps": ">= 0",
    "optim.end_lr_ratio": "[0, 1]",
    "optim.weight_decay": ">= 0",
    "optim.b1": "[0, 1)",
    "optim.b2": "[0, 1)",
    "optim.eps": "> 0",
    "optim.grad_clip_norm": ">= 0",
    "optim.image_lr_mult": ">= 0",
    "optim.text_lr_mult": ">= 0",
    "checkpoint.every_steps": ">= 1",
    "checkpoint.keep": ">= 1",
    "checkpoint.keep_period": ">= 0",
    **{f"eval.{key}": allowed for key, allowed in EVAL_RANGES.items()},
}


class ConfigError(UserError):
    """A config problem, with the key at fault and the fix in the message."""


def defaults() -> ml_collections.ConfigDict:
    """The complete schema: every key, its type and a sensible default."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 256  # global, over all devices and hosts
    # Gradient caching (clip_jax/grad_cache.py): examples PER DEVICE embedded and
    # back-propagated at a time; the loss still sees the whole global batch. 0 = off.
    c.micro_batch_size = 0
    # With gradient caching: False puts each global batch on the devices whole and the step
    # slices it; True feeds the step micro-batch by micro-batch, each one twice (embed, then
    # back-propagate; decoded twice), so no device and no host ever holds the global batch.
    c.stream_micro_batches = False
    # Where the streamed step's second pass gets its micro-batches: 'reread' reads and decodes
    # them again (host memory: the micro-batches in flight; twice the decoding), 'keep' keeps
    # the first pass's host copies (host memory: this host's share of the global batch).
    c.stream_second_pass = "reread"
    c.total_steps = 1000
    c.log_every = 10
    c.max_bad_steps = 5  # non-finite steps in a row before the run stops
    # 'START,COUNT': a jax.profiler trace of those steps in workdir/tensorboard; '' = none.
    c.profile_steps = ""

    c.model = ml_collections.ConfigDict()
    c.model.name = "ViT-B/32"
    c.model.dtype = "float32"  # computation dtype
    c.model.param_dtype = "float32"
    c.model.remat_policy = "none"
    # The attention core: 'auto' = cuDNN's fused kernel on NVIDIA GPUs in bfloat16 where its
    # shapes allow, else XLA; 'xla'; 'cudnn' (an error where it does not apply).
    c.model.attention = "auto"
    c.model.logit_scale_init = 1 / 0.07
    c.model.use_logit_bias = False
    c.model.logit_bias_init = -10.0
    c.model.activation = ""  # '' = the named model's; 'gelu' for OpenCLIP's non-quickgelu
    # Warm start (clip_jax/warm_start.py): a converted pretrained directory (clip_jax.convert)
    # or a training workdir (its latest checkpoint); '' = random initialisation. Only read
    # when the run has no checkpoint of its own.
    c.model.init_from = ""
    c.model.init_towers = "both"  # 'image', 'text' or 'both' (+ the logit scale/bias)

    c.data = ml_collections.ConfigDict()
    c.data.name = "clip_demo"
    c.data.data_dir = ""  # '' = $TFDS_DATA_DIR, else ~/tensorflow_datasets (data.paths)
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.crop_scale_min = 0.9
    c.data.crop_scale_max = 1.0
    c.data.num_workers = 0
    # Decoding threads in each process: the training process when num_workers = 0 (0 = in
    # the training loop's own thread), else each worker process, whose own loop is its first
    # (libjpeg-turbo, PIL and OpenCV release the GIL).
    c.data.num_threads = 1
    c.data.prefetch = 2
    c.data.device_prefetch = 2  # global batches on the devices ahead of the step

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.kind = "sentencepiece"  # or 'clip_bpe': the CLIP BPE of pretrained models
    c.tokenizer.path = ""  # '' = the demo tokenizer (clip_demo only)
    c.tokenizer.context_length = 77
    c.tokenizer.lowercase = True

    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "softmax"
    c.loss.impl = "gather"
    c.loss.chunk_size = 1024  # impl='ring': fold each b x b tile in c x c chunks; 0 = whole tile

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 100
    c.optim.end_lr_ratio = 0.0
    c.optim.weight_decay = 0.2
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.grad_clip_norm = 0.0  # 0 = no clipping
    c.optim.mu_dtype = "float32"
    c.optim.image_lr_mult = 1.0
    c.optim.text_lr_mult = 1.0
    c.optim.freeze = ""  # '', 'image' or 'text'

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.model = 1
    c.mesh.rules = "fsdp"  # 'fsdp': parameters split by sharding.logical_rules; 'dp': replicated

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 3
    c.checkpoint.keep_period = 0  # 0 = keep no extra periodic checkpoints
    c.checkpoint.async_save = True

    # Evaluators own their keys (every_steps, batch_size, tasks and one group per kind).
    c.eval = config_schema()
    return c


def _unknown_key(schema: ml_collections.ConfigDict, prefix: str, key: str) -> ConfigError:
    hint = difflib.get_close_matches(key, list(schema.keys()), n=1)
    fix = (
        f"did you mean '{prefix}{hint[0]}'?"
        if hint
        else f"known keys under '{prefix or 'config.'}': {', '.join(sorted(schema.keys()))}"
    )
    return ConfigError(f"unknown config key '{prefix}{key}': {fix}")


def check_command_line(argv: Sequence[str], flag: str = "config") -> None:
    """The command-line errors that ml_collections' flag parsing reports as a traceback: a
    missing `--config` file and an unknown `--config.KEY` (named with the closest known key)."""
    schema = defaults()
    for i, arg in enumerate(argv):
        name, has_value, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-"):
            continue
        if name == flag:
            value = value if has_value else (argv[i + 1] if i + 1 < len(argv) else "")
            path = value.split(":", 1)[0]
            if path and not os.path.isfile(path):
                raise ConfigError(f"--{flag}={value}: there is no config file {path}")
            continue
        name = name.removeprefix("no") if name.startswith(f"no{flag}.") else name
        if not name.startswith(flag + "."):
            continue
        node, prefix = schema, ""
        for key in name[len(flag) + 1 :].split("."):
            key = key.split("[", 1)[0]  # a sequence element: --config.eval.zeroshot.ks[0]
            if not isinstance(node, ml_collections.ConfigDict):
                raise ConfigError(f"--{name}: config key '{prefix.rstrip('.')}' has no sub-keys")
            if key not in node:
                raise _unknown_key(node, prefix, key)
            node, prefix = node[key], f"{prefix}{key}."


def _walk(schema: ml_collections.ConfigDict, config: ml_collections.ConfigDict, prefix: str):
    for key in config.keys():
        path = f"{prefix}{key}"
        if key not in schema:
            raise _unknown_key(schema, prefix, key)
        want, got = schema[key], config[key]
        if isinstance(want, ml_collections.ConfigDict):
            if not isinstance(got, ml_collections.ConfigDict):
                raise ConfigError(f"config key '{path}' must be a group of keys, got {got!r}")
            _walk(want, got, path + ".")
            continue
        if want is None or got is None:
            continue
        ok = isinstance(got, type(want)) or (isinstance(want, float) and isinstance(got, int))
        if isinstance(want, (int, float)) and isinstance(got, bool) and not isinstance(want, bool):
            ok = False
        if not ok:
            raise ConfigError(
                f"config key '{path}' must be {type(want).__name__}, got {got!r} "
                f"({type(got).__name__})"
            )


def _lookup(config: ml_collections.ConfigDict, path: str) -> Any:
    for key in path.split("."):
        config = config[key]
    return config


def _within(value: float, allowed: str) -> bool:
    """`allowed`: '> 0', '>= 1', or an interval '(0, 1]' (see RANGES)."""
    if allowed.startswith(">="):
        return value >= float(allowed[2:])
    if allowed.startswith(">"):
        return value > float(allowed[1:])
    low, high = (float(x) for x in allowed[1:-1].split(","))
    above = value >= low if allowed[0] == "[" else value > low
    below = value <= high if allowed[-1] == "]" else value < high
    return above and below


def _check_range(path: str, value: Any, allowed: str) -> None:
    sequence = isinstance(value, (tuple, list))
    if all(_within(v, allowed) for v in (value if sequence else (value,))):
        return
    each = " (each element)" if sequence else ""
    allowed = allowed if allowed[0] == ">" else f"in {allowed}"
    raise ConfigError(f"config key '{path}' is {value!r}; allowed{each}: {allowed}")


def _choice(path: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(
            f"config key '{path}' is {value!r}; allowed: {', '.join(map(repr, allowed))}"
        )


def validate(
    config: ml_collections.ConfigDict, num_devices: int | None = None, num_processes: int = 1
) -> None:
    """Raises ConfigError on the first problem; cheap, runs before any compilation."""
    _walk(defaults(), config, "")
    _choice("model.name", config.model.name, list_models())
    _choice("loss.kind", config.loss.kind, LOSS_KINDS)
    _choice("loss.impl", config.loss.impl, LOSS_IMPLS)
    _choice("model.dtype", config.model.dtype, DTYPES)
    _choice("model.param_dtype", config.model.param_dtype, DTYPES)
    _choice("optim.mu_dtype", config.optim.mu_dtype, DTYPES)
    _choice("model.remat_policy", config.model.remat_policy, REMAT_POLICIES)
    _choice("stream_second_pass", config.stream_second_pass, STREAM_SECOND_PASSES)
    _choice("model.attention", config.model.attention, ATTENTION_IMPLS)
    _choice("optim.freeze", config.optim.freeze, FREEZE)
    _choice("model.init_towers", config.model.init_towers, INIT_TOWERS)
    _choice("model.activation", config.model.activation, ("", *sorted(ACTIVATIONS)))
    _choice("mesh.rules", config.mesh.rules, sharding.STRATEGIES)
    _choice("tokenizer.kind", config.tokenizer.kind, TOKENIZER_KINDS)
    if config.loss.kind == "sigmoid" and not config.model.use_logit_bias:
        raise ConfigError("loss.kind='sigmoid' needs a learned bias: set model.use_logit_bias=True")
    if config.micro_batch_size < 0:
        raise ConfigError(
            f"micro_batch_size={config.micro_batch_size} must be >= 0 (0 = gradient caching off)"
        )
    if config.stream_micro_batches and not config.micro_batch_size:
        raise ConfigError(
            "stream_micro_batches=True feeds gradient caching's micro-batches: set "
            "micro_batch_size (examples per device) too, or stream_micro_batches=False"
        )
    for key, allowed in RANGES.items():
        _check_range(key, _lookup(config, key), allowed)
    try:
        profile = profiling.parse_steps(config.profile_steps)
    except ValueError as e:
        raise ConfigError(f"config key 'profile_steps' is {config.profile_steps!r}: {e}") from None
    if profile and profile[0] > config.total_steps:
        raise ConfigError(
            f"profile_steps={config.profile_steps} starts after the last step "
            f"(total_steps={config.total_steps}): trace steps within the run"
        )
    if config.loss.chunk_size < 0:
        raise ConfigError(
            f"loss.chunk_size={config.loss.chunk_size} must be >= 0 (0 = one chunk per ring tile)"
        )
    if not 0 < config.data.crop_scale_min <= config.data.crop_scale_max <= 1:
        raise ConfigError(
            "need 0 < data.crop_scale_min <= data.crop_scale_max <= 1, got "
            f"{config.data.crop_scale_min}, {config.data.crop_scale_max}"
        )
    if config.optim.warmup_steps > config.total_steps:
        raise ConfigError(
            f"optim.warmup_steps={config.optim.warmup_steps} exceeds total_steps="
            f"{config.total_steps}: lower the warm-up or train longer"
        )
    if num_devices is not None:
        if config.model.attention == "cudnn":
            _check_cudnn_attention(config.model)
        sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.model)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(
                f"mesh sizes (data, fsdp, model) = {sizes}: use positive sizes and at "
                "most one -1 ('the rest')"
            )
        fixed = 1
        for s in sizes:
            fixed *= s if s > 0 else 1
        if num_devices % fixed or (-1 not in sizes and fixed != num_devices):
            raise ConfigError(
                f"mesh (data={sizes[0]}, fsdp={sizes[1]}, model={sizes[2]}) does not match the "
                f"{num_devices} devices: make the product equal {num_devices}, "
                "or set one size to -1"
            )
        data, fsdp, model = (s if s > 0 else num_devices // fixed for s in sizes)
        batch_shards = data * fsdp
        if config.batch_size % batch_shards:
            raise ConfigError(
                f"batch_size={config.batch_size} is not divisible by the {batch_shards} devices "
                f"that split the batch (mesh data x fsdp): use a multiple of {batch_shards}"
            )
        if config.batch_size % num_processes:
            raise ConfigError(
                f"batch_size={config.batch_size} is not divisible by the {num_processes} processes"
            )
        _check_micro_batch(config.micro_batch_size, config.batch_size, batch_shards)
        if config.loss.impl == "ring":  # the validation loss runs on eval.batch_size batches
            batches = {"batch_size": config.batch_size, "eval.batch_size": config.eval.batch_size}
            for key, batch in batches.items():
                problem = batch % batch_shards == 0 and losses.chunk_size_error(
                    config.loss.chunk_size, batch // batch_shards
                )
                if problem:
                    raise ConfigError(
                        f"loss.{problem}; per-device batch = {key} {batch} / {batch_shards} "
                        "devices (mesh data x fsdp)"
                    )


def _check_cudnn_attention(model: ml_collections.ConfigDict) -> None:
    """model.attention='cudnn' on this run's devices, compute dtype and both towers' shapes."""
    named = get_config(model.name)
    for _lengths, head_dim in attention_shapes(named):
        problem = cudnn_attention_problem(model.dtype, head_dim)
        if problem:
            raise ConfigError(
                f"model.attention='cudnn' does not apply to {model.name} here: {problem}; "
                "use model.attention='auto' (cuDNN where it applies, else XLA) or 'xla'"
            )


def _check_micro_batch(micro: int, batch_size: int, batch_shards: int) -> None:
    per_device = batch_size // batch_shards
    if micro == 0 or per_device % micro == 0:
        return
    divisors = [d for d in range(1, per_device + 1) if per_device % d == 0]
    nearest = sorted(
        {max([d for d in divisors if d < micro], default=1)}
        | {min([d for d in divisors if d > micro], default=per_device)}
    )
    raise ConfigError(
        f"micro_batch_size={micro} (per device) does not divide the per-device batch "
        f"{per_device} (batch_size={batch_size} / {batch_shards} devices): use "
        f"{' or '.join(map(str, nearest))}, or 0 to turn gradient caching off"
    )


def eval_data_dir(config: ml_collections.ConfigDict) -> str:
    """Where the evaluation datasets live: `eval.data_dir`, else the training data's folder."""
    return paths.resolve_data_dir(config.eval.data_dir or config.data.data_dir)


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def _lists_to_tuples(value: Any) -> Any:
    """JSON has no tuples; every sequence in the schema is one."""
    if isinstance(value, dict):
        return {k: _lists_to_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_lists_to_tuples(v) for v in value)
    return value


def from_dict(d: dict[str, Any]) -> ml_collections.ConfigDict:
    """Rebuilds a validated config from `config.json` (used by evaluation of a workdir)."""
    config = ml_collections.ConfigDict(_lists_to_tuples(d))
    validate(config)
    return config


def clip_paper_recipe(model_name: str, lr: float, remat_policy: str = "none"):
    """The CLIP paper's training recipe (Radford et al. 2021, appendix F) for one model.

    Global batch 32,768; AdamW with decoupled weight decay 0.2 on all but gains, biases and
    the temperature; betas (0.9, 0.98), eps 1e-6; linear warm-up (2,000 steps) then cosine
    decay; learnable temperature from 0.07, clipped at 100; bf16 compute, f32 parameters;
    random square crop as the only augmentation; 32 epochs of 400M pairs = 390,625 steps.
    """
    c = defaults()
    c.batch_size = 32768
    c.total_steps = 390_625
    c.log_every = 100
    c.model.name = model_name
    c.model.dtype = "bfloat16"
    c.model.remat_policy = remat_policy
    c.model.logit_scale_init = 1 / 0.07
    # Your own image-text pairs, imported with
    #   python -m clip_jax.data.prepare --source=SHARDS --name=image_text --data_dir=DIR
    c.data.name = "image_text"
    c.data.crop_scale_min = 0.9
    c.data.num_workers = 8
    c.tokenizer.path = ""  # a sentencepiece .model trained on your captions
    c.optim.lr = lr
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 0.2
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6
    c.checkpoint.every_steps = 2000
    c.checkpoint.keep_period = 50_000
    c.eval.every_steps = 10_000
    return c


def smoke_variant(c: ml_collections.ConfigDict, model_name: str = "tiny-vit"):
    """Shrinks a recipe to seconds on one CPU: tiny model, demo data, a handful of steps.

    Everything else (loss, optimizer shape, schedule kind, dtype) is kept, so a smoke run
    exercises the same code paths as the full recipe.
    """
    c.model.name = model_name
    c.data.name = "clip_demo"
    c.data.num_workers = 0
    c.tokenizer.path = ""
    c.tokenizer.context_length = 16
    c.batch_size = 16
    c.micro_batch_size = min(c.micro_batch_size, 1)  # still 2 micro-batches per device
    c.total_steps = 4
    c.log_every = 1
    c.optim.warmup_steps = 1
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep_period = 0
    c.eval.every_steps = 0
    c.eval.batch_size = 16
    c.eval.tasks = ""
    c.mesh.data, c.mesh.fsdp, c.mesh.model = -1, 1, 1
    return c


VARIANTS = ("", "smoke")


def apply_variant(c: ml_collections.ConfigDict, variant: str, tiny_model: str = "tiny-vit"):
    """The `file.py:VARIANT` suffix: '' is the full recipe, 'smoke' its tiny form."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown config variant {variant!r}; known: 'smoke' (or none)")
    return smoke_variant(c, tiny_model) if variant == "smoke" else c
