"""The image encoders' MLPs with bias and GELU in the up-projection's matmul: the same parameters, the same
outputs (on the CPU torch's fused op computes the exact GELU), and only the MLPs whose forward is
``fc2(gelu(fc1(x)))``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sa2va_pipeline.model.fused_gelu import FusedGeluMLP, fuse_gelu_mlps, mlp_layout


def fused(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, FusedGeluMLP)]


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3-vl"])
def test_fused_mlps_give_the_same_features_with_the_same_parameters(preset):
    from sa2va_pipeline.model import Sa2VA

    model = Sa2VA.from_preset(preset, sam2_image_size=256, seed=3).eval()
    keys = list(model.state_dict())
    sam2 = model.sam2.vision_encoder
    pixels = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    tower_mlps = [m for m in model.vlm.model.modules() if mlp_layout(m)]  # the vision tower's blocks
    fc1 = getattr(tower_mlps[0], mlp_layout(tower_mlps[0])[0])
    probe = torch.randn(5, fc1.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = [t.clone() for t in sam2(pixels).fpn_hidden_states]
        tower_before = tower_mlps[0](probe)
        assert fuse_gelu_mlps(sam2) == sum(sam2.config.backbone_config.blocks_per_stage)  # one per block
        assert fuse_gelu_mlps(model.vlm.model) == len(tower_mlps) > 0
        after = sam2(pixels).fpn_hidden_states
        tower_after = tower_mlps[0](probe)
    assert list(model.state_dict()) == keys
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tower_before, tower_after, rtol=1e-5, atol=1e-5)
    assert not fused(model.sam2.mask_decoder)  # ReLU MLPs, and the IoU head's three layers
    assert not [m for m in fused(model.vlm.model) if "Merger" in type(m).__name__]  # norm before fc1
    assert not fused(model.language_model)  # gated MLPs
    assert fuse_gelu_mlps(model) == 0  # a second call changes nothing


def test_an_fp8_or_biasless_up_projection_keeps_its_mlp():
    from transformers.models.sam2.modeling_sam2 import Sam2FeedForward

    class Fp8Like(nn.Linear):
        pass

    plain = Sam2FeedForward(8, 32, 8, num_layers=2, activation="gelu")
    quantised = Sam2FeedForward(8, 32, 8, num_layers=2, activation="gelu")
    quantised.proj_in = Fp8Like(8, 32)
    biasless = Sam2FeedForward(8, 32, 8, num_layers=2, activation="gelu")
    biasless.proj_in = nn.Linear(8, 32, bias=False)
    relu = Sam2FeedForward(8, 32, 8, num_layers=2, activation="relu")
    assert fuse_gelu_mlps(nn.ModuleList([plain, quantised, biasless, relu])) == 1
    assert isinstance(plain, FusedGeluMLP) and isinstance(plain, Sam2FeedForward)


def test_a_fused_mlp_still_gives_gradients():
    from transformers.models.sam2.modeling_sam2 import Sam2FeedForward

    torch.manual_seed(0)
    mlp = Sam2FeedForward(8, 32, 8, num_layers=2, activation="gelu")
    x = torch.randn(3, 5, 8, requires_grad=True)
    mlp(x).square().sum().backward()
    expected = (x.grad.clone(), mlp.proj_in.weight.grad.clone())
    x.grad, mlp.proj_in.weight.grad = None, None
    assert fuse_gelu_mlps(mlp) == 1  # the fused op has no backward: where grads are wanted, the plain path
    mlp(x).square().sum().backward()
    torch.testing.assert_close((x.grad, mlp.proj_in.weight.grad), expected)


def test_compile_for_inference_fuses_unless_told_not_to(monkeypatch):
    from sa2va_pipeline.model import Sa2VA

    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: None)  # no Inductor on the CPU here
    model = Sa2VA.from_preset("tiny", sam2_image_size=256, seed=4).eval()
    assert not fused(model.compile_for_inference(fused_gelu=False))
    assert not model.inference_cudagraphs
    assert fused(model.compile_for_inference(mode="reduce-overhead"))
    assert model.inference_cudagraphs
