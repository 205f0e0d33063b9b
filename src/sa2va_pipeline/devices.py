"""Where computations run: one rule for choosing the device, the weights' dtype and the autocast dtype.

Training, prediction, validation and the benchmarks all resolve ``auto`` here, so ``training.device`` and
``prediction.device`` mean the same thing and fail the same way.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def resolve_device(name: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda[:N]`` without CUDA is an error."""
    import torch

    name = str(name or "auto")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use 'auto' or 'cpu'.")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N.")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """Weights' dtype: ``auto`` -> bfloat16 on CUDA, float32 elsewhere; or one of :data:`DTYPE_NAMES`."""
    import torch

    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPE_NAMES)}.")
    return getattr(torch, name)


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype of ``training.precision``: ``auto`` = bf16 on GPU and none (fp32) on CPU."""
    import torch

    if precision == "fp32" or (precision == "auto" and not str(device).startswith("cuda")):
        return None
    if precision in ("auto", "bf16"):
        return torch.bfloat16
    raise ValueError(f"precision must be auto | fp32 | bf16, got {precision!r}")


def autocast(device: Any, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device``'s type in ``dtype``; a no-op context when ``dtype`` is None."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    device_type = device.type if hasattr(device, "type") else str(device).split(":")[0]
    return torch.autocast(device_type=device_type, dtype=dtype)
