"""Configurations: the official ``config.json`` of Sa2VA (InternVL family, with a Qwen2 or an InternLM2 LLM)
and the native configs built from it.

An official Sa2VA config has ``llm_config`` (a Qwen2 or InternLM2 config), ``vision_config`` (InternViT), ``template``,
``downsample_ratio``, ``force_image_size``, ... The SAM2 part is not in it: every released checkpoint uses
SAM2
Hiera-L at 1024. Checkpoints written from our presets add a ``grounding_encoder_config`` entry
(``image_size`` and the Hiera shape) that official loaders ignore.

Qwen-VL family configs (Sa2VA-Qwen2_5-VL / Qwen3-VL) are a Qwen2.5-VL / Qwen3-VL config with ``text_config``
and ``vision_config`` (see the section at the end of this module).

Presets: ``tiny`` (CPU default, DESIGN section 7), ``tiny-internlm2``, ``tiny-qwen2_5-vl``, ``tiny-qwen3-vl``
(tests), and the real shapes ``sa2va-1b``, ``sa2va-internvl3-2b``, ``sa2va-4b``, ``sa2va-8b``, ``sa2va-26b``,
``sa2va-qwen2_5-vl-3b``, ``sa2va-qwen3-vl-4b`` (random weights, for benchmarks; 26B shapes from
InternVL2.5-26B and the Qwen-VL shapes from the base Qwen2.5-VL-3B / Qwen3-VL-4B configs, not checked
against the released Sa2VA files).
"""

from __future__ import annotations

import copy
from typing import Any

# SAM2 Hiera-L, as in the released Sa2VA checkpoints (transformers' SAM2 large shapes).
HIERA_LARGE: dict[str, Any] = {
    "hidden_size": 144,
    "num_attention_heads": 2,
    "embed_dim_per_stage": [144, 288, 576, 1152],
    "num_attention_heads_per_stage": [2, 4, 8, 16],
    "blocks_per_stage": [2, 6, 36, 4],
    "global_attention_blocks": [23, 33, 43],
    "window_size_per_stage": [8, 4, 16, 8],
    "window_positional_embedding_background_size": [7, 7],
}
# Tiny Hiera of DESIGN section 7 (windows chosen to tile a 512 input: 128/64/32/16 feature maps).
HIERA_TINY: dict[str, Any] = {
    "hidden_size": 16,
    "num_attention_heads": 1,
    "embed_dim_per_stage": [16, 32, 64, 128],
    "num_attention_heads_per_stage": [1, 1, 2, 4],
    "blocks_per_stage": [1, 1, 2, 1],
    "global_attention_blocks": [3],
    "window_size_per_stage": [8, 4, 8, 4],
    "window_positional_embedding_background_size": [7, 7],
}
DEFAULT_GROUNDING = {"image_size": 1024, "hiera": HIERA_LARGE}

AUTO_MAP = {
    "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
    "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
    "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel",
}

INTERNVIT_300M: dict[str, Any] = {
    "architectures": ["InternVisionModel"],
    "model_type": "intern_vit_6b",
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "image_size": 448,
    "patch_size": 14,
    "num_channels": 3,
    "qkv_bias": True,
    "qk_normalization": False,
    "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "drop_path_rate": 0.0,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "use_flash_attn": True,
}


def _qwen2(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int
) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": layers,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def _internlm2(
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    rope_factor: float = 2.0,
) -> dict[str, Any]:
    """An official InternLM2 ``llm_config`` (InternLM2.5: dynamic NTK rope scaling, no biases)."""
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000,
        "rope_scaling": {"type": "dynamic", "factor": rope_factor},
        "bias": False,
        "attn_implementation": "eager",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


