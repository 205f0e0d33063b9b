"""The training configuration: a typed view of ``params:training`` (conf/base/parameters_training.yml).

One source of defaults: the dataclasses below. conf/base/parameters_training.yml documents every field
with its comment; tests/training/test_config.py checks that it names every field and that its shared
values equal these defaults, so the two cannot drift apart.

Recipes. ``recipe: auto`` picks ``tiny`` for a built-in preset and ``official`` for a checkpoint directory.
A recipe block (``recipes.<name>``) holds only what that recipe changes; the shared settings are merged
OVER it, so an override of a shared key always applies (``kedro run --params training.optimizer.lr=1e-3``
changes the lr of whichever recipe runs). Precedence, lowest first: dataclass defaults < the recipe block <
the shared settings (YAML + CLI). A key set in both places is reported at start (the shared value wins);
the YAML itself sets no key in both places (checked by a test).

Values are checked when the config loads: unknown keys, wrong choices, and non-finite or absurd numbers
(lr 1e45, a negative batch, warmup_ratio > 1, ...) are refused with the key named.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from sa2va_pipeline.errors import UserError
from sa2va_pipeline.model.configs import MASK_RESOLUTIONS
from sa2va_pipeline.training.feature_cache import FeatureCacheSettings

log = logging.getLogger(__name__)

EmbeddingMode = Literal["full", "new_tokens", "frozen"]
# Multi-device strategies (training/fsdp.py, training/ranks.py): DDP replicas, or FSDP2 sharding.
STRATEGIES = ("ddp", "fsdp")
# ``training.compile`` besides true (torch.compile's default mode) and false: torch.compile modes by name.
# reduce-overhead replays each compiled layer as a CUDA graph (cudagraph trees; one recording per shape).
# (max-autotune-no-cudagraphs is not offered: on an H200 it had not finished compiling sa2va-internvl3-2b's
# layers after 7 minutes, its Triton matmul candidates failing for lack of shared memory.)
COMPILE_MODES = ("reduce-overhead",)


class TrainingConfigError(UserError, ValueError):
    """A training setting that cannot be used; the message names the key and what is allowed."""


@dataclass
class ModelSource:
    """Where the model comes from: a built-in preset (random init) or an official checkpoint directory."""

    preset: str | None = "tiny"  # built-in preset name; ignored when ``checkpoint`` is set
    checkpoint: str | None = None  # path to an official Sa2VA checkpoint directory (wins over preset)
    overrides: dict[str, Any] = field(default_factory=dict)  # preset config overrides
    # standard (official) | high: SAM2 input x2, mask logits 2x finer (model.configs.with_mask_resolution)
    mask_resolution: str = "standard"

    def describe(self) -> dict[str, Any]:
        """JSON-able description written next to the trained weights (``mask_resolution`` only when not
        standard, so folders of the official mode read as before)."""
        extra = {} if self.mask_resolution == "standard" else {"mask_resolution": self.mask_resolution}
        if self.checkpoint:
            return {"kind": "checkpoint", "checkpoint": str(self.checkpoint), **extra}
        return {"kind": "preset", "preset": self.preset, "overrides": copy.deepcopy(self.overrides), **extra}


@dataclass
class LoraSettings:
    """LoRA on the LLM body only (never lm_head)."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    # "all-linear" = every nn.Linear inside the LLM body; or a list of module short names (q_proj, ...)
    target_modules: str | list[str] = "all-linear"


@dataclass
class TrainableParts:
    """Which parts of the model train besides LoRA."""

    embeddings: EmbeddingMode = "full"  # full embed_tokens + lm_head | only the added-token rows | frozen
    projector: bool = True  # vision -> LLM projector (mlp1)
    mask_decoder: bool = True  # SAM2 mask decoder incl. conv_s0 / conv_s1
    text_hidden_fcs: bool = True  # [SEG] hidden state -> SAM2 prompt
    sam2_image_encoder: bool = False  # SAM2 Hiera + FPN neck (frozen in the official recipe)
    vision_tower: bool = False  # InternViT (frozen in the official recipe)
    # The gradient-reach check refuses to train unless these groups receive gradient (lora always does).
    require_gradient: list[str] = field(default_factory=lambda: ["lora", "mask_decoder", "text_hidden_fcs"])


