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
from sa2va_pipeline.devices import autocast_dtype, resolve_device
from sa2va_pipeline.training.trainer import MetricsLogger, train
from sa2va_pipeline.training.validation import validation_dice

if TYPE_CHECKING:
    import torch

    from sa2va_pipeline.model.sa2va import Sa2VA
    from sa2va_pipeline.training.distributed import DistributedContext

log = logging.getLogger(__name__)

# The losses of Sa2VA.training_forward, renamed for the logs (``loss`` is what the trainer minimises).
LOSS_NAMES = {"total": "loss", "llm": "loss_llm", "mask_bce": "loss_mask_bce", "mask_dice": "loss_mask_dice"}


def build_model(source: ModelSource, device: str, seed: int, dtype: torch.dtype | None = None) -> Sa2VA:
    """The untrained model: an official checkpoint directory, or a preset with deterministic random weights.

    Weights are float32 unless ``dtype`` says otherwise (bf16 for bf16 training on GPU: the frozen weights stay
    bf16 and the trainable ones become fp32 masters, see :func:`trainable_to_fp32`).
    """
    import torch

    from sa2va_pipeline.model import Sa2VA

    dtype = torch.float32 if dtype is None else dtype
    if source.checkpoint:
        return Sa2VA.from_pretrained(source.checkpoint, device=device, dtype=dtype)
    if not source.preset:
        raise ValueError("Set training.model.preset (e.g. tiny) or training.model.checkpoint (a directory).")
    return Sa2VA.from_preset(source.preset, device=device, dtype=dtype, seed=seed, **dict(source.overrides))