# InternViT-6B-448px-V2_5 (Sa2VA-26B): RMS norm, QK norm, no qkv bias.
INTERNVIT_6B: dict[str, Any] = dict(
    INTERNVIT_300M,
    hidden_size=3200,
    num_hidden_layers=45,
    num_attention_heads=25,
    intermediate_size=12800,
    qkv_bias=False,
    qk_normalization=True,
    norm_type="rms_norm",
)
INTERNLM2_REAL_VOCAB = 92558  # InternLM2.5 92544 + InternVL's 9 + Sa2VA's 5 added tokens
REAL_VOCAB = 151679  # Qwen2.5 151643 + 22 specials + InternVL's 9 + Sa2VA's 5 added tokens


def _official(llm: dict, vision: dict, template: str) -> dict[str, Any]:
    return {
        "architectures": ["Sa2VAChatModel"],
        "auto_map": dict(AUTO_MAP),
        "model_type": "sa2va_chat",
        "llm_config": llm,
        "vision_config": vision,
        "template": template,
        "downsample_ratio": 0.5,
        "force_image_size": 448,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "ps_version": "v2",
        "select_layer": -1,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


PRESETS = (
    "tiny",
    "tiny-internlm2",
    "sa2va-1b",
    "sa2va-internvl3-2b",
    "sa2va-4b",
    "sa2va-8b",
    "sa2va-26b",
)
TINY_VISION: dict[str, Any] = dict(
    INTERNVIT_300M, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256
)
HIERAS = {"large": HIERA_LARGE, "tiny": HIERA_TINY}


def _tiny(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg["grounding_encoder_config"] = {"image_size": 512, "hiera": copy.deepcopy(HIERA_TINY)}
    cfg["torch_dtype"] = cfg["llm_config"]["torch_dtype"] = "float32"
    return cfg


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """Official-format config of a preset (:data:`PRESETS`).

    Overrides: ``sam2_image_size`` (a multiple of 32), ``sam2_hiera`` ("large" = Hiera-L of the released
    checkpoints, which official loaders require; "tiny"), ``template``, ``vocab_size``. ``sam2_hiera="large"``
    alone also sets the image size to 1024, as in the released checkpoints.
    """
    key = name.lower().replace("_", "-")
    qwen = qwen_vl_preset_config(key)
    if qwen is not None:
        cfg = qwen
    elif key == "tiny":
        llm = _qwen2(128, 512, 2, 4, 2, vocab=0)  # vocab set from the code tokenizer
        llm.update(bos_token_id=None, eos_token_id=None)
        cfg = _tiny(_official(llm, dict(TINY_VISION), "qwen_chat"))
    elif key == "tiny-internlm2":
        cfg = _tiny(_official(_internlm2(128, 512, 2, 4, 2, vocab=0), dict(TINY_VISION), "internlm2_chat"))
    elif key == "sa2va-1b":
        cfg = _official(_qwen2(896, 4864, 24, 14, 2, REAL_VOCAB), dict(INTERNVIT_300M), "qwen_chat")
    elif key == "sa2va-internvl3-2b":
        cfg = _official(_qwen2(1536, 8960, 28, 12, 2, REAL_VOCAB), dict(INTERNVIT_300M), "qwen_chat")
    elif key == "sa2va-4b":
        cfg = _official(_qwen2(2048, 11008, 36, 16, 2, REAL_VOCAB), dict(INTERNVIT_300M), "phi3_chat")
    elif key == "sa2va-8b":  # InternVL2.5-8B: InternViT-300M + InternLM2.5-7B-chat
        llm = _internlm2(4096, 14336, 32, 32, 8, INTERNLM2_REAL_VOCAB)
        cfg = _official(llm, dict(INTERNVIT_300M), "internlm2_chat")
    elif key == "sa2va-26b":  # InternVL2.5-26B: InternViT-6B + InternLM2.5-20B-chat (shapes only)
        llm = _internlm2(6144, 16384, 48, 48, 8, INTERNLM2_REAL_VOCAB, rope_factor=3.0)
        cfg = _official(llm, dict(INTERNVIT_6B), "internlm2_chat")
    else:
        raise ValueError(f"Unknown preset {name!r}; known: {', '.join(PRESETS + QWEN_VL_PRESETS)}")
    hiera = overrides.pop("sam2_hiera", None)
    size = overrides.pop("sam2_image_size", None)
    if hiera is not None or size is not None:
        grounding = copy.deepcopy(cfg.get("grounding_encoder_config", DEFAULT_GROUNDING))
        if hiera is not None:
            if hiera not in HIERAS:
                raise ValueError(f"sam2_hiera must be one of {sorted(HIERAS)}, got {hiera!r}")
            grounding["hiera"] = copy.deepcopy(HIERAS[hiera])
            grounding["image_size"] = 1024 if hiera == "large" else grounding["image_size"]
        if size is not None:
            grounding["image_size"] = int(size)
        cfg["grounding_encoder_config"] = grounding
    if "template" in overrides:
        cfg["template"] = overrides.pop("template")
    if "vocab_size" in overrides:
        cfg["text_config" if "text_config" in cfg else "llm_config"]["vocab_size"] = int(
            overrides.pop("vocab_size")
        )
    if overrides:
        raise TypeError(f"Unknown preset overrides: {sorted(overrides)}")
    return cfg


def llm_type(cfg: dict[str, Any]) -> str:
    """ "qwen2" or "internlm2" for an InternVL-family config (from ``llm_config.architectures``); the
    Qwen-VL family gives its family name ("qwen2_5_vl" / "qwen3_vl")."""
    if model_family(cfg) != "internvl":
        return model_family(cfg)
    arch = " ".join((cfg.get("llm_config") or {}).get("architectures") or []).lower()
    if "internlm2" in arch:
        return "internlm2"
    if "qwen2forcausallm" in arch:
        return "qwen2"
    return arch or "unknown"


def conversion_layout(cfg: dict[str, Any]):
    """The :class:`~.conversion.Layout` (key table) of an official config."""
    from .conversion import Layout

    if model_family(cfg) != "internvl":
        return Layout(family="qwen_vl", llm=model_family(cfg))
    llm = cfg.get("llm_config") or {}
    return Layout(
        family="internvl",
        llm=llm_type(cfg),
        num_heads=int(llm.get("num_attention_heads", 0)),
        num_kv_heads=int(llm.get("num_key_value_heads") or llm.get("num_attention_heads", 0)),
    )


def grounding_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The SAM2 shape of an official config (Hiera-L at 1024 unless the config says otherwise)."""
    return copy.deepcopy(cfg.get("grounding_encoder_config") or DEFAULT_GROUNDING)


# training.model.mask_resolution: the factor on SAM2's input size (and so on the mask logits grid, a quarter of
# it). "high" doubles it: the tiny preset 512 -> 1024 (128 -> 256 logits), Hiera-L 1024 -> 2048 (256 -> 512).
# No SAM2 weight depends on the size (Hiera interpolates its positional embedding), so the same weights load
# in either mode; official loaders always run SAM2 at 1024 (issue 17, README "Thin vessels").
MASK_RESOLUTIONS: dict[str, int] = {"standard": 1, "high": 2}


def with_mask_resolution(cfg: dict[str, Any], mask_resolution: str = "standard") -> dict[str, Any]:
    """``cfg`` with SAM2's input size multiplied by the :data:`MASK_RESOLUTIONS` factor (a copy when it
    changes; written into ``grounding_encoder_config``, which official loaders ignore)."""
    if mask_resolution not in MASK_RESOLUTIONS:
        raise ValueError(f"mask_resolution must be one of {' | '.join(MASK_RESOLUTIONS)}, got {mask_resolution!r}")
    factor = MASK_RESOLUTIONS[mask_resolution]
    if factor == 1:
        return cfg
    grounding = grounding_config(cfg)
    grounding["image_size"] = int(grounding["image_size"]) * factor
    return {**cfg, "grounding_encoder_config": grounding}


def build_sam2_config(image_size: int, hiera: dict[str, Any]):
    """A transformers ``Sam2Config`` for a SAM2 input of ``image_size`` (a multiple of 32).

    The FPN feature sizes and the prompt encoder's image size are derived from ``image_size``: a mismatch
    would run silently with wrong shapes of the positional grid, so they are never set separately.
    """
    from transformers import Sam2Config
    from transformers.models.sam2.configuration_sam2 import (
        Sam2HieraDetConfig,
        Sam2MaskDecoderConfig,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    if image_size % 32 != 0:
        raise ValueError(f"SAM2 image size must be a multiple of 32, got {image_size}")
    hiera_cfg = Sam2HieraDetConfig(image_size=[image_size, image_size], **hiera)
    s = image_size
    vision = Sam2VisionConfig(
        backbone_config=hiera_cfg,
        backbone_channel_list=list(reversed(hiera["embed_dim_per_stage"])),
        backbone_feature_sizes=[[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
    )
    return Sam2Config(
        vision_config=vision,
        prompt_encoder_config=Sam2PromptEncoderConfig(image_size=s),
        mask_decoder_config=Sam2MaskDecoderConfig(),
    )


_QWEN2_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "attention_dropout",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
)


def build_text_config(llm_config: dict[str, Any]):
    """The native LLM config: Qwen2 as it is; InternLM2 as Llama (same maths, renamed weights).

    InternLM2's ``bias`` becomes Llama's ``attention_bias``/``mlp_bias``; its ``rope_scaling`` ({type: dynamic,
    factor}) is kept: transformers' dynamic NTK rope equals InternLM2's (it only changes beyond
    ``max_position_embeddings``).
    """
    from transformers import LlamaConfig, Qwen2Config

    arch = " ".join(llm_config.get("architectures") or []).lower()
    # deep copy: transformers edits rope_scaling in place, which would change the config we write back
    llm = {k: copy.deepcopy(llm_config[k]) for k in _QWEN2_KEYS if llm_config.get(k) is not None}
    if "internlm2" in arch:
        for key in ("use_sliding_window", "sliding_window", "max_window_layers"):
            llm.pop(key, None)
        bias = bool(llm_config.get("bias", False))
        return LlamaConfig(**llm, attention_bias=bias, mlp_bias=bias, tie_word_embeddings=False)
    return Qwen2Config(**llm, tie_word_embeddings=False)


def build_internvl_config(cfg: dict[str, Any], image_token_id: int, attn_implementation: str = "sdpa"):
    """A transformers ``InternVLConfig`` (vision tower + projector + Qwen2) from an official Sa2VA config.

    ``tie_word_embeddings=False`` is set at the top level: InternVL ties lm_head to embed_tokens otherwise,
    and every Sa2VA checkpoint is untied (DESIGN: tied-weights trap).
    """
    from transformers import InternVLConfig, InternVLVisionConfig

    v = cfg["vision_config"]
    image_size = cfg.get("force_image_size") or v["image_size"]
    vision = InternVLVisionConfig(
        hidden_size=v["hidden_size"],
        num_hidden_layers=v["num_hidden_layers"],
        num_attention_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"],
        image_size=image_size,
        patch_size=v["patch_size"],
        attention_bias=bool(v.get("qkv_bias", True)),
        use_qk_norm=bool(v.get("qk_normalization", False)),
        norm_type=v.get("norm_type", "layer_norm"),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6),
        hidden_act=v.get("hidden_act", "gelu"),
        use_mean_pooling=True,  # InternViT has no final norm: the native one must be the Identity
    )
    text = build_text_config(cfg["llm_config"])
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=int((image_size // v["patch_size"]) ** 2 * cfg.get("downsample_ratio", 0.5) ** 2),
        downsample_ratio=cfg.get("downsample_ratio", 0.5),
        projector_hidden_act="gelu",
        vision_feature_layer=cfg.get("select_layer", -1),
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    return config


# ---------------------------------------------------------------------------------------------------------
# Qwen-VL family (Sa2VA-Qwen2_5-VL-3B/7B, Sa2VA-Qwen3-VL-4B). The official config is a transformers
# Qwen2_5_VLConfig / Qwen3VLConfig (``text_config``, ``vision_config``, the vision token ids) with
# ``model_type`` "sa2va_chat" and ``template``; the weights are a whole ForConditionalGeneration under
# ``model.*``. Configs written from our presets add ``grounding_encoder_config`` and, for the tiny presets,
# ``min_pixels``/``max_pixels`` (official code: 512 / 2048 * 28 * 28, the defaults here); official loaders
# ignore both.
QWEN_VL_AUTO_MAP = {
    "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfigQwen",
    "AutoModel": "modeling_sa2va_qwen.Sa2VAChatModelQwen",
    "AutoModelForCausalLM": "modeling_sa2va_qwen.Sa2VAChatModelQwen",
}
QWEN_VL_VOCAB = 151936  # the padded embedding size of Qwen2.5-VL and Qwen3-VL
# Qwen's vision token ids (identical in Qwen2.5-VL and Qwen3-VL tokenizers).
QWEN_VL_TOKEN_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}


def _qwen_text(
    family: str,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    mrope_section: list[int],
    head_dim: int | None = None,
) -> dict[str, Any]:
    """``text_config`` of an official Qwen2.5-VL / Qwen3-VL config (transformers 4.57 layout)."""
    text: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 128000 if family == "qwen2_5_vl" else 262144,
        "rms_norm_eps": 1e-6,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
    }
    if family == "qwen2_5_vl":
        text.update(
            model_type="qwen2_5_vl_text",
            rope_theta=1000000.0,
            rope_scaling={"type": "mrope", "mrope_section": list(mrope_section)},
            use_sliding_window=False,
            sliding_window=32768,
            max_window_layers=layers,
        )
    else:
        text.update(
            model_type="qwen3_vl_text",
            head_dim=head_dim or hidden // heads,
            rope_theta=5000000.0,
            rope_scaling={
                "rope_type": "default",
                "mrope_section": list(mrope_section),
                "mrope_interleaved": True,
            },
            attention_bias=False,
        )
    return text


def _qwen_vision(family: str, depth: int, hidden: int, intermediate: int, heads: int, out_hidden: int,
                 **extra: Any) -> dict[str, Any]:  # fmt: skip
    """``vision_config`` of an official Qwen2.5-VL / Qwen3-VL config."""
    vision: dict[str, Any] = {
        "model_type": family,
        "depth": depth,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_heads": heads,
        "out_hidden_size": out_hidden,
        "in_channels": 3,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if family == "qwen2_5_vl":
        vision.update(patch_size=14, hidden_act="silu", window_size=112, tokens_per_second=2)
    else:
        vision.update(patch_size=16, hidden_act="gelu_pytorch_tanh")
    vision.update(extra)
    return vision


def _qwen_official(text: dict[str, Any], vision: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": ["Sa2VAChatModelQwen"],
        "auto_map": dict(QWEN_VL_AUTO_MAP),
        "model_type": "sa2va_chat",
        "template": "qwen_chat",
        "text_config": text,
        "vision_config": vision,
        **QWEN_VL_TOKEN_IDS,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


QWEN_VL_PRESETS = ("tiny-qwen2_5-vl", "tiny-qwen3-vl", "sa2va-qwen2_5-vl-3b", "sa2va-qwen3-vl-4b")


def qwen_vl_preset_config(key: str) -> dict[str, Any] | None:
    """Official-format config of a Qwen-VL preset (``key`` lower-case with "-"), or None if not one."""
    if key == "tiny-qwen2-5-vl":
        text = _qwen_text("qwen2_5_vl", 64, 128, 2, 4, 2, 0, [2, 3, 3])
        vision = _qwen_vision("qwen2_5_vl", 2, 32, 64, 2, 64, fullatt_block_indexes=[1])
    elif key == "tiny-qwen3-vl":
        text = _qwen_text("qwen3_vl", 64, 128, 2, 4, 2, 0, [4, 2, 2], head_dim=16)
        vision = _qwen_vision("qwen3_vl", 3, 32, 64, 2, 64, num_position_embeddings=64,
                              deepstack_visual_indexes=[0, 1])  # fmt: skip
    elif key == "sa2va-qwen2-5-vl-3b":  # Qwen2.5-VL-3B-Instruct shapes
        text = _qwen_text("qwen2_5_vl", 2048, 11008, 36, 16, 2, QWEN_VL_VOCAB, [16, 24, 24])
        vision = _qwen_vision("qwen2_5_vl", 32, 1280, 3420, 16, 2048, fullatt_block_indexes=[7, 15, 23, 31])
    elif key == "sa2va-qwen3-vl-4b":  # Qwen3-VL-4B-Instruct shapes
        text = _qwen_text("qwen3_vl", 2560, 9728, 36, 32, 8, QWEN_VL_VOCAB, [24, 20, 20], head_dim=128)
        vision = _qwen_vision("qwen3_vl", 24, 1024, 4096, 16, 2560, num_position_embeddings=2304,
                              deepstack_visual_indexes=[5, 11, 17])  # fmt: skip
    else:
        return None
    cfg = _qwen_official(text, vision)
    if key.startswith("tiny"):
        cfg = _tiny_qwen(cfg)
    return cfg


def _tiny_qwen(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg["grounding_encoder_config"] = {"image_size": 512, "hiera": copy.deepcopy(HIERA_TINY)}
    cfg["torch_dtype"] = "float32"
    cfg["text_config"].update(bos_token_id=None, eos_token_id=None)  # the code tokenizer has fewer ids
    # fewer vision tokens on CPU: a 512x512 image becomes 448x448 = 256 merged tokens (official: 324)
    cfg["min_pixels"], cfg["max_pixels"] = 32 * 28 * 28, 256 * 28 * 28
    return cfg


def model_family(cfg: dict[str, Any]) -> str:
    """ "internvl", "qwen2_5_vl" or "qwen3_vl" of an official Sa2VA config."""
    vision = cfg.get("vision_config") or {}
    text = cfg.get("text_config") or {}
    kinds = f"{vision.get('model_type', '')} {text.get('model_type', '')}".lower()
    arch = " ".join(cfg.get("architectures") or []).lower()
    if "qwen3_vl" in kinds or "deepstack_visual_indexes" in vision:
        return "qwen3_vl"
    if "qwen2_5_vl" in kinds or "qwen" in arch and "text_config" in cfg:
        return "qwen2_5_vl"
    return "internvl"


def build_qwen_vl_config(cfg: dict[str, Any], attn_implementation: str = "sdpa"):
    """A transformers ``Qwen2_5_VLConfig`` / ``Qwen3VLConfig`` from an official Sa2VA-Qwen config.

    ``tie_word_embeddings=False`` at both levels: Sa2VA checkpoints ship their own ``lm_head``.
    """
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    family = model_family(cfg)
    # deep copies: transformers edits rope dicts in place, which would change the config we write back
    text = copy.deepcopy(cfg["text_config"])
    vision = copy.deepcopy(cfg["vision_config"])
    for sub in (text, vision):
        sub.pop("model_type", None)
        sub.pop("architectures", None)
    text["tie_word_embeddings"] = False
    ids = {k: cfg[k] for k in QWEN_VL_TOKEN_IDS if cfg.get(k) is not None}
    cls = Qwen3VLConfig if family == "qwen3_vl" else Qwen2_5_VLConfig
    config = cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    return config
