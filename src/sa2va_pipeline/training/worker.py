"""One process's whole training, top to bottom: build, prepare, (shard), train, (gather) -> ``TrainedModel``.

A one-device run is exactly :func:`train_on_rank` with ``ctx=None``; every rank of a multi-device run
(``training.devices: N`` or torchrun, see distributed.py) calls the same function with its
``DistributedContext``. The steps, in order:

1. seed, threads, device; build the untrained model (preset or checkpoint) and prepare it (LoRA, trainable
   parts, fp32 masters of the trainable weights on GPU); under FSDP with ``training.fsdp.meta_init`` the
   parameters stay on ``meta`` until step 3;
2. fill the feature cache of the frozen encoders (before sharding: the encoders run unsharded; on meta only
   those encoders are made real for it, then freed);
3. FSDP: shard (keeping an empty skeleton to gather into at the end), with meta init then allocate and fill
   this rank's shards; DDP: wrap the loss;
4. the three callbacks of the loop: ``make_batch`` (collate + cached features + this rank's share),
   ``loss_fn`` (``training_forward`` with the loss settings), ``evaluate`` (per-phrase validation Dice);
5. :class:`~sa2va_pipeline.training.trainer.TrainingLoop` runs;
6. FSDP: gather the full model on rank 0. The returned model still carries LoRA (saved as an adapter).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sa2va_pipeline.devices import autocast_dtype, resolve_device
from sa2va_pipeline.training.artifacts import TrainedModel
from sa2va_pipeline.training.config import compile_mode, compile_uses_cudagraphs
from sa2va_pipeline.training.feature_cache import wait_for_features
from sa2va_pipeline.training.prepare import (
    PreparedModel,
    added_token_ids,
    build_model,
    build_model_on_meta,
    compile_llm_layers,
    prepare_for_training,
    seed_everything,
    trainable_to_fp32,
)
from sa2va_pipeline.training.ranks import ddp_loss_fn, fsdp_loss_fn, peak_memory_per_rank, rank_config, shard
from sa2va_pipeline.training.trainer import MetricsLogger, TrainingLoop
from sa2va_pipeline.training.validation import trained_phrases, validation_dice

if TYPE_CHECKING:
    import torch

    from sa2va_pipeline.model.sa2va import Sa2VA
    from sa2va_pipeline.training.config import TrainingConfig
    from sa2va_pipeline.training.ranks import DistributedContext

log = logging.getLogger(__name__)

# The losses of Sa2VA.training_forward, renamed for the logs (``loss`` is what the loop minimises).
LOSS_NAMES = {"total": "loss", "llm": "loss_llm", "mask_bce": "loss_mask_bce", "mask_dice": "loss_mask_dice",
              "mask_cldice": "loss_mask_cldice"}  # fmt: skip


def train_on_rank(
    train_samples: Sequence[dict[str, Any]],
    val_samples: Sequence[dict[str, Any]],
    config: TrainingConfig,
    run_dir: Path,
    resuming: bool,
    ctx: DistributedContext | None = None,
    log_metrics: MetricsLogger | None = None,
    started_at: float | None = None,
    progress: bool = True,
) -> TrainedModel:
    """Train on this process (one device, or one rank of ``ctx``); see the module docstring for the steps.

    Only rank 0 reports (``log_metrics``, progress) and writes checkpoints; every rank returns its model
    (under FSDP only rank 0's is the full, gathered one).
    """
    import torch

    given = config
    config = rank_config(config, ctx) if ctx is not None else config
    main = ctx is None or ctx.is_main
    device = resolve_device(config.device)
    amp_dtype = autocast_dtype(config.precision, device)
    deferred = ctx is not None and config.strategy == "fsdp" and config.fsdp.meta_init
    model, prepared, weights = _build_prepared(config, device, amp_dtype, log_metrics if main else None,
                                               meta=deferred, builds_preset=main)
    if ctx is not None and ctx.rank:
        torch.manual_seed(config.seed + ctx.rank)  # own dropout / point sampling per rank
    cache = _feature_cache(model, config, train_samples, amp_dtype, ctx, weights if deferred else None)
    params_by_group, skeleton = prepared.params_by_group, None
    if ctx is not None and config.strategy == "fsdp":
        skeleton, params_by_group = _shard(model, prepared, ctx, weights)
    weights = None  # rank 0's CPU copy of a preset (meta init) is no longer needed
    if config.compile:
        if compile_uses_cudagraphs(config.compile, device) and config.pad_to_multiple is None:
            log.warning("training.compile %s without training.pad_to_multiple: a CUDA graph is recorded for every "
                        "prompt length the batches bring (set pad_to_multiple, e.g. 16)", config.compile)
        compile_llm_layers(model, prepared.layout, compile_mode(config.compile))
    phrases = trained_phrases(train_samples)
    loop = TrainingLoop(
        model, params_by_group, train_samples, config,
        make_batch=_batch_builder(model, config, cache, ctx, device),
        loss_fn=_loss_function(model, config, ctx),
        evaluate=_validator(val_samples, config, phrases, ctx),
        log_metrics=log_metrics if main else None, started_at=started_at, progress=progress and main,
        run_dir=run_dir, resuming=resuming, ctx=ctx,
    )
    result = loop.run()
    result.parameter_counts = prepared.counts
    if ctx is not None:
        result.peak_memory_gb = peak_memory_per_rank(ctx)
    elif device.startswith("cuda"):
        result.peak_memory_gb = [round(torch.cuda.max_memory_allocated(device) / 1e9, 3)]
    if ctx is not None and config.strategy == "fsdp":
        from sa2va_pipeline.training.fsdp import gather_full_model

        # the same plain model as DDP / one device (on the CPU) on rank 0; the others keep their shards
        model = gather_full_model(model, skeleton, ctx) or model
    model.eval()
    return TrainedModel(model=model, config=given, result=result, phrases=phrases)


def _build_prepared(config: TrainingConfig, device: str, amp_dtype: torch.dtype | None,
                    log_metrics: MetricsLogger | None, meta: bool = False,
                    builds_preset: bool = True) -> tuple[Sa2VA, PreparedModel, Any]:
    """Seed, build and prepare the model; bf16 frozen weights with fp32 trainable masters on GPU. With
    ``meta`` the parameters are on the meta device and the third value is the source of their weights
    (prepare.build_model_on_meta); otherwise it is None."""
    import torch

    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(config.seed)
    # bf16 training on GPU: frozen weights in bf16 (half the memory and bandwidth), trainable ones fp32.
    low_precision = amp_dtype if device.startswith("cuda") and amp_dtype is not None else None
    weights = None
    if meta:
        model, weights = build_model_on_meta(config.model, device, config.seed, low_precision, builds_preset)
    else:
        model = build_model(config.model, device, config.seed, dtype=low_precision)
    prepared = prepare_for_training(
        model, config.lora, config.trainable, added_token_ids(model), config.gradient_checkpointing
    )
    if low_precision is not None:
        trainable_to_fp32(model)
    log.info("Model source %s on %s, recipe %s%s", config.model.describe(), device, config.recipe,
             " (parameters on meta until sharded)" if meta else "")
    if log_metrics is not None:
        log_metrics({f"params_trainable.{c['group']}": float(c["trainable"]) for c in prepared.counts}, 0)
    return model, prepared, weights


def _shard(model: Sa2VA, prepared: PreparedModel, ctx: DistributedContext,
           weights: Any = None) -> tuple[Any, dict[str, Any]]:
    """FSDP2-shard the model; returns rank 0's skeleton and the (new, sharded) parameters per group. A model
    on meta (``weights`` given) is then filled shard by shard."""
    from sa2va_pipeline.training.fsdp import fsdp_shard, fsdp_shard_deferred, unsharded_skeleton
    from sa2va_pipeline.training.parameter_groups import named_parameters_by_group

    skeleton = unsharded_skeleton(model) if ctx.is_main else None
    if weights is None:
        units = fsdp_shard(model, ctx)
        log.info("FSDP: %d shard groups + the root", len(units))
    else:
        units, report = fsdp_shard_deferred(model, ctx, weights)
        log.info("FSDP: %d shard groups + the root; meta init: this rank holds %.3f GB of %.3f GB (+ at most "
                 "%.3f GB in flight while loading)", len(units), report.local_bytes / 1e9, report.model_bytes / 1e9,
                 report.largest_read_bytes / 1e9)
    # fully_shard replaced every parameter by a sharded one: the optimiser and the checks need the new ones
    # (and dropping the old ones frees their memory)
    prepared.params_by_group = {}
    return skeleton, named_parameters_by_group(model, prepared.layout)


def _batch_builder(model: Sa2VA, config: TrainingConfig, cache: Any, ctx: DistributedContext | None,
                   device: Any) -> Callable[[list[dict[str, Any]], random.Random], dict[str, Any]]:
    """``make_batch(samples, rng)``: this rank's share, collated with the prompt, object and padding settings
    (in page-locked memory when training on a CUDA device)."""
    import torch

    questions = None if config.prompt.questions == "official" else config.prompt.questions
    answers = None if config.prompt.answers == "official" else list(config.prompt.answers)
    pin = torch.device(device).type == "cuda"
    options: dict[str, Any] = {}
    if config.pad_to_multiple is not None:  # bucketed prompt lengths: shapes repeat (compiled / CUDA graphs)
        options["pad_to_multiple"] = int(config.pad_to_multiple)
    if config.max_objects_per_image is not None:
        if "max_objects" in inspect.signature(model.collate).parameters:
            options["max_objects"] = config.max_objects_per_image
        else:
            log.warning("This model's collate cannot cap objects per image: training.max_objects_per_image "
                        "has no effect (every object is trained)")

    def make_batch(samples: list[dict[str, Any]], rng: random.Random) -> dict[str, Any]:
        if ctx is not None:
            samples = shard(samples, ctx)
            if ctx.rank:  # other prompts than rank 0 (which draws as a single device would)
                rng = random.Random(rng.getrandbits(64) + ctx.rank)
        batch = model.collate(
            samples, rng=rng, answer=rng.choice(answers) if answers else None, questions=questions,
            skip_pixels=cache.parts if cache is not None else (),  # cached features replace those pixels
            **options,
        )
        if pin:  # built in the prefetch thread: the forward's copies to the GPU then never wait on it
            batch = {k: v.pin_memory() if torch.is_tensor(v) and v.device.type == "cpu" else v
                     for k, v in batch.items()}
        if cache is None:
            return batch
        kept = batch.get("sample_index", range(len(samples)))  # collate leaves object-less samples out
        return cache.attach(batch, [samples[i]["image"] for i in kept])

    return make_batch


def _loss_function(model: Sa2VA, config: TrainingConfig, ctx: DistributedContext | None) -> Callable:
    """``loss_fn(model, batch)``: ``training_forward`` with ``training.loss``, losses renamed for the logs;
    through DDP or with losses averaged over ranks under FSDP."""
    kwargs = config.loss.forward_kwargs()

    def loss_fn(m: Sa2VA, batch: dict[str, Any]) -> dict[str, Any]:
        out = m.training_forward(wait_for_features(batch), **kwargs)
        return {LOSS_NAMES.get(k, k): v for k, v in out.items()}

    if ctx is None:
        return loss_fn
    if config.strategy == "fsdp":
        return fsdp_loss_fn(loss_fn, ctx)
    return ddp_loss_fn(model, loss_fn, ctx)


def _validator(val_samples: Sequence[dict[str, Any]], config: TrainingConfig, phrases: list[str],
               ctx: DistributedContext | None) -> Callable | None:
    """``evaluate(model)``: per-phrase validation Dice over (a cap of) the val split; None without val."""
    val = list(val_samples)[: config.eval.max_samples] if config.eval.max_samples else list(val_samples)
    if not val:
        return None

    def evaluate(m: Sa2VA) -> dict[str, Any]:
        return validation_dice(m, val, config.eval.thresholds, config.eval.batch_size, phrases=phrases,
                               distributed=ctx)

    return evaluate


def _feature_cache(model: Sa2VA, config: TrainingConfig, train_samples: Sequence[dict[str, Any]],
                   amp_dtype: torch.dtype | None, ctx: DistributedContext | None, weights: Any = None) -> Any:
    """The filled feature cache of the frozen encoders (``training.feature_cache``), or None when it is off or
    both encoders train. With several ranks the first rank of each host fills it, the others wait, then read.
    A model on meta (``weights``: FSDP deferred init) has only the cached encoders made real meanwhile."""
    from sa2va_pipeline.training.feature_cache import FeatureCache, cacheable_parts, encoder_of, training_images

    settings = config.feature_cache
    if not settings.enabled:
        return None
    parts = cacheable_parts(config.trainable.vision_tower, config.trainable.sam2_image_encoder, model.family)
    if not parts:
        log.info("training.feature_cache is on but both encoders train: nothing to cache")
        return None
    encoders = contextlib.nullcontext()
    if weights is not None:
        from sa2va_pipeline.training.fsdp import parts_materialised

        prefixes = [name + "." for name, module in model.named_modules()
                    if any(module is encoder_of(model, part) for part in parts)]
        encoders = parts_materialised(model, prefixes, ctx, weights)
    with encoders:  # the key of the cache holds a fingerprint of the encoders' weights: every rank needs them
        cache = FeatureCache(settings.dir, model, parts, settings.dtype, compute_dtype=amp_dtype,
                             keep_in_memory=settings.keep_in_memory)
        if ctx is None or ctx.local_rank == 0:
            computed = cache.fill(training_images(train_samples), batch_size=max(1, config.eval.batch_size))
            log.info("Feature cache (%s, %s): %d images computed, the rest reused", "+".join(parts),
                     settings.dtype, computed)
        if ctx is not None:
            import torch.distributed as dist

            dist.barrier()
    cache.settle_memory(training_images(train_samples), processes=1 if ctx is None else ctx.world_size)
    return cache
