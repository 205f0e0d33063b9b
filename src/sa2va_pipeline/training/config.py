"""The training configuration: a typed view of ``params:training`` (conf/base/parameters_training.yml).

The YAML holds the settings shared by every run plus one block per recipe (``recipes.tiny``,
``recipes.official``); ``recipe: auto`` picks ``tiny`` for a built-in preset and ``official`` for a
checkpoint directory. The chosen recipe block is merged over the shared settings, and the result is read
into the dataclasses below, which reject unknown keys with a message naming them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from sa2va_pipeline.training.feature_cache import FeatureCacheSettings

EmbeddingMode = Literal["full", "new_tokens", "frozen"]
# Multi-device strategies (training/distributed.py): DDP replicas, or FSDP2 sharding of weights and states.
STRATEGIES = ("ddp", "fsdp")


@dataclass
class ModelSource:
    """Where the model comes from: a built-in preset (random init) or an official checkpoint directory."""

    preset: str | None = "tiny"  # built-in preset name; ignored when ``checkpoint`` is set
    checkpoint: str | None = None  # path to an official Sa2VA checkpoint directory (wins over preset)
    overrides: dict[str, Any] = field(default_factory=dict)  # preset config overrides

    def describe(self) -> dict[str, Any]:
        """JSON-able description written next to the trained weights."""
        if self.checkpoint:
            return {"kind": "checkpoint", "checkpoint": str(self.checkpoint)}
        return {"kind": "preset", "preset": self.preset, "overrides": copy.deepcopy(self.overrides)}


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
class ScheduleSettings:
    """How long to train. Exactly one of ``max_steps`` / ``epochs`` / ``time_budget_s`` decides the length."""

    max_steps: int | None = None  # optimiser steps
    epochs: float | None = 1.0  # passes over the (repeated) training set
    repeats: int = 1  # the training set is repeated this many times per epoch (official: 100)
    time_budget_s: float | None = None  # wall-clock budget for the whole training call
    calibration_steps: int = 3  # timed forward/backward passes (median) used to size a time-budgeted run


@dataclass
class EvalSettings:
    """Validation Dice during training."""

    interval: int = 0  # optimiser steps between validations (0: only at start and end)
    at_start: bool = True  # validate the untrained model at step 0 (the baseline)
    max_samples: int | None = None  # cap the validation set (None: all)
    batch_size: int = 4  # images per predict_proba call
    thresholds: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)])


@dataclass
class CheckpointSettings:
    """Resumable checkpoints (safetensors + JSON, written atomically)."""

    dir: str = "data/06_models/training_checkpoints"
    interval: int = 0  # optimiser steps between checkpoints (0: only at the end)
    keep_last: int = 2
    resume: bool = False  # continue from the newest checkpoint in ``dir``


@dataclass
class PromptSettings:
    """Question / answer text for teacher forcing; "official" = the official lists, sampled at random."""

    questions: str | list[str] = "official"
    answers: str | list[str] = "official"


@dataclass
class TrainingConfig:
    """Everything ``train`` needs, resolved from the parameters."""

    model: ModelSource = field(default_factory=ModelSource)
    recipe: str = "tiny"  # the resolved recipe name (never "auto" here)
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    devices: int = 1  # worker processes, one per GPU (see training/distributed.py); 1 = this process
    strategy: str = "ddp"  # with devices > 1: ddp (replicas, gradients all-reduced) | fsdp (FSDP2, sharded)
    compile: bool = False  # torch.compile each LLM decoder layer (GPU throughput; compiles once per shape)
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    gradient_checkpointing: bool = False
    prefetch: int = 2  # steps whose batches are built ahead on background threads (0: build in the loop)
    batch_size: int = 2
    grad_accumulation: int = 1
    mask_loss: str = "points"  # points (official point-sampled BCE + Dice) | dense (all 256x256 pixels)
    num_threads: int | None = None  # torch CPU threads (None: torch's default)
    log_every: int = 1
    export_merged: bool = False
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


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in (over or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _build(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"Unknown training setting(s) {', '.join(where + k for k in unknown)}; "
            f"allowed under '{where or 'training.'}': {', '.join(sorted(fields))}. "
            "Fix conf/base/parameters_training.yml (or your --params override)."
        )
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}{name}.")
        elif name == "betas":
            kwargs[name] = tuple(float(v) for v in value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def resolve_recipe_name(params: dict[str, Any]) -> str:
    """``recipe: auto`` -> ``official`` for a checkpoint directory, ``tiny`` for a built-in preset."""
    recipe = params.get("recipe", "auto")
    if recipe != "auto":
        return recipe
    return "official" if (params.get("model") or {}).get("checkpoint") else "tiny"


def load_training_config(params: dict[str, Any]) -> TrainingConfig:
    """Turn ``params:training`` into a :class:`TrainingConfig` (recipe block merged over shared settings)."""
    params = copy.deepcopy(dict(params))
    recipes = params.pop("recipes", {}) or {}
    name = resolve_recipe_name(params)
    if name not in recipes and recipes:
        raise ValueError(
            f"training.recipe is '{name}' but training.recipes only defines {sorted(recipes)}; "
            "add the block or pick one of those."
        )
    merged = _deep_merge(params, recipes.get(name, {}))
    merged["recipe"] = name
    config = _build(TrainingConfig, merged, "training.")
    if config.strategy not in STRATEGIES:
        raise ValueError(
            f"training.strategy must be one of {' | '.join(STRATEGIES)} (used with training.devices > 1), "
            f"got {config.strategy!r}"
        )
    if not isinstance(config.compile, bool):
        raise TypeError(f"training.compile must be true or false, got {config.compile!r}")
    if config.mask_loss not in ("points", "dense"):
        raise ValueError(f"training.mask_loss must be 'points' or 'dense', got {config.mask_loss!r}")
    if config.trainable.embeddings not in ("full", "new_tokens", "frozen"):
        raise ValueError(
            "training.trainable.embeddings must be full | new_tokens | frozen, "
            f"got {config.trainable.embeddings!r}"
        )
    _check_prompt_forms(config.prompt.questions, "{class_name}", "training.prompt.questions")
    _check_prompt_forms(config.prompt.answers, "[SEG]", "training.prompt.answers")
    return config


def _check_prompt_forms(forms: str | list[str], needle: str, name: str) -> None:
    """``official`` or a non-empty list of forms that each contain ``needle`` exactly once."""
    if forms == "official":
        return
    if isinstance(forms, str) or not forms or any(str(f).count(needle) != 1 for f in forms):
        raise ValueError(f"{name} must be 'official' or a list of forms each containing {needle} once, got {forms!r}")
