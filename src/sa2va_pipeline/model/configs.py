"""Configurations: the official ``config.json`` of Sa2VA (InternVL family, with a Qwen2 or an InternLM2 LLM)
and the native configs built from it.

An official Sa2VA config has ``llm_config`` (a Qwen2 or InternLM2 config), ``vision_config`` (InternViT), ``template``,
``downsample_ratio``, ``force_image_size``, ... The SAM2 part is not in it: every released checkpoint uses
SAM2
Hiera-L at 1024. Checkpoints written from our presets add a ``grounding_encoder_config`` entry
(``image_size`` and the Hiera shape) that official loaders ignore.

Presets: ``tiny`` (CPU default, DESIGN section 7), ``tiny-internlm2`` (tests), and the real shapes
``sa2va-1b``, ``sa2va-internvl3-2b``, ``sa2va-4b``, ``sa2va-8b``, ``sa2va-26b`` (random weights, for
benchmarks; 26B shapes from InternVL2.5-26B, not checked against the released file).
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
    if key == "tiny":
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
        raise ValueError(f"Unknown preset {name!r}; known: {', '.join(PRESETS)}")
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
        cfg["llm_config"]["vocab_size"] = int(overrides.pop("vocab_size"))
    if overrides:
        raise TypeError(f"Unknown preset overrides: {sorted(overrides)}")
    return cfg


def llm_type(cfg: dict[str, Any]) -> str:
    """ "qwen2" or "internlm2" for an InternVL-family config (from ``llm_config.architectures``)."""
    arch = " ".join((cfg.get("llm_config") or {}).get("architectures") or []).lower()
    if "internlm2" in arch:
        return "internlm2"
    if "qwen2forcausallm" in arch:
        return "qwen2"
    return arch or "unknown"


def conversion_layout(cfg: dict[str, Any]):
    """The :class:`~.conversion.Layout` (key table) of an official config."""
    from .conversion import Layout

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
