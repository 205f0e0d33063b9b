"""The trained-model folder: what training writes and how the fine-tuned model is rebuilt from it.

Layout of one folder (one version of the ``trained_model`` catalog entry)::

    adapter_config.json          peft LoRA config (keys relative to ``model.vlm``, the InternVL model)
    adapter_model.safetensors    peft LoRA weights (and trainable-token deltas with embeddings: new_tokens)
    trained_weights.safetensors  every other trained tensor (embeddings, projector, mask decoder,
                                 text_hidden_fcs, ...), by its name in the model
    base_weights.safetensors     presets only: the frozen random weights (a random base cannot be rebuilt
                                 elsewhere: GPU and CPU draw different numbers); checkpoints are referenced
    model_source.json            where the base comes from (preset + overrides + seed, or checkpoint path),
                                 the trained phrases, which files hold what, and the resolved training
                                 configuration
    training_summary.json        losses per step, validations, parameter counts, gradient-reach report
    merged/                      with training.export_merged: the official Sa2VA layout (save_pretrained)

:func:`load_trained_model` rebuilds the base, injects and loads the adapter, loads the trained tensors,
then merges LoRA into the weights, so callers get a plain ``Sa2VA``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from sa2va_pipeline.model.sa2va import Sa2VA
    from sa2va_pipeline.training.config import TrainingConfig
    from sa2va_pipeline.training.trainer import TrainResult

FORMAT = "sa2va-pipeline/trained-model"
FORMAT_VERSION = 1
SOURCE_FILE = "model_source.json"
SUMMARY_FILE = "training_summary.json"
TRAINED_WEIGHTS = "trained_weights.safetensors"
BASE_WEIGHTS = "base_weights.safetensors"
MERGED_DIR = "merged"


@dataclass
class TrainedModel:
    """A fine-tuned model in memory (LoRA still injected) with how it was made."""

    model: Sa2VA
    config: TrainingConfig
    result: TrainResult
    phrases: list[str] = field(default_factory=list)  # the trained phrases, in order of first appearance

    def summary(self) -> dict[str, Any]:
        """JSON-able training summary (history, validations, counts, gradient report)."""
        return self.result.as_dict()


def _is_adapter_tensor(name: str) -> bool:
    return ".lora_" in name or "trainable_tokens_delta" in name


def save_trained_model(trained: TrainedModel, directory: str | Path) -> Path:
    """Write the folder described in the module docstring; returns it."""
    from safetensors.torch import save_file

    from sa2va_pipeline.training.lora import save_adapter

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model, config = trained.model, trained.config
    save_adapter(model.vlm, directory)

    trained_tensors = {
        name: p.detach().cpu().contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad and not _is_adapter_tensor(name)
    }
    save_file(trained_tensors, str(directory / TRAINED_WEIGHTS), metadata={"format": "pt"})
    files = {"adapter": "adapter_model.safetensors", "trained": TRAINED_WEIGHTS}
    if not config.model.checkpoint:
        base = {
            name: t.detach().cpu().contiguous()
            for name, t in model.state_dict().items()
            if name not in trained_tensors and not _is_adapter_tensor(name)
        }
        save_file(base, str(directory / BASE_WEIGHTS), metadata={"format": "pt"})
        files["base"] = BASE_WEIGHTS
    if config.export_merged:
        model.save_pretrained(directory / MERGED_DIR)
        files["merged"] = MERGED_DIR
    source = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": {**config.model.describe(), "seed": config.seed},
        "files": files,
        "phrases": list(trained.phrases),  # read by prediction.model_loading.model_phrases
        "trained_tensors": sorted(trained_tensors),
        "training_config": config.to_dict(),
    }
    (directory / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    (directory / SUMMARY_FILE).write_text(json.dumps(trained.summary(), indent=1))
    return directory


def read_model_source(path: str | Path) -> dict[str, Any]:
    """The ``model_source.json`` of a trained-model folder (checked to be one)."""
    file = Path(path) / SOURCE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not a trained-model folder written by training.")
    source = json.loads(file.read_text())
    if source.get("format") != FORMAT:
        raise ValueError(f"{file}: unknown format {source.get('format')!r} (expected {FORMAT!r})")
    return source


def load_trained_model(
    path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, merge: bool = True
) -> Sa2VA:
    """Rebuild the fine-tuned Sa2VA from a trained-model folder, LoRA merged, in eval mode.

    Args:
        path: the folder (the ``trained_model`` catalog entry loads as this path).
        device: where the returned model lives.
        dtype: its weights' dtype (default float32).
        merge: False keeps LoRA injected (the model as training hands it over, which
            :func:`save_trained_model` can write again: the multi-device path uses this).
    """
    import torch
    from safetensors.torch import load_file

    from sa2va_pipeline.model import Sa2VA
    from sa2va_pipeline.training.lora import load_adapter, merge_lora

    path = Path(path)
    meta = read_model_source(path)
    source = meta["source"]
    resolution = source.get("mask_resolution", "standard")  # as trained (absent: the official mode)
    if source["kind"] == "checkpoint":
        checkpoint = Path(source["checkpoint"])
        if not checkpoint.is_dir():
            raise FileNotFoundError(
                f"{path / SOURCE_FILE} names the base checkpoint {checkpoint}, which does not exist here. Put the "
                "checkpoint back there, or export with training.export_merged: true for a self-contained model."
            )
        model = Sa2VA.from_pretrained(checkpoint, device="cpu", dtype=torch.float32, mask_resolution=resolution)
    else:
        model = Sa2VA.from_preset(
            source["preset"], device="cpu", dtype=torch.float32, seed=int(source.get("seed", 0)),
            mask_resolution=resolution,
            **dict(source.get("overrides") or {}),
        )
    load_adapter(model.vlm, path)
    state = load_file(str(path / TRAINED_WEIGHTS))
    if "base" in meta["files"]:
        state = {**load_file(str(path / meta["files"]["base"])), **state}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path}: tensors the model does not have: {sorted(unexpected)[:5]}")
    if "base" in meta["files"]:
        missing = [k for k in missing if not _is_adapter_tensor(k)]
        if missing:
            raise ValueError(f"{path}: tensors missing from {BASE_WEIGHTS}: {sorted(missing)[:5]}")
    if merge:
        merge_lora(model.vlm)
    else:  # as training left it: only the trained tensors (and the adapter) require grad
        trained = set(meta.get("trained_tensors", []))
        for name, param in model.named_parameters():
            param.requires_grad_(name in trained or _is_adapter_tensor(name))
    return model.to(device=device, dtype=dtype or torch.float32).eval()
