"""The Sa2VA LoRA fine-tuning recipe: build the model, prepare it, train it, hand back a ``TrainedModel``.

Plain Python (no Kedro); the training node is a thin adapter around :func:`run_training`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sa2va_pipeline.training.artifacts import TrainedModel
from sa2va_pipeline.training.config import ModelSource, TrainingConfig, load_training_config
from sa2va_pipeline.training.prepare import prepare_for_training
from sa2va_pipeline.training.trainer import MetricsLogger, resolve_device, train
from sa2va_pipeline.training.validation import validation_dice

if TYPE_CHECKING:
    from sa2va_pipeline.model.sa2va import Sa2VA

log = logging.getLogger(__name__)

# The losses of Sa2VA.training_forward, renamed for the logs (``loss`` is what the trainer minimises).
LOSS_NAMES = {"total": "loss", "llm": "loss_llm", "mask_bce": "loss_mask_bce", "mask_dice": "loss_mask_dice"}


def build_model(source: ModelSource, device: str, seed: int) -> Sa2VA:
    """The untrained model: an official checkpoint directory, or a preset with deterministic random weights.

    Weights are float32; on GPU the forward runs under bf16 autocast (``training.precision``).
    """
    import torch

    from sa2va_pipeline.model import Sa2VA

    if source.checkpoint:
        return Sa2VA.from_pretrained(source.checkpoint, device=device, dtype=torch.float32)
    if not source.preset:
        raise ValueError("Set training.model.preset (e.g. tiny) or training.model.checkpoint (a directory).")
    return Sa2VA.from_preset(source.preset, device=device, dtype=torch.float32, seed=seed, **dict(source.overrides))


def added_token_ids(model: Sa2VA) -> list[int]:
    """Ids of the tokens Sa2VA adds to the LLM's vocabulary ([SEG], <p>, </p>, <vp>, </vp>)."""
    from sa2va_pipeline.model.prompts import SA2VA_ADDED_TOKENS

    ids = [model.tokenizer.convert_tokens_to_ids(t) for t in SA2VA_ADDED_TOKENS]
    return [int(i) for i in ids if i is not None and i != model.tokenizer.unk_token_id]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the trainer's own data order and prompts are seeded separately)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prompt_answer(config: TrainingConfig, rng: random.Random) -> str | None:
    answers = config.prompt.answers
    return None if answers == "official" else rng.choice(list(answers))


def run_training(
    train_samples: Sequence[dict[str, Any]],
    val_samples: Sequence[dict[str, Any]],
    params: dict[str, Any] | TrainingConfig,
    log_metrics: MetricsLogger | None = None,
    started_at: float | None = None,
    progress: bool = True,
) -> TrainedModel:
    """Fine-tune Sa2VA on ``train_samples`` (dicts with ``image``, ``masks``, ``phrases``), validating on
    ``val_samples``; returns the trained model with its provenance and history.

    ``params`` is ``params:training`` (or an already resolved :class:`TrainingConfig`).
    """
    import torch

    started_at = time.monotonic() if started_at is None else started_at
    config = params if isinstance(params, TrainingConfig) else load_training_config(params)
    if config.prompt.questions != "official":
        raise ValueError(
            "training.prompt.questions: only 'official' is supported for now (Sa2VA.collate draws from the "
            "official list); custom answers are supported through training.prompt.answers."
        )
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    device = resolve_device(config.device)
    seed_everything(config.seed)
    model = build_model(config.model, device, config.seed)
    prepared = prepare_for_training(
        model, config.lora, config.trainable, added_token_ids(model), config.gradient_checkpointing
    )
    log.info("Model source %s on %s, recipe %s", config.model.describe(), device, config.recipe)
    if log_metrics is not None:
        log_metrics({f"params_trainable.{c['group']}": float(c["trainable"]) for c in prepared.counts}, 0)

    def make_batch(samples: list[dict[str, Any]], rng: random.Random) -> dict[str, Any]:
        return model.collate(samples, rng=rng, answer=_prompt_answer(config, rng))

    def loss_fn(m: Sa2VA, batch: dict[str, Any]) -> dict[str, Any]:
        out = m.training_forward(batch, mask_loss=config.mask_loss)
        return {LOSS_NAMES.get(k, k): v for k, v in out.items()}

    val = list(val_samples)[: config.eval.max_samples] if config.eval.max_samples else list(val_samples)

    def evaluate(m: Sa2VA) -> dict[str, Any]:
        return validation_dice(m, val, config.eval.thresholds, config.eval.batch_size)

    result = train(
        model,
        prepared.params_by_group,
        train_samples,
        config,
        make_batch,
        loss_fn,
        evaluate=evaluate if val else None,
        log_metrics=log_metrics,
        started_at=started_at,
        progress=progress,
    )
    result.parameter_counts = prepared.counts
    model.eval()
    return TrainedModel(model=model, config=config, result=result)