@dataclass
class OptimizerSettings:
    """AdamW + linear warmup + cosine decay to zero."""

    lr: float = 4e-5
    lr_by_group: dict[str, float] = field(default_factory=dict)  # e.g. {mask_decoder: 1e-3}
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_ratio: float = 0.05
    warmup_start_factor: float = 1e-5


@dataclass
class LossSettings:
    """Weights and point sampling of the training loss (passed to ``Sa2VA.training_forward``)."""

    mask_loss: str = "points"  # points (official point-sampled BCE + Dice) | dense (all 256x256 pixels)
    llm_weight: float = 1.0  # LM cross-entropy on the answer tokens ([SEG] included)
    bce_weight: float = 2.0  # mask BCE-with-logits
    dice_weight: float = 0.5  # mask Dice
    num_points: int = 12544  # points sampled per mask (mask_loss: points)
    oversample_ratio: float = 3.0  # candidates drawn per point before keeping the most uncertain
    importance_sample_ratio: float = 0.75  # share of points taken by uncertainty (the rest uniform)
    cldice_weight: float = 0.0  # soft-skeleton clDice on the mask logits grid (0: off, official)
    cldice_iterations: int = 5  # soft-skeleton steps (>= the largest vessel radius in logit-grid pixels)

    def forward_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``Sa2VA.training_forward``."""
        return dataclasses.asdict(self)


@dataclass
class ScheduleSettings:
    """How long to train. ``max_steps`` if set, else ``epochs`` over the repeated training set, else the
    ``time_budget_s``."""

    max_steps: int | None = None  # optimiser steps
    epochs: float | None = 1.0  # passes over the (repeated) training set
    repeats: int = 1  # the training set is repeated this many times per epoch (official: 100)
    time_budget_s: float | None = None  # wall-clock budget for the whole training call
    calibration_steps: int = 3  # timed forward/backward passes (median) used to size a time-budgeted run


@dataclass
class EvalSettings:
    """Validation Dice during training (every val image x every trained phrase)."""

    interval: int | None = None  # optimiser steps between validations; null: spread ``points`` over the run
    points: int = 6  # with interval null: validations over the run, start and end included (0: none)
    at_start: bool = True  # validate the untrained model at step 0 (the baseline)
    max_samples: int | None = None  # cap the validation set (None: all)
    batch_size: int = 4  # images per predict_proba call
    thresholds: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)])


@dataclass
class CheckpointSettings:
    """Resumable checkpoints (safetensors + JSON, written atomically), one folder per run."""

    dir: str = "data/06_models/training_checkpoints"  # runs live in <dir>/<run id>/step_*
    interval: int = 0  # optimiser steps between checkpoints (0: only at the end)
    keep_last: int = 2  # checkpoints kept per run (never fewer than 1)
    resume: bool | str = False  # true: continue the latest run in ``dir``; a run id: that run; false: a new run


@dataclass
class PromptSettings:
    """Question / answer text for teacher forcing; "official" = the official lists, sampled at random."""

    questions: str | list[str] = "official"
    answers: str | list[str] = "official"


@dataclass
class FsdpSettings:
    """``training.fsdp``: how ``strategy: fsdp`` builds the model (training/fsdp.py)."""

    # build on the meta device and fill each rank's shards tensor by tensor (about 1/N of the model per GPU
    # at start); false: every rank builds the whole model first, then shards it
    meta_init: bool = True


@dataclass
class TrainingConfig:
    """Everything training needs, resolved from the parameters."""

    model: ModelSource = field(default_factory=ModelSource)
    recipe: str = "tiny"  # the resolved recipe name (never "auto" here)
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    devices: int = 1  # worker processes, one per GPU (see training/distributed.py); 1 = this process
    strategy: str = "ddp"  # with devices > 1: ddp (replicas, gradients all-reduced) | fsdp (FSDP2, sharded)
    fsdp: FsdpSettings = field(default_factory=FsdpSettings)
    # torch.compile each LLM decoder layer (GPU throughput; compiles once per shape): false | true (torch's
    # default mode) | reduce-overhead (CUDA graphs)
    compile: bool | str = False
    pad_to_multiple: int | None = None  # prompt lengths padded up to a multiple of this (None: the longest)
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    master_weights: str = "auto"  # where fp32 trainable weights live under bf16: auto | optimizer | model
    gradient_checkpointing: bool = False
    prefetch: int = 2  # steps whose batches are built ahead on background threads (0: build in the loop)
    batch_size: int = 2
    grad_accumulation: int = 1
    max_objects_per_image: int | None = 5  # objects (turns) kept per image per step, drawn at random
    min_train_samples: int = 4  # fewer training images stop the run before training
    num_threads: int | None = None  # torch CPU threads (None: torch's default)
    log_every: int = 1
    export_merged: bool = False
    loss: LossSettings = field(default_factory=LossSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    trainable: TrainableParts = field(default_factory=TrainableParts)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    prompt: PromptSettings = field(default_factory=PromptSettings)
    feature_cache: FeatureCacheSettings = field(default_factory=FeatureCacheSettings)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# Numeric settings and their allowed range (lo, hi, lo_inclusive, hi_inclusive); None = unbounded side.
# Anything outside (or not a finite number) is refused when the config loads, naming the key.
NUMERIC_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "seed": (0, None, True, True),
    "devices": (1, 1024, True, True),
    "prefetch": (0, 64, True, True),
    "batch_size": (1, 1_000_000, True, True),
    "grad_accumulation": (1, 1_000_000, True, True),
    "max_objects_per_image": (1, 10_000, True, True),
    "min_train_samples": (1, None, True, True),
    "num_threads": (1, 4096, True, True),
    "pad_to_multiple": (1, 1 << 20, True, True),
    "log_every": (1, None, True, True),
    "loss.llm_weight": (0, 1e6, True, True),
    "loss.bce_weight": (0, 1e6, True, True),
    "loss.dice_weight": (0, 1e6, True, True),
    "loss.num_points": (1, 1 << 24, True, True),
    "loss.oversample_ratio": (1, 1000, True, True),
    "loss.importance_sample_ratio": (0, 1, True, True),
    "loss.cldice_weight": (0, 1e6, True, True),
    "loss.cldice_iterations": (1, 1000, True, True),
    "lora.r": (1, 65536, True, True),
    "lora.alpha": (0, 1e6, False, True),
    "lora.dropout": (0, 1, True, False),
    "optimizer.lr": (0, 1, False, True),
    "optimizer.weight_decay": (0, 10, True, True),
    "optimizer.betas.0": (0, 1, True, False),
    "optimizer.betas.1": (0, 1, True, False),
    "optimizer.grad_clip": (0, 1e6, False, True),
    "optimizer.warmup_ratio": (0, 1, True, True),
    "optimizer.warmup_start_factor": (0, 1, True, True),
    "schedule.max_steps": (1, 1e12, True, True),
    "schedule.epochs": (0, 1e9, False, True),
    "schedule.repeats": (1, 1e9, True, True),
    "schedule.time_budget_s": (0, 1e9, False, True),
    "schedule.calibration_steps": (1, 1000, True, True),
    "eval.interval": (0, None, True, True),
    "eval.points": (0, 10_000, True, True),
    "eval.max_samples": (1, None, True, True),
    "eval.batch_size": (1, 100_000, True, True),
    "checkpoint.interval": (0, None, True, True),
    "checkpoint.keep_last": (1, 100_000, True, True),
}
INTEGER_KEYS = {
    "seed", "devices", "prefetch", "batch_size", "grad_accumulation", "max_objects_per_image", "min_train_samples",
    "num_threads", "pad_to_multiple", "log_every", "loss.num_points", "loss.cldice_iterations", "lora.r",
    "schedule.max_steps", "schedule.repeats",
    "schedule.calibration_steps", "eval.interval", "eval.points", "eval.max_samples", "eval.batch_size",
    "checkpoint.interval", "checkpoint.keep_last",
}


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in (over or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def overlapping_keys(shared: dict[str, Any], recipe: dict[str, Any], where: str = "") -> list[str]:
    """Dotted keys set both in the shared settings and in a recipe block (the shared value wins)."""
    out = []
    for key, value in (recipe or {}).items():
        if key not in shared:
            continue
        if isinstance(value, dict) and isinstance(shared[key], dict) and value and key not in DICT_VALUED:
            out += overlapping_keys(shared[key], value, f"{where}{key}.")
        else:
            out.append(where + key)
    return out


# Settings whose value is itself a free-form dict (merged as a whole, not key by key).
DICT_VALUED = {"overrides", "lr_by_group"}


def _build(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise TrainingConfigError(
            f"Unknown training setting(s) {', '.join(where + k for k in unknown)}; "
            f"allowed under '{where or 'training.'}': {', '.join(sorted(fields))}. "
            "Fix conf/base/parameters_training.yml (or your --params override)."
        )
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            if value is not None and not isinstance(value, dict):
                raise TrainingConfigError(f"{where}{name} must be a mapping of settings, got {value!r}")
            kwargs[name] = _build(type(default), value, f"{where}{name}.")
        elif name == "betas":
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise TrainingConfigError(f"{where}betas must be two numbers [beta1, beta2], got {value!r}")
            kwargs[name] = tuple(_number(v, f"{where}betas") for v in value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TrainingConfigError(f"training.{key} must be a number, got {value!r}") from None
    return value


def _get(config: TrainingConfig, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value[int(part)] if part.isdigit() else getattr(value, part)
    return value


def check_numbers(config: TrainingConfig) -> None:
    """Refuse non-finite, non-integer or out-of-range numeric settings, naming the key and its range."""
    for key, (lo, hi, lo_in, hi_in) in NUMERIC_RANGES.items():
        value = _get(config, key)
        if value is None and key in NULLABLE:
            continue
        value = _number(value, key)
        if not math.isfinite(value):
            raise TrainingConfigError(f"training.{key} must be a finite number, got {value!r}")
        if key in INTEGER_KEYS and value != int(value):
            raise TrainingConfigError(f"training.{key} must be a whole number, got {value!r}")
        too_low = lo is not None and (value < lo or (value == lo and not lo_in))
        too_high = hi is not None and (value > hi or (value == hi and not hi_in))
        if too_low or too_high:
            low = "-inf" if lo is None else f"{lo:g}"
            high = "inf" if hi is None else f"{hi:g}"
            span = f"{'[' if lo_in else '('}{low}, {high}{']' if hi_in else ')'}"
            raise TrainingConfigError(
                f"training.{key} = {value!r} is outside its allowed range {span}. "
                "Fix conf/base/parameters_training.yml (or your --params override)."
            )
    for group, lr in config.optimizer.lr_by_group.items():
        lr = _number(lr, f"optimizer.lr_by_group.{group}")
        if not (math.isfinite(lr) and 0 < lr <= 1):
            raise TrainingConfigError(f"training.optimizer.lr_by_group.{group} = {lr!r} must be a number in (0, 1]")
    for t in config.eval.thresholds:
        if not (math.isfinite(_number(t, "eval.thresholds")) and 0 < float(t) < 1):
            raise TrainingConfigError(f"training.eval.thresholds must lie strictly between 0 and 1, got {t!r}")


# Settings that may be null (their dataclass default is None or they are optional lengths).
NULLABLE = {
    "max_objects_per_image", "num_threads", "pad_to_multiple", "schedule.max_steps", "schedule.epochs",
    "schedule.time_budget_s", "eval.interval", "eval.max_samples",
}


def resolve_recipe_name(params: dict[str, Any]) -> str:
    """``recipe: auto`` -> ``official`` for a checkpoint directory, ``tiny`` for a built-in preset."""
    recipe = params.get("recipe", "auto")
    if recipe != "auto":
        return recipe
    return "official" if (params.get("model") or {}).get("checkpoint") else "tiny"


def load_training_config(params: dict[str, Any] | TrainingConfig) -> TrainingConfig:
    """Turn ``params:training`` into a checked :class:`TrainingConfig` (shared settings over the recipe)."""
    if isinstance(params, TrainingConfig):
        return params
    params = copy.deepcopy(dict(params))
    recipes = params.pop("recipes", {}) or {}
    name = resolve_recipe_name(params)
    if name not in recipes and recipes:
        raise TrainingConfigError(
            f"training.recipe is '{name}' but training.recipes only defines {sorted(recipes)}; "
            "add the block or pick one of those."
        )
    block = recipes.get(name, {}) or {}
    for key in overlapping_keys(params, block):
        log.info("training.%s is set both in the shared settings and in recipes.%s: the shared value applies", key, name)
    merged = _deep_merge(block, params)
    merged["recipe"] = name
    config = _build(TrainingConfig, merged, "training.")
    _check_choices(config)
    check_numbers(config)
    return config


def _check_choices(config: TrainingConfig) -> None:
    if config.strategy not in STRATEGIES:
        raise TrainingConfigError(
            f"training.strategy must be one of {' | '.join(STRATEGIES)} (used with training.devices > 1), "
            f"got {config.strategy!r}"
        )
    if not isinstance(config.compile, bool) and config.compile not in COMPILE_MODES:
        raise TrainingConfigError(
            f"training.compile must be true, false or one of {' | '.join(COMPILE_MODES)}, got {config.compile!r}"
        )
    if isinstance(config.pad_to_multiple, bool):
        raise TrainingConfigError(
            f"training.pad_to_multiple must be a positive whole number or null, got {config.pad_to_multiple!r}"
        )
    if not isinstance(config.fsdp.meta_init, bool):
        raise TrainingConfigError(f"training.fsdp.meta_init must be true or false, got {config.fsdp.meta_init!r}")
    if config.master_weights not in ("auto", "optimizer", "model"):
        raise TrainingConfigError(
            f"training.master_weights must be auto | optimizer | model, got {config.master_weights!r}"
        )
    if config.model.mask_resolution not in MASK_RESOLUTIONS:
        raise TrainingConfigError(
            f"training.model.mask_resolution must be one of {' | '.join(MASK_RESOLUTIONS)}, "
            f"got {config.model.mask_resolution!r}"
        )
    if config.loss.mask_loss not in ("points", "dense"):
        raise TrainingConfigError(f"training.loss.mask_loss must be 'points' or 'dense', got {config.loss.mask_loss!r}")
    if config.trainable.embeddings not in ("full", "new_tokens", "frozen"):
        raise TrainingConfigError(
            "training.trainable.embeddings must be full | new_tokens | frozen, "
            f"got {config.trainable.embeddings!r}"
        )
    resume = config.checkpoint.resume
    if not isinstance(resume, bool) and not (isinstance(resume, str) and resume and "/" not in resume):
        raise TrainingConfigError(f"training.checkpoint.resume must be true, false or a run id (a folder name), got {resume!r}")
    _check_prompt_forms(config.prompt.questions, "{class_name}", "training.prompt.questions")
    _check_prompt_forms(config.prompt.answers, "[SEG]", "training.prompt.answers")


def compile_mode(setting: bool | str) -> str | None:
    """``torch.compile``'s ``mode`` for a ``training.compile`` setting (None: torch's default, for true)."""
    return setting if isinstance(setting, str) else None


def compile_uses_cudagraphs(setting: bool | str, device: Any) -> bool:
    """Whether a ``training.compile`` setting replays the compiled layers as CUDA graphs on ``device`` (a name or
    ``torch.device``; CUDA graphs exist on CUDA devices only)."""
    return setting == "reduce-overhead" and str(device).startswith("cuda")


def _check_prompt_forms(forms: str | list[str], needle: str, name: str) -> None:
    """``official`` or a non-empty list of forms that each contain ``needle`` exactly once."""
    if forms == "official":
        return
    if isinstance(forms, str) or not forms or any(str(f).count(needle) != 1 for f in forms):
        raise TrainingConfigError(f"{name} must be 'official' or a list of forms each containing {needle} once, got {forms!r}")
