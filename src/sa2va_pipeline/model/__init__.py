"""Native Sa2VA model library: ``from sa2va_pipeline.model import Sa2VA``.

Modules: ``sa2va`` (the model), ``configs`` (official config <-> native configs, presets), ``conversion``
(checkpoint key table), ``checkpoint`` (load/save), ``preprocessing`` (images/masks), ``qwen_vl`` (Qwen-VL
family prompt and M-RoPE positions), ``prompts`` (questions,
answers, chat templates), ``tokenizer`` (the code-built tokenizer of the presets), ``losses``.
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
