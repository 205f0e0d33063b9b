"""Names the parts of a Sa2VA model, decides which of them train, and counts their parameters.

Groups (by parameter name, after LoRA injection):
    lora                LoRA A/B matrices on the LLM body
    embeddings          embed_tokens + lm_head (full rows, or only the added-token rows via peft)
    projector           vision -> LLM projector (official ``mlp1``)
    vision_tower        InternViT
    llm_base            the LLM body's own weights (always frozen: LoRA trains instead)
    text_hidden_fcs     [SEG] hidden state -> 256-d SAM2 prompt
    mask_decoder        SAM2 mask decoder, including conv_s0 / conv_s1
    sam2_image_encoder  SAM2 Hiera trunk + FPN neck
    sam2_other          SAM2 prompt encoder, no-memory embedding, memory modules (never trained)
    other               anything else
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sa2va_pipeline.training.config import TrainableParts

GROUP_ORDER = [
    "lora",
    "embeddings",
    "projector",
    "vision_tower",
    "llm_base",
    "text_hidden_fcs",
    "mask_decoder",
    "sam2_image_encoder",
    "sam2_other",
    "other",
]


@dataclass(frozen=True)
class ModelLayout:
    """Dotted prefixes (with trailing '.') of the model's parts, as found in ``named_parameters``."""

    vlm: str  # the InternVL-style VLM holding vision tower, projector, LLM and lm_head
    llm: str  # the LLM body (Qwen2Model / LlamaModel)
    embed_tokens: str
    lm_head: str
    projector: str
    vision_tower: str
    sam2: str
    mask_decoder: str
    sam2_image_encoder: str
    text_hidden_fcs: str


def find_layout(model: nn.Module) -> ModelLayout:
    """Locate the parts of a native Sa2VA model (``model.vlm`` = transformers InternVL or Qwen-VL, SAM2,
    text_hidden_fcs)."""
    names = {name for name, _ in model.named_modules()}

    def first(*candidates: str) -> str:
        for candidate in candidates:
            if candidate in names:
                return candidate + "."
        raise ValueError(
            f"Cannot find any of {candidates} in the model; the training code expects the native Sa2VA layout "
            "(sa2va_pipeline.model.Sa2VA)."
        )

    sam2 = first("sam2", "grounding_encoder", "grounding_encoder.sam2_model", "sam")
    return ModelLayout(
        vlm="vlm.",
        llm=first("vlm.model.language_model"),
        embed_tokens=first("vlm.model.language_model.embed_tokens"),
        lm_head=first("vlm.lm_head"),
        # InternVL: mlp1 / InternViT; Qwen-VL: the merger inside the vision tower / the tower (projector wins:
        # group_of checks it first)
        projector=first("vlm.model.multi_modal_projector", "vlm.model.visual.merger"),
        vision_tower=first("vlm.model.vision_tower", "vlm.model.visual"),
        sam2=sam2,
        mask_decoder=first(sam2 + "mask_decoder"),
        sam2_image_encoder=first(sam2 + "vision_encoder"),
        text_hidden_fcs=first("text_hidden_fcs"),
    )


def group_of(name: str, layout: ModelLayout) -> str:
    """The group a parameter name belongs to."""
    if ".lora_" in name:
        return "lora"
    if name.startswith(layout.embed_tokens) or name.startswith(layout.lm_head):
        return "embeddings"
    for group in ("projector", "vision_tower", "text_hidden_fcs", "mask_decoder", "sam2_image_encoder"):
        if name.startswith(getattr(layout, group)):
            return group
    if name.startswith(layout.llm):
        return "llm_base"
    if name.startswith(layout.sam2):
        return "sam2_other"
    return "other"


def named_parameters_by_group(model: nn.Module, layout: ModelLayout) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Every parameter of the model, grouped (groups in GROUP_ORDER, empty groups left out)."""
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, param in model.named_parameters():
        groups.setdefault(group_of(name, layout), []).append((name, param))
    return {g: groups[g] for g in GROUP_ORDER if g in groups}


def set_trainable_parts(model: nn.Module, layout: ModelLayout, parts: TrainableParts) -> None:
    """Set ``requires_grad`` per group: LoRA always trains, the LLM base never, the rest per ``parts``.

    With ``embeddings: new_tokens`` the rows train through peft's trainable-token deltas (part of the
    ``embeddings`` group, named ``trainable_tokens_delta``) while the full matrices stay frozen.
    """
    wanted = {
        "lora": True,
        "llm_base": False,
        "projector": parts.projector,
        "vision_tower": parts.vision_tower,
        "text_hidden_fcs": parts.text_hidden_fcs,
        "mask_decoder": parts.mask_decoder,
        "sam2_image_encoder": parts.sam2_image_encoder,
        "sam2_other": False,
        "other": False,
    }
    for group, params in named_parameters_by_group(model, layout).items():
        for name, param in params:
            if group == "embeddings":
                is_delta = "trainable_tokens_delta" in name
                if parts.embeddings == "full":
                    param.requires_grad_(not is_delta)
                elif parts.embeddings == "new_tokens":
                    param.requires_grad_(is_delta)
                else:
                    param.requires_grad_(False)
            else:
                param.requires_grad_(wanted[group])


@dataclass
class GroupCount:
    """Parameter counts of one group."""

    group: str
    trainable: int
    frozen: int

    def as_dict(self) -> dict[str, int | str]:
        """Plain dict for logging."""
        return dataclasses.asdict(self)


def count_parameters(model: nn.Module, layout: ModelLayout) -> list[GroupCount]:
    """Trainable / frozen parameter counts per group."""
    out = []
    for group, params in named_parameters_by_group(model, layout).items():
        trainable = sum(p.numel() for _, p in params if p.requires_grad)
        frozen = sum(p.numel() for _, p in params if not p.requires_grad)
        out.append(GroupCount(group, trainable, frozen))
    return out


def format_counts(counts: list[GroupCount]) -> str:
    """A small table for the log."""
    lines = [f"{'group':<20}{'trainable':>14}{'frozen':>14}"]
    for c in counts:
        lines.append(f"{c.group:<20}{c.trainable:>14,}{c.frozen:>14,}")
    lines.append(f"{'total':<20}{sum(c.trainable for c in counts):>14,}{sum(c.frozen for c in counts):>14,}")
    return "\n".join(lines)
