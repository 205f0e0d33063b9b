"""Train the baseline on the train split for a wall-clock budget, predict probability maps, save and load it.

Data: every sample's image (z-scored per image, as nnU-Net does for non-CT images) and one target channel per
phrase (``data.samples.phrase_truth``: the union of that phrase's objects, empty when absent), both resized to
``image_size`` (images bilinear, masks by area so thin vessels stay as soft targets). Loss: Dice (over the batch,
per channel, nnU-Net's "batch Dice", which copes with phrases absent from most frames) + binary cross-entropy,
as nnU-Net's DC+CE. AdamW with nnU-Net's polynomial decay (exponent 0.9) over the budget. Random flips.
Prediction: logits upsampled bilinearly to each frame's own size, then the sigmoid (as Sa2VA's prediction does).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from sa2va_pipeline.baseline.network import NetworkConfig, build_network

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

FORMAT = "sa2va-pipeline/baseline-dynunet"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "baseline.json"
MetricsLogger = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class BaselineConfig:
    """The ``baseline`` parameters (see conf/base/parameters_baseline.yml for every knob's meaning)."""

    network: NetworkConfig = field(default_factory=NetworkConfig)
    image_size: int = 256
    batch_size: int = 4
    lr: float = 3.0e-3
    weight_decay: float = 3.0e-5
    time_budget_s: float | None = 120.0
    max_steps: int | None = None
    flips: bool = True
    seed: int = 42
    device: str = "auto"
    predict_batch_size: int = 8
    num_threads: int | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "BaselineConfig":
        """Build from ``params:baseline`` (``network`` nested); unknown keys are an error that names them."""
        params = dict(params)
        network = NetworkConfig.from_params(dict(params.pop("network", {}) or {}))
        known = set(cls.__dataclass_fields__) - {"network"}
        unknown = sorted(set(params) - known - {"comparison", "bootstrap"})
        if unknown:
            raise ValueError(f"baseline: unknown key(s) {unknown}; known: {sorted(known | {'network'})}")
        values = {k: v for k, v in params.items() if k in known}
        config = cls(network=network, **values)
        if config.image_size % network.size_multiple:
            raise ValueError(
                f"baseline.image_size {config.image_size} must be a multiple of {network.size_multiple} "
                f"(2 ** (levels - 1) for {len(network.filters)} levels in baseline.network.filters)"
            )
        if config.time_budget_s is None and config.max_steps is None:
            raise ValueError("baseline: set time_budget_s or max_steps (how long to train)")
        return config


@dataclass
class BaselineModel:
    """A trained baseline in memory: the network, its settings, its phrases (channel order) and its history."""

    network: "nn.Module"
    config: BaselineConfig
    phrases: list[str]
    history: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _normalise(image: np.ndarray) -> np.ndarray:
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
    return (x - x.mean()) / max(float(x.std()), 1e-6)


def _resize(array: "torch.Tensor", size: int, mode: str) -> "torch.Tensor":
    import torch.nn.functional as F

    if array.shape[-2:] == (size, size):
        return array
    if mode == "area":
        return F.interpolate(array, size=(size, size), mode="area")
    return F.interpolate(array, size=(size, size), mode="bilinear", align_corners=False)


def training_arrays(
    samples: Sequence[dict[str, Any]], phrases: Sequence[str], size: int
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Inputs ``(N, 3, size, size)`` float32 and targets ``(N, len(phrases), size, size)`` in [0, 1]."""
    import torch

    from sa2va_pipeline.data.samples import phrase_truth

    images, targets = [], []
    for sample in samples:
        image = torch.from_numpy(_normalise(sample["image"]))[None]
        truth = np.stack([phrase_truth(sample, p) for p in phrases]).astype(np.float32)
        images.append(_resize(image, size, "bilinear")[0])
        targets.append(_resize(torch.from_numpy(truth)[None], size, "area")[0])
    return torch.stack(images), torch.stack(targets)


def _loss_fn() -> Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]:
    import torch.nn.functional as F
    from monai.losses import DiceLoss

    dice = DiceLoss(sigmoid=True, batch=True)

    def loss(logits: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
        return dice(logits, target) + F.binary_cross_entropy_with_logits(logits, target)

    return loss


def train_baseline(
    train_samples: Sequence[dict[str, Any]],
    phrases: Sequence[str],
    params: dict[str, Any] | BaselineConfig,
    log_metrics: MetricsLogger | None = None,
) -> BaselineModel:
    """Train a DynUNet with one output channel per phrase on ``train_samples`` until ``time_budget_s`` (the
    whole call, data preparation included; at least one step) or ``max_steps``, whichever comes first.

    Raises:
        ValueError: no training sample or no phrase.
    """
    import torch

    from sa2va_pipeline.devices import resolve_device

    started = time.monotonic()
    config = params if isinstance(params, BaselineConfig) else BaselineConfig.from_params(params)
    if not train_samples:
        raise ValueError("baseline: the train split is empty; check the split manifest")
    if not phrases:
        raise ValueError("baseline: no phrase to segment (annotations.json has no object text)")
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    inputs, targets = training_arrays(train_samples, phrases, config.image_size)
    network = build_network(config.network, in_channels=3, out_channels=len(phrases)).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = _loss_fn()
    budget = config.time_budget_s
    history: list[dict[str, float]] = []
    step, order = 0, np.empty(0, dtype=int)
    network.train()
    while True:
        elapsed = time.monotonic() - started
        if config.max_steps is not None and step >= config.max_steps:
            break
        if (
            budget is not None and elapsed >= budget and step > 0
        ):  # at least one step, however busy the machine
            break
        if len(order) < config.batch_size:  # a fresh shuffled pass over the training frames
            order = np.concatenate([order, rng.permutation(len(inputs))])
        picked, order = order[: config.batch_size], order[config.batch_size :]
        x, y = inputs[picked].to(device), targets[picked].to(device)
        if config.flips:
            for dim in (-1, -2):
                if rng.random() < 0.5:
                    x, y = x.flip(dim), y.flip(dim)
        progress = max(
            elapsed / budget if budget else 0.0, step / config.max_steps if config.max_steps else 0.0
        )
        lr = config.lr * (1.0 - min(progress, 0.999)) ** 0.9  # nnU-Net's poly schedule, over the budget
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = loss_fn(network(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        history.append(
            {
                "step": step,
                "loss": float(loss.detach()),
                "lr": lr,
                "elapsed_s": round(time.monotonic() - started, 3),
            }
        )
        if log_metrics is not None:
            log_metrics({"baseline.loss": history[-1]["loss"], "baseline.lr": lr}, step)
    network.eval()
    wall = time.monotonic() - started
    log.info(
        "Baseline DynUNet: %d steps in %.1f s on %d frames, final loss %.4f",
        step,
        wall,
        len(inputs),
        history[-1]["loss"] if history else float("nan"),
    )
    summary = {
        "format": FORMAT,
        "steps_done": step,
        "wall_time_s": round(wall, 2),
        "stopped_by_time": budget is not None and (config.max_steps is None or step < config.max_steps),
        "n_train_frames": len(inputs),
        "parameters": int(sum(p.numel() for p in network.parameters())),
        "final_loss": history[-1]["loss"] if history else None,
        "device": device,
    }
    return BaselineModel(
        network=network, config=config, phrases=list(phrases), history=history, summary=summary
    )


def predict_baseline(
    model: BaselineModel, samples: Sequence[dict[str, Any]], batch_size: int | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """Probability maps ``{phrase: {sample id: (H, W) float32}}`` at each frame's own size."""
    import torch
    import torch.nn.functional as F

    batch_size = int(batch_size or model.config.predict_batch_size)
    device = next(model.network.parameters()).device
    out: dict[str, dict[str, np.ndarray]] = {p: {} for p in model.phrases}
    model.network.eval()
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            x = torch.stack(
                [
                    _resize(
                        torch.from_numpy(_normalise(s["image"]))[None], model.config.image_size, "bilinear"
                    )[0]
                    for s in chunk
                ]
            ).to(device)
            logits = model.network(x).float()
            for sample, sample_logits in zip(chunk, logits):
                height, width = np.asarray(sample["image"]).shape[:2]
                up = F.interpolate(
                    sample_logits[None], size=(height, width), mode="bilinear", align_corners=False
                )
                prob = torch.sigmoid(up[0]).cpu().numpy()
                for channel, phrase in enumerate(model.phrases):
                    out[phrase][str(sample["id"])] = prob[channel]
    return out


def _unique_state(network: "nn.Module") -> dict[str, "torch.Tensor"]:
    """The state dict without aliases: DynUNet also reaches its layers through ``skip_layers``, and safetensors
    refuses tensors stored twice; loading the first name fills the alias too."""
    seen: set[int] = set()
    state = {}
    for name, tensor in network.state_dict(keep_vars=False).items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().cpu().contiguous()
    return state


def baseline_files(model: BaselineModel) -> dict[str, bytes]:
    """The model as files (safetensors weights + JSON settings) for a versioned folder entry."""
    from safetensors.torch import save

    state = _unique_state(model.network)
    settings = {
        "format": FORMAT,
        "phrases": model.phrases,
        "network": model.config.network.as_dict(),
        "config": {k: v for k, v in model.config.__dict__.items() if k != "network"},
        "summary": model.summary,
        "history": model.history,
    }
    return {
        WEIGHTS_FILE: save(state, metadata={"format": "pt"}),
        CONFIG_FILE: json.dumps(settings, indent=1).encode(),
    }


def load_baseline(folder: Any, device: str = "cpu") -> BaselineModel:
    """Rebuild a saved baseline from its folder (a path, or a ``FileFolder`` with ``root``).

    Raises:
        ValueError: the folder is not a baseline written by :func:`baseline_files`.
    """
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(getattr(folder, "root", folder))
    config_path = root / CONFIG_FILE
    if not config_path.is_file() or not (root / WEIGHTS_FILE).is_file():
        raise ValueError(
            f"{root} is not a baseline model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
            "run `kedro run --pipelines=baseline` first"
        )
    settings = json.loads(config_path.read_text())
    if settings.get("format") != FORMAT:
        raise ValueError(f"{config_path}: format {settings.get('format')!r} is not {FORMAT!r}")
    config = BaselineConfig.from_params({**settings["config"], "network": settings["network"]})
    network = build_network(config.network, 3, len(settings["phrases"]))
    result = network.load_state_dict(load_file(str(root / WEIGHTS_FILE)), strict=False)
    aliases = set(network.state_dict()) - set(_unique_state(network))
    if result.unexpected_keys or set(result.missing_keys) - aliases:
        raise ValueError(
            f"{root / WEIGHTS_FILE}: weights do not fit the network in {CONFIG_FILE} (missing "
            f"{sorted(set(result.missing_keys) - aliases)[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    network.to(device).eval()
    return BaselineModel(
        network=network,
        config=config,
        phrases=list(settings["phrases"]),
        history=settings.get("history", []),
        summary=settings.get("summary", {}),
    )
