"""Native Sa2VA model library: ``from sa2va_pipeline.model import Sa2VA``.

Modules, one concept each:
- ``sa2va``: the model: assembly (from_preset / build / from_pretrained / save_pretrained), encoders, the
  [SEG] -> mask decoder path, ``training_forward``, and the public prediction calls;
- ``families``: one small adapter per model family (InternVL with Qwen2/InternLM2; Qwen2.5-VL/Qwen3-VL): image
  preprocessing and prompt text, vision features, LLM hidden states, the [SEG] source;
- ``processing``: samples -> token rows and training batches (multi-turn prompts, tiling, collate);
- ``streaming``: the streaming prediction pipeline (thread pool, pinned uploads, async copies back);
- ``losses``: the recipe's mask and LM losses; ``configs``: official config <-> native configs, presets;
  ``conversion``: checkpoint key tables per part; ``checkpoint``: strict, safe load/save;
  ``deferred_init``: the model with its parameters on ``meta`` and the checkpoint / preset tensors that fill
  FSDP's shards one at a time;
  ``preprocessing``: images/masks; ``qwen_vl``: Qwen-VL prompt and M-RoPE positions; ``prompts``: questions,
  answers, chat templates; ``tokenizer``: the presets' code-built tokenizer; ``sam2_attention``; ``module_utils``.
torch/transformers are imported when ``Sa2VA`` is first used, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Sa2VA"]


def __getattr__(name: str) -> Any:
    if name == "Sa2VA":
        from .sa2va import Sa2VA

        return Sa2VA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
