"""The lean SAM2 image encoder (attention, FPN neck) gives transformers' outputs exactly, with the same
parameters."""

from __future__ import annotations

import pytest
import torch
from transformers.models.sam2 import modeling_sam2 as hf_sam2

from sa2va_pipeline.model.sam2_attention import LeanSam2MultiScaleAttention, NoPositionEncoding


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_lean_attention_equals_transformers(attn_implementation):
    from sa2va_pipeline.model import Sa2VA

    model = Sa2VA.from_preset("tiny", sam2_image_size=256, seed=1)
    encoder = model.sam2.vision_encoder
    encoder.config._attn_implementation = attn_implementation
    for module in encoder.modules():
        if isinstance(module, hf_sam2.Sam2MultiScaleAttention):
            module.config._attn_implementation = attn_implementation
    lean = [m for m in encoder.modules() if type(m) is LeanSam2MultiScaleAttention]
    assert len(lean) >= 2 and any(m.query_stride for m in lean)  # windowed, global and pooling blocks
    keys = list(model.state_dict())
    pixels = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = [t.clone() for t in encoder(pixels).fpn_hidden_states]
        for module in lean:
            module.__class__ = hf_sam2.Sam2MultiScaleAttention
        theirs = encoder(pixels).fpn_hidden_states
    assert list(model.state_dict()) == keys
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_the_unused_fpn_position_encoding_is_not_computed_and_changes_nothing():
    from sa2va_pipeline.model import Sa2VA

    model = Sa2VA.from_preset("tiny", sam2_image_size=256, seed=2)
    encoder = model.sam2.vision_encoder
    assert type(encoder.neck.position_encoding) is NoPositionEncoding
    keys = list(model.state_dict())
    pixels = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = encoder(pixels)
        encoder.neck.position_encoding = hf_sam2.Sam2SinePositionEmbedding(
            num_position_features=encoder.config.fpn_hidden_size // 2, normalize=True)
        theirs = encoder(pixels)
    assert list(model.state_dict()) == keys  # no parameter or buffer either way
    assert all(p.numel() == 0 for p in ours.fpn_position_encoding)
    assert all(p.numel() > 0 for p in theirs.fpn_position_encoding)
    for a, b in zip(ours.fpn_hidden_states, theirs.fpn_hidden_states, strict=True):
        assert torch.equal(a, b)
