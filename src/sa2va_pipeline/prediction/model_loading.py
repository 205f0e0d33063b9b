"""The trained model ready to predict (device, dtype, compile) and the phrases it was trained on."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# prediction.compile: false, true (torch.compile's default mode) or one of these modes; "reduce-overhead"
# replays each chunk's kernels as CUDA graphs (GPU), so the host thread launches far less
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def compile_mode(value: Any) -> str | None:
    """The ``prediction.compile`` setting as a ``torch.compile`` mode ("default" for true), or None (false)."""
    from sa2va_pipeline.errors import UserError

    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if value not in COMPILE_MODES:
        raise UserError(f"prediction.compile must be true, false or one of {list(COMPILE_MODES)}; got {value!r}.")
    return value


def load_prediction_model(model_dir: str | os.PathLike, prediction: dict[str, Any]) -> Any:
    """The trained model ready to predict, as the ``prediction`` parameters say: ``device``, ``dtype``, ``fp8``
    (fp8 matmuls in the chosen parts, Hopper/Ada GPUs: :mod:`sa2va_pipeline.model.fp8`; off by default) and
    ``compile`` (``torch.compile`` the encoders and LLM layers: worth it on a GPU for hundreds of images; a mode
    among :data:`COMPILE_MODES`, true for the default one)."""
    from sa2va_pipeline.devices import resolve_device, resolve_dtype
    from sa2va_pipeline.model.fp8 import fp8_parts_setting, quantize_linears_fp8, require_fp8_support
    from sa2va_pipeline.training.artifacts import load_trained_model

    fp8 = fp8_parts_setting(prediction.get("fp8", False))  # bad settings fail before the model loads
    mode = compile_mode(prediction.get("compile", False))
    device = resolve_device(prediction.get("device", "auto"))
    if fp8:
        require_fp8_support(device)
    model = load_trained_model(model_dir, device, resolve_dtype(prediction.get("dtype", "auto"), device))
    logger.info("Prediction model on %s%s%s", device, f", fp8 in {', '.join(fp8)}" if fp8 else "",
                f", compiled ({mode})" if mode else "")
    if fp8:  # before compiling: the compiled graphs then hold the fp8 layers
        quantize_linears_fp8(model, fp8)
    if mode:
        model.compile_for_inference(mode=None if mode == "default" else mode)
    return model


def model_phrases(model_dir: str | os.PathLike) -> list[str] | None:
    """The phrases a trained-model folder says it was trained on, or ``None`` when it does not say.

    Read from ``model_source.json``: a top-level ``phrases`` list, else ``training_config.phrases``. Folders
    written by the single-phrase version record neither (the caller falls back to the ``phrase`` parameter).
    """
    file = Path(model_dir) / "model_source.json"
    if not file.is_file():
        return None
    try:
        source = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    for phrases in (source.get("phrases"), (source.get("training_config") or {}).get("phrases")):
        if isinstance(phrases, list) and phrases and all(isinstance(p, str) for p in phrases):
            return list(phrases)
    return None
