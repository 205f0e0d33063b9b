"""Turn a freshly built Sa2VA model into one ready to train: LoRA on the LLM, trainable parts, counts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

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

    from sa2va_pipeline.training.config import LoraSettings, TrainableParts

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
        if not hasattr(llm, "gradient_checkpointing_enable"):
            raise ValueError("training.gradient_checkpointing is on but the LLM does not support it.")
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    counts = count_parameters(model, layout)
    log.info("Parameters per group:\n%s", format_counts(counts))
    return PreparedModel(
        model=model,
        layout=layout,
        params_by_group=named_parameters_by_group(model, layout),
        counts=[c.as_dict() for c in counts],
    )
