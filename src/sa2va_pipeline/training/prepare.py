"""The model before the first step: built (preset or checkpoint), LoRA on the LLM, trainable parts set, counted.

The building blocks every process of a run uses in the same order (``worker.train_on_rank``)."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sa2va_pipeline.training.lora import build_lora_config, inject_lora
from sa2va_pipeline.training.parameter_groups import (
    ModelLayout,
    count_parameters,
    find_layout,
    format_counts,
    named_parameters_by_group,
    set_trainable_parts,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sa2va_pipeline.model.sa2va import Sa2VA
    from sa2va_pipeline.training.config import LoraSettings, ModelSource, TrainableParts

log = logging.getLogger(__name__)


@dataclass
class PreparedModel:
    """A model with LoRA injected and ``requires_grad`` set, plus what the trainer needs to know about it."""

    model: nn.Module
    layout: ModelLayout
    params_by_group: dict[str, list[tuple[str, torch.Tensor]]]
    counts: list[dict]


def prepare_for_training(
    model: nn.Module,
    lora: LoraSettings,
    trainable: TrainableParts,
    new_token_ids: list[int] | None = None,
    gradient_checkpointing: bool = False,
) -> PreparedModel:
    """Inject LoRA into the LLM (``model.vlm``), set which parts train and log the counts per group.

    ``new_token_ids`` (the ids of [SEG] and the other added tokens) are needed for
    ``trainable.embeddings: new_tokens``; other modes ignore them.
    """
    layout = find_layout(model)
    vlm = model.get_submodule(layout.vlm.rstrip("."))
    llm_prefix = layout.llm[len(layout.vlm):]
    token_ids = list(new_token_ids or []) if trainable.embeddings == "new_tokens" else None
    if trainable.embeddings == "new_tokens" and not token_ids:
        raise ValueError("training.trainable.embeddings is 'new_tokens' but the model reports no added token ids.")
    inject_lora(vlm, build_lora_config(vlm, lora, llm_prefix=llm_prefix, new_token_ids=token_ids))
    set_trainable_parts(model, layout, trainable)
    if gradient_checkpointing:
        llm = model.get_submodule(layout.llm.rstrip("."))
        if hasattr(llm, "activation_checkpointing_enable"):  # newer transformers: the old name warns
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(llm, "gradient_checkpointing_enable"):
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise ValueError("training.gradient_checkpointing is on but the LLM does not support it.")
    counts = count_parameters(model, layout)
    log.info("Parameters per group:\n%s", format_counts(counts))
    return PreparedModel(
        model=model,
        layout=layout,
        params_by_group=named_parameters_by_group(model, layout),
        counts=[c.as_dict() for c in counts],
    )


def build_model(source: ModelSource, device: str, seed: int, dtype: torch.dtype | None = None) -> Sa2VA:
    """The untrained model: an official checkpoint directory, or a preset with deterministic random weights.

    Weights are float32 unless ``dtype`` says otherwise (bf16 for bf16 training on GPU: the frozen weights stay
    bf16 and the trainable ones become fp32 masters, see :func:`trainable_to_fp32`).
    """
    import torch

    from sa2va_pipeline.model import Sa2VA

    dtype = torch.float32 if dtype is None else dtype
    if source.checkpoint:
        return Sa2VA.from_pretrained(source.checkpoint, device=device, dtype=dtype, mask_resolution=source.mask_resolution)
    if not source.preset:
        raise ValueError("Set training.model.preset (e.g. tiny) or training.model.checkpoint (a directory).")
    return Sa2VA.from_preset(
        source.preset, device=device, dtype=dtype, seed=seed, mask_resolution=source.mask_resolution,
        **dict(source.overrides),
    )


def build_model_on_meta(source: ModelSource, device: str, seed: int, dtype: torch.dtype | None,
                        builds_preset: bool) -> tuple[Sa2VA, Any]:
    """:func:`build_model` with the parameters on ``meta`` (buffers real, on ``device``), and the source of
    the weights that FSDP's deferred init fills the shards from (model/deferred_init.py): the checkpoint, or
    the preset built on the CPU of the process with ``builds_preset`` (rank 0; the others get None there)."""
    import torch

    from sa2va_pipeline.model.deferred_init import PresetTensors, checkpoint_on_meta, preset_on_meta

    dtype = torch.float32 if dtype is None else dtype
    if source.checkpoint:
        return checkpoint_on_meta(source.checkpoint, device, dtype, source.mask_resolution)
    if not source.preset:
        raise ValueError("Set training.model.preset (e.g. tiny) or training.model.checkpoint (a directory).")
    overrides = dict(source.overrides)
    model = preset_on_meta(source.preset, device, dtype, seed, source.mask_resolution, **overrides)
    weights = PresetTensors(source.preset, dtype, seed, source.mask_resolution, build=builds_preset, **overrides)
    return model, weights


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


def compile_llm_layers(model: Sa2VA, layout: Any, mode: str | None = None) -> int:
    """``torch.compile`` every LLM decoder layer in place (``training.compile``); returns how many.

    Per layer rather than the whole model: the layers share one code path, so one graph serves all of them,
    and the rest of the step (collate-shaped inputs, the mask decoder's point sampling) stays eager. Works
    with LoRA (peft's layers are traced into the graph), gradient checkpointing (transformers checkpoints the
    layer's forward around the compiled call) and DDP / FSDP (their hooks stay outside the graphs). Shapes
    change with each batch's longest prompt, so expect a recompile or two before dynamic shapes settle.

    ``mode``: ``torch.compile``'s (None: its default; ``config.compile_mode``). Under ``reduce-overhead`` each
    layer is replayed as a CUDA graph (cudagraph trees, one recording per input shape, so bucketed prompt
    lengths, ``training.pad_to_multiple``, keep the recordings few); a replay overwrites the previous replay's
    outputs, so the loop starts each step with ``torch.compiler.cudagraph_mark_step_begin()`` (trainer.py) and
    nothing may keep a layer's output across steps (the step keeps only losses and the gradients, and the
    gradients either live in the optimiser's flat buffers or are set to None before the next backward).
    """
    from torch import nn

    llm = model.get_submodule(layout.llm.rstrip("."))
    layers = getattr(llm, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"training.compile: no decoder layers found under {layout.llm}layers")
    for layer in layers:
        layer.compile(mode=mode)
    log.info("torch.compile (mode %s): %d LLM decoder layers (compiled on first use)", mode or "default",
             len(layers))
    return len(layers)