def trainable_to_fp32(model: Sa2VA) -> None:
    """fp32 master copies of the trainable tensors (AdamW updates of 4e-5 x w vanish in bf16)."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


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
    distributed: DistributedContext | None = None,
) -> TrainedModel:
    """Fine-tune Sa2VA on ``train_samples`` (dicts with ``image``, ``masks``, ``phrases``), validating on
    ``val_samples``; returns the trained model with its provenance and history.

    ``params`` is ``params:training`` (or an already resolved :class:`TrainingConfig`). With
    ``training.devices`` > 1 the run is spread over that many worker processes (``distributed.py``, DDP or
    FSDP per ``training.strategy``) and this call returns rank 0's model; ``distributed`` is how a worker
    calls back in.
    """
    import torch

    started_at = time.monotonic() if started_at is None else started_at
    config = params if isinstance(params, TrainingConfig) else load_training_config(params)
    if distributed is None and config.devices > 1:
        from sa2va_pipeline.training.distributed import run_training_distributed

        return run_training_distributed(train_samples, val_samples, params, config, log_metrics)
    if distributed is not None:
        from sa2va_pipeline.training.distributed import worker_config

        config = worker_config(config, distributed)
    fsdp = distributed is not None and config.strategy == "fsdp"
    if distributed is None and config.strategy != "ddp":
        log.warning("training.strategy %r has no effect with training.devices: 1", config.strategy)
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    device = resolve_device(config.device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(config.seed)
    amp_dtype = autocast_dtype(config.precision, device)
    # bf16 training on GPU: frozen weights in bf16 (half the memory and bandwidth), trainable ones fp32.
    low_precision = amp_dtype if device.startswith("cuda") and amp_dtype is not None else None
    model = build_model(config.model, device, config.seed, dtype=low_precision)
    prepared = prepare_for_training(
        model, config.lora, config.trainable, added_token_ids(model), config.gradient_checkpointing
    )
    if low_precision is not None:
        trainable_to_fp32(model)
    if distributed is not None and distributed.rank:
        torch.manual_seed(config.seed + distributed.rank)  # own dropout / point sampling per rank
    log.info("Model source %s on %s, recipe %s", config.model.describe(), device, config.recipe)
    if log_metrics is not None:
        log_metrics({f"params_trainable.{c['group']}": float(c["trainable"]) for c in prepared.counts}, 0)

    # filled before sharding: rank 0 runs the encoders alone, which a sharded model cannot do
    cache = _feature_cache(model, config, train_samples, amp_dtype, distributed)
    params_by_group = prepared.params_by_group
    skeleton = None
    if fsdp:
        from sa2va_pipeline.training.distributed import fsdp_shard, unsharded_skeleton
        from sa2va_pipeline.training.parameter_groups import named_parameters_by_group

        skeleton = unsharded_skeleton(model) if distributed.is_main else None
        units = fsdp_shard(model, distributed)
        log.info("FSDP: %d shard groups + the root", len(units))
        # fully_shard replaced every parameter by a sharded one: the optimiser and the checks need the new
        # ones (and dropping the old ones frees their memory)
        params_by_group = named_parameters_by_group(model, prepared.layout)
        prepared.params_by_group = {}
    if config.compile:
        compile_llm_layers(model, prepared.layout)

    def make_batch(samples: list[dict[str, Any]], rng: random.Random) -> dict[str, Any]:
        if distributed is not None:
            from sa2va_pipeline.training.distributed import shard

            samples = shard(samples, distributed)
            if distributed.rank:  # other prompts than rank 0 (which draws as a single device would)
                rng = random.Random(rng.getrandbits(64) + distributed.rank)
        batch = model.collate(
            samples,
            rng=rng,
            answer=_prompt_answer(config, rng),
            questions=None if config.prompt.questions == "official" else config.prompt.questions,
            skip_pixels=cache.parts if cache is not None else (),  # cached features replace those pixels
        )
        return cache.attach(batch, [s["image"] for s in samples]) if cache is not None else batch

    def loss_fn(m: Sa2VA, batch: dict[str, Any]) -> dict[str, Any]:
        out = m.training_forward(batch, mask_loss=config.mask_loss)
        return {LOSS_NAMES.get(k, k): v for k, v in out.items()}

    if fsdp:
        from sa2va_pipeline.training.distributed import fsdp_loss_fn

        loss_fn = fsdp_loss_fn(loss_fn, distributed)
    elif distributed is not None:
        from sa2va_pipeline.training.distributed import ddp_loss_fn

        loss_fn = ddp_loss_fn(model, loss_fn, distributed)

    val = list(val_samples)[: config.eval.max_samples] if config.eval.max_samples else list(val_samples)

    def evaluate(m: Sa2VA) -> dict[str, Any]:
        return validation_dice(m, val, config.eval.thresholds, config.eval.batch_size, distributed=distributed)

    result = train(
        model,
        params_by_group,
        train_samples,
        config,
        make_batch,
        loss_fn,
        evaluate=evaluate if val else None,
        log_metrics=log_metrics,
        started_at=started_at,
        progress=progress,
        main_process=distributed is None or distributed.is_main,
    )
    result.parameter_counts = prepared.counts
    if device.startswith("cuda"):
        result.peak_memory_gb = [round(torch.cuda.max_memory_allocated(device) / 1e9, 3)]
    if fsdp:
        from sa2va_pipeline.training.distributed import gather_full_model

        # the same plain model as DDP / one device (on the CPU) on rank 0; the others keep their shards
        full = gather_full_model(model, skeleton, distributed)
        model = full if full is not None else model
    model.eval()
    return TrainedModel(model=model, config=config, result=result)


def compile_llm_layers(model: Sa2VA, layout: Any) -> int:
    """``torch.compile`` every LLM decoder layer in place (``training.compile``); returns how many.

    Per layer rather than the whole model: the layers share one code path, so one graph serves all of them,
    and the rest of the step (collate-shaped inputs, the mask decoder's point sampling) stays eager. Works
    with LoRA (peft's layers are traced into the graph), gradient checkpointing (transformers checkpoints the
    layer's forward around the compiled call) and DDP / FSDP (their hooks stay outside the graphs). Shapes
    change with each batch's longest prompt, so expect a recompile or two before dynamic shapes settle.
    """
    from torch import nn

    llm = model.get_submodule(layout.llm.rstrip("."))
    layers = getattr(llm, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"training.compile: no decoder layers found under {layout.llm}layers")
    for layer in layers:
        layer.compile()
    log.info("torch.compile: %d LLM decoder layers (compiled on first use)", len(layers))
    return len(layers)


def _feature_cache(
    model: Sa2VA,
    config: TrainingConfig,
    train_samples: Sequence[dict[str, Any]],
    amp_dtype: torch.dtype | None,
    distributed: DistributedContext | None,
) -> Any:
    """The filled feature cache of the frozen encoders (``training.feature_cache``), or None when it is off or
    both encoders train. Under several workers rank 0 fills it and the others wait, then only read."""
    from sa2va_pipeline.training.feature_cache import FeatureCache, cacheable_parts, training_images

    settings = config.feature_cache
    if not settings.enabled:
        return None
    parts = cacheable_parts(config.trainable.vision_tower, config.trainable.sam2_image_encoder, model.family)
    if not parts:
        log.info("training.feature_cache is on but both encoders train: nothing to cache")
        return None
    cache = FeatureCache(settings.dir, model, parts, settings.dtype, compute_dtype=amp_dtype,
                         keep_in_memory=settings.keep_in_memory)
    if distributed is None or distributed.is_main:
        computed = cache.fill(training_images(train_samples), batch_size=max(1, config.eval.batch_size))
        log.info("Feature cache (%s, %s): %d images computed, the rest reused", "+".join(parts), settings.dtype, computed)
    if distributed is not None:
        import torch.distributed as dist

        dist.barrier()
    return cache
