"""Qwen-VL family pieces (Sa2VA-Qwen2_5-VL-3B/7B, Sa2VA-Qwen3-VL-4B): the image prompt and M-RoPE positions.

The model itself is transformers' ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration``
(vision tower with its merger, LLM, lm_head; Qwen3-VL's DeepStack runs inside its native forward). What is
ours: the training prompt layout and the 3-D rotary position ids. The positions are computed here rather
than with the model's ``get_rope_index`` because that method's signature changed across transformers 5.x
(5.23 takes ``mm_token_type_ids``); the values are tested against the installed model's own method.
"""

from __future__ import annotations

import torch

VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
IMAGE_PAD_TOKEN = "<|image_pad|>"
QWEN3_VL_MEAN = QWEN3_VL_STD = (0.5, 0.5, 0.5)


def qwen_vl_first_turn_input(question: str, n_image_tokens: int) -> str:
    """The first human turn of Sa2VA-Qwen training: ``<|vision_start|>`` + ``<|image_pad|>`` x N +
    ``<|vision_end|>`` + ``"\\n"`` + question (N = merged patches of the image)."""
    return VISION_START_TOKEN + IMAGE_PAD_TOKEN * n_image_tokens + VISION_END_TOKEN + "\n" + question


def image_token_count(image_grid_thw: torch.Tensor, merge_size: int) -> list[int]:
    """``<|image_pad|>`` tokens per image: t * h * w / merge_size**2 for each row of ``image_grid_thw``."""
    return [int(n) for n in (image_grid_thw.prod(-1) // merge_size**2).tolist()]


def mrope_position_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_grid_thw: torch.Tensor,
    image_token_id: int,
    merge_size: int,
) -> torch.Tensor:
    """3-D rotary positions [3, B, T] (temporal, height, width) of Qwen2.5-VL / Qwen3-VL for still images.

    Text tokens count up on all three axes; each run of image tokens takes the grid (t, h/m, w/m) offset by
    the position where it starts, and the text after it resumes at start + max(h, w) / m. Runs of image
    tokens take the rows of ``image_grid_thw`` in order (row-major over the batch). Padding positions
    (attention 0) get 0, as in transformers.
    """
    batch, length = input_ids.shape
    positions = torch.zeros(3, batch, length, dtype=torch.long, device=input_ids.device)
    grids = iter(image_grid_thw.tolist())
    for b in range(batch):
        valid = (
            attention_mask[b].bool()
            if attention_mask is not None
            else torch.ones_like(input_ids[b], dtype=torch.bool)
        )
        is_image = (input_ids[b][valid] == image_token_id).tolist()
        pieces, current, i = [], 0, 0
        while i < len(is_image):
            j = i
            while j < len(is_image) and is_image[j] == is_image[i]:
                j += 1
            if not is_image[i]:
                pieces.append(torch.arange(current, current + j - i).expand(3, -1))
                current += j - i
            else:
                try:
                    t, h, w = next(grids)
                except StopIteration:
                    raise ValueError(
                        "More runs of image tokens in the batch than rows of image_grid_thw"
                    ) from None
                gt, gh, gw = t, h // merge_size, w // merge_size
                if gt * gh * gw != j - i:
                    raise ValueError(
                        f"Row {b}: a run of {j - i} image tokens but image_grid_thw {[t, h, w]} gives {gt * gh * gw}"
                    )
                tt, hh, ww = torch.meshgrid(
                    torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij"
                )
                pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + current)
                current += max(gh, gw)
            i = j
        if pieces:
            positions[:, b, valid] = torch.cat(pieces, dim=1).to(positions.device)
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw has more rows than runs of image tokens in the batch")
    return positions
