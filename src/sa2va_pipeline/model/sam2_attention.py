"""The SAM2 image encoder without transformers' dead code: two pieces of work whose results nobody reads.

1. transformers' ``Sam2MultiScaleAttention.forward`` (5.x) computes ``softmax(q @ k^T)`` over the heads of
   every token and never reads the result: at batch 32 on an H200 that unused batched matmul, its fp32 softmax
   and the cast back took ~7% of the SAM2 image encoder's GPU time (``aten::bmm`` in
   ``benchmarks/profiles/predict_sa2va-internvl3-2b_b32.txt``). :class:`LeanSam2MultiScaleAttention` is the
   same module (same parameters, same state dict keys) whose forward leaves that out; the attention itself is
   unchanged (windowed or global, query pooling at stage changes, the configured attention implementation).
2. The FPN neck builds a sine position encoding for every level and every image of the batch
   (``fpn_position_encoding``, [B, 256, S/4, S/4] at the finest level). Sa2VA's mask decoder takes the prompt
   encoder's image-wide positional grid instead (``Sa2VA.decode_masks``), so the encoding is never read; at
   batch 32 on an H200 it was 0.25 ms per image (one fused kernel of
   ``benchmarks/profiles/predict_sa2va-internvl3-2b_b32_compiled.txt``). :class:`NoPositionEncoding` stands in
   for it and gives empty tensors.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.sam2 import modeling_sam2 as hf_sam2


class LeanSam2MultiScaleAttention(hf_sam2.Sam2MultiScaleAttention):
    """``Sam2MultiScaleAttention`` with the same output, minus the unused per-token head-by-head softmax."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        batch, height, width, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, height * width, 3, self.num_attention_heads, -1)
        query, key, value = torch.unbind(qkv, 2)
        if self.query_stride:  # Q pooling at a stage change
            query = hf_sam2.do_pool(query.reshape(batch, height, width, -1), self.query_stride)
            height, width = query.shape[1:3]
            query = query.reshape(batch, height * width, self.num_attention_heads, -1)
        name = self.config._attn_implementation
        attention = (
            hf_sam2.ALL_ATTENTION_FUNCTIONS[name]
            if name not in (None, "eager") and name in hf_sam2.ALL_ATTENTION_FUNCTIONS
            else hf_sam2.eager_attention_forward
        )
        out, _ = attention(
            self,
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            attention_mask=None,
            is_causal=False,
            scaling=self.scale,
            **kwargs,
        )
        return self.proj(out.reshape(batch, height, width, -1))


def use_lean_attention(module: nn.Module) -> int:
    """Switch every ``Sam2MultiScaleAttention`` under ``module`` to the lean forward; returns how many.

    Only the class changes (no new parameters), so checkpoints load and save exactly as before.
    """
    count = 0
    for sub in module.modules():
        if type(sub) is hf_sam2.Sam2MultiScaleAttention:
            sub.__class__ = LeanSam2MultiScaleAttention
            count += 1
    return count


class NoPositionEncoding(nn.Module):
    """Stands in for the FPN neck's ``Sam2SinePositionEmbedding`` (no parameters either): an empty tensor per
    level, since Sa2VA never reads ``fpn_position_encoding`` (module docstring)."""

    def forward(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(0, device=device, dtype=dtype)


def drop_unused_position_encoding(vision_encoder: nn.Module) -> None:
    """Replace the FPN neck's position encoding of a SAM2 vision encoder by :class:`NoPositionEncoding`."""
    neck = vision_encoder.neck
    if not isinstance(neck.position_encoding, hf_sam2.Sam2SinePositionEmbedding):
        raise TypeError(f"unexpected SAM2 neck position encoding {type(neck.position_encoding).__name__}")
    neck.position_encoding = NoPositionEncoding()
