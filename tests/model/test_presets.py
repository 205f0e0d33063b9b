"""Presets: real shapes (on the meta device), deterministic tiny init, SAM2 sizes derived correctly."""

from __future__ import annotations

import pytest
import torch

from sa2va_pipeline.model.conversion import native_to_official, official_to_native


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("name", "hidden", "layers", "template"),
    [
        ("sa2va-1b", 896, 24, "qwen_chat"),
        ("sa2va-internvl3-2b", 1536, 28, "qwen_chat"),
        ("sa2va-4b", 2048, 36, "phi3_chat"),
    ],
)
def test_real_size_presets_have_released_shapes(name, hidden, layers, template):
    from sa2va_pipeline.model import Sa2VA

    model = Sa2VA.from_preset(name, device="meta")
    text = model.vlm.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (hidden, layers, 151679)
    assert model.config["template"] == template and model.template.suffix in ("<|im_end|>", "<|end|>")
    assert _count(model.vlm.model.vision_tower) == 304_012_288  # InternViT-300M
    assert (
        _count(model.vlm.model.multi_modal_projector)
        == 4096 * 2 + 4096 * hidden + hidden + hidden * hidden + hidden
    )
    assert _count(model.text_hidden_fcs) == hidden * hidden + hidden + hidden * 256 + 256
    assert _count(model.sam2.mask_decoder) == 4_215_109
    assert model.vlm.model.language_model.embed_tokens.weight.shape == (151679, hidden)
    assert model.vlm.lm_head.weight is not model.vlm.model.language_model.embed_tokens.weight
    backbone = model.sam2.config.vision_config.backbone_config
    assert backbone.blocks_per_stage == [2, 6, 36, 4] and backbone.global_attention_blocks == [23, 33, 43]
    assert model.sam2_image_size == 1024 and model.mask_size == 256
    assert [list(s) for s in model.sam2.config.vision_config.backbone_feature_sizes] == [
        [256, 256],
        [128, 128],
        [64, 64],
    ]
    assert model.sam2.prompt_encoder.image_embedding_size == (64, 64)
    tok = model.tokenizer
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<IMG_CONTEXT>", "[SEG]"]) == [
        151643,
        151644,
        151667,
        151674,
    ]


def test_conversion_table_covers_every_real_size_key():
    from sa2va_pipeline.model import Sa2VA

    native = Sa2VA.from_preset("sa2va-1b", device="meta").state_dict()
    official = native_to_official(native, {})
    assert all(
        k.startswith(
            ("vision_model.", "mlp1.", "language_model.", "grounding_encoder.sam2_model.", "text_hidden_fcs.")
        )
        for k in official
    )
    back, kept, unknown = official_to_native(official)
    assert not unknown and not kept
    assert set(back) == set(native)
    assert all(back[k].shape == native[k].shape for k in native)


def test_tiny_preset_is_deterministic_and_leaves_global_rng_alone():
    from sa2va_pipeline.model import Sa2VA

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = Sa2VA.from_preset("tiny")
    after = torch.rand(1)
    b = Sa2VA.from_preset("tiny")
    assert torch.equal(before, after)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = Sa2VA.from_preset("tiny", seed=1)
    assert not torch.equal(c.text_hidden_fcs[0].weight, a.text_hidden_fcs[0].weight)


@pytest.mark.parametrize("size", [256, 512])
def test_sam2_feature_sizes_follow_the_input_size(size, make_image):
    from sa2va_pipeline.model import Sa2VA

    model = Sa2VA.from_preset("tiny", sam2_image_size=size)
    assert model.config["grounding_encoder_config"]["image_size"] == size
    with torch.no_grad():
        features = model.encode_sam2(torch.zeros(1, 3, size, size))
    assert [tuple(f.shape[-2:]) for f in features] == [(size // 4,) * 2, (size // 8,) * 2, (size // 16,) * 2]
    assert [list(s) for s in model.sam2.config.vision_config.backbone_feature_sizes] == [
        [size // 4] * 2,
        [size // 8] * 2,
        [size // 16] * 2,
    ]
    assert model.sam2.prompt_encoder.image_embedding_size == (size // 16, size // 16)
    assert model.sam2.prompt_encoder.input_image_size == size
    probs = model.predict_proba(make_image(0, 300, 200), "vessel")
    assert probs.shape == (1, 300, 200)
    batch = model.collate([(make_image(0), make_image(1)[..., 0] > 100, "vessel")], seed=0)
    assert batch["gt_masks"].shape[-1] == size // 4
    with torch.no_grad():
        assert torch.isfinite(model.training_forward(batch)["total"])


def test_unknown_preset_and_override_are_errors():
    from sa2va_pipeline.model import Sa2VA

    with pytest.raises(ValueError, match="Unknown preset"):
        Sa2VA.from_preset("huge")
    with pytest.raises(TypeError, match="Unknown preset overrides"):
        Sa2VA.from_preset("tiny", sam2_imgsize=512)
    with pytest.raises(ValueError, match="multiple of 32"):
        Sa2VA.from_preset("tiny", sam2_image_size=500)
