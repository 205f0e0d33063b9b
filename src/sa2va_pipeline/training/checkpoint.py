"""Resumable training checkpoints: safetensors for tensors, JSON for the rest, no pickles.

A checkpoint is a directory ``step_<N>/`` holding
    trainable.safetensors   every trainable parameter, by its model name
    optimizer.safetensors   AdamW state flattened to ``<param name>::<state key>``
    rng.safetensors         torch CPU (and CUDA) generator states, numpy's MT19937 key
    state.json              step, total steps, the data position, python/numpy RNG scalars, history, ...
It is written into a hidden temporary directory next to its final place and renamed when complete, so a
crash mid-write never leaves a directory that looks like a checkpoint. Only ``step_*`` directories count.

Under FSDP (``training.strategy: fsdp``) parameters and AdamW moments are sharded DTensors: saving gathers
each one to a full tensor (a collective, so every rank calls :func:`save_checkpoint`, in the same order)
and only the writing rank keeps and writes it. The files are the same as a single-device run's.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

PREFIX = "step_"
STATE_FILE = "state.json"
SEP = "::"


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimiser steps."""
    return f"{PREFIX}{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (None if there is none)."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Global RNG states of python, numpy and torch as (tensors, JSON scalars)."""
    import numpy as np
    import torch

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    py_version, py_state, py_gauss = random.getstate()
    scalars = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
    }
    return tensors, scalars


def restore_rng(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    import numpy as np
    import torch

    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    n = scalars["numpy"]
    keys = tensors["numpy_keys"].numpy().view(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = scalars["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def full_cpu(tensor: torch.Tensor, keep: bool = True) -> torch.Tensor | None:
    """``tensor`` whole, detached, contiguous, on the CPU; None when ``keep`` is False.

    A sharded DTensor (FSDP) is gathered first: a collective that every rank must call, including those that
    do not keep the result (``keep=False``), which is why this is called even where nothing is written.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().contiguous() if keep else None


def optimizer_to_flat(
    optimizer: torch.optim.Optimizer, names: list[list[str]], keep: bool = True
) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten AdamW state to ``{"<param name>::<key>": tensor}`` plus JSON-able param-group settings.

    ``keep=False`` (ranks that do not write under FSDP): take part in the gathers, return no tensors.
    """
    import torch

    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for group, group_names in zip(optimizer.param_groups, names):
        for name, param in zip(group_names, group["params"]):
            for key, value in optimizer.state.get(param, {}).items():
                value = value if torch.is_tensor(value) else torch.tensor(value)
                full = full_cpu(value, keep)
                if full is not None:
                    tensors[f"{name}{SEP}{key}"] = full
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"})
    return tensors, {"param_groups": groups, "names": names}


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer, names: list[list[str]], tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    """Load a state written by :func:`optimizer_to_flat` into ``optimizer`` (same params, same order)."""
    if meta["names"] != names:
        raise ValueError(
            "The checkpoint's optimiser covers different parameters than this run trains "
            "(training.trainable or LoRA settings changed?). Resume with the same settings, or start fresh."
        )
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        for key, value in saved.items():
            group[key] = tuple(value) if key == "betas" else value
    optimizer.state.clear()
    for group, group_names in zip(optimizer.param_groups, names):
        for name, param in zip(group_names, group["params"]):
            state = {}
            for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                flat = tensors.get(f"{name}{SEP}{key}")
                if flat is not None:
                    state[key] = flat.to(param.device) if key != "step" else flat.clone()
            if state:
                optimizer.state[param] = state


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    optimizer_names: list[list[str]],
    state: dict[str, Any],
    keep_last: int = 2,
    write: bool = True,
) -> Path | None:
    """Write ``root/step_<N>`` atomically and prune older checkpoints beyond ``keep_last``.

    ``write=False`` (the other ranks of a multi-device run): only take part in the gathers of sharded
    tensors, touch no file, return None.
    """
    from safetensors.torch import save_file

    if not write:
        for _, p in model.named_parameters():
            if p.requires_grad:
                full_cpu(p, keep=False)
        optimizer_to_flat(optimizer, optimizer_names, keep=False)
        return None
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        trainable = {n: full_cpu(p) for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = optimizer_to_flat(optimizer, optimizer_names)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_scalars = capture_rng()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        payload = {"step": step, "optimizer": opt_meta, "rng": rng_scalars, **state}
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1))
        for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[: -max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, optimizer_names: list[list[str]]
) -> dict[str, Any]:
    """Restore trainable weights, optimiser and RNG from ``path``; return the JSON state."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"Checkpoint {path} does not match this run's trainable parameters "
            f"(missing {missing[:3]}, unexpected {extra[:3]}). Resume with the same settings."
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer_from_flat(optimizer, optimizer_names, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    restore_rng(load_file(str(path / "rng.safetensors")), state["rng"])
    return state
