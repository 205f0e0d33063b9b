"""Resumable training checkpoints: safetensors for tensors, JSON for the rest, no pickles.

Runs. Every training run writes into its own folder ``<checkpoint.dir>/<run id>/`` (the run id is the UTC
start time plus a random suffix, so names sort by age); a fresh run never touches another run's folder.
``checkpoint.resume: true`` continues the latest run, ``resume: <run id>`` that one (:func:`resolve_run`).

A checkpoint is a directory ``<run>/step_<N>/`` holding
    trainable.safetensors   every trainable parameter, by its model name (full tensors, fp32 masters when
                            the optimiser keeps them: ``training.master_weights``)
    optimizer.safetensors   AdamW state flattened to ``<param name>::<state key>`` (full tensors)
    rng.safetensors         per rank: torch CPU (and CUDA) generator states, numpy's MT19937 key
    state.json              step, total steps, the data position, python/numpy RNG scalars per rank, history
It is written into a hidden ``.tmp-`` directory next to its final place and renamed when complete, so a
crash mid-write never leaves a directory that looks like a checkpoint; older checkpoints are pruned only
after the new one is in place, and an existing checkpoint is never removed to make room for its
replacement: at every instant the last complete checkpoint exists. Stale ``.tmp-`` folders of a killed
writer are removed when the run is resumed. A checkpoint that is present but unreadable on resume is an
error (:class:`CheckpointError`), never a silent fresh start.

Several ranks. Under FSDP parameters and AdamW moments are sharded DTensors: saving gathers each one to a
full tensor (a collective, so every rank calls :func:`save_checkpoint`, in the same order) and only rank 0
writes. The files hold full tensors whatever the device count, so a checkpoint written by N ranks loads on
any number of ranks (each rank's RNG state is restored when that rank existed, else seeded afresh).
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sa2va_pipeline.atomic import TMP_PREFIX, atomic_write_json, fsync_tree, remove_stale_temporaries
from sa2va_pipeline.errors import UserError
from sa2va_pipeline.training.ranks import gather_objects

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sa2va_pipeline.training.ranks import DistributedContext

log = logging.getLogger(__name__)

PREFIX = "step_"
STATE_FILE = "state.json"
FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", STATE_FILE)
SEP = "::"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that should be resumed from is missing files or cannot be read."""


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimiser steps."""
    return f"{PREFIX}{step:08d}"


def new_run_id() -> str:
    """A fresh run id: UTC start time to the microsecond (names sort by age, so "the latest run" is the last
    name even for runs started within one second) + a random suffix (two runs started together differ)."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    return stamp + "-" + secrets.token_hex(3)


def list_runs(root: Path) -> list[Path]:
    """Run folders under ``root``, oldest first (hidden ``.tmp-`` folders and loose files are not runs)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and not p.name.startswith(PREFIX))


def step_folders(run: Path) -> list[Path]:
    """Every ``step_*`` folder of a run (complete or not), oldest first."""
    run = Path(run)
    if not run.is_dir():
        return []
    found = [p for p in run.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    return [p for p in step_folders(run) if all((p / f).is_file() for f in FILES)]


def latest_checkpoint(run: Path) -> Path | None:
    """The newest checkpoint of a run folder (None if it has none). A newest ``step_*`` folder that is not
    complete is an error: it was published whole, so something damaged it afterwards."""
    folders = step_folders(run)
    if not folders:
        return None
    newest = folders[-1]
    missing = [f for f in FILES if not (newest / f).is_file()]
    if missing:
        raise CheckpointError(
            f"Checkpoint {newest} is incomplete (missing {', '.join(missing)}). Remove that folder to resume from "
            f"the one before it{'' if len(folders) > 1 else ' (there is none: the run starts over)'}, or set "
            "training.checkpoint.resume: false to start a new run."
        )
    return newest


def resolve_run(root: Path, resume: bool | str) -> tuple[Path, bool]:
    """The run folder this training writes into and whether it continues an existing run.

    ``resume`` false: a new run folder (nothing of earlier runs is touched). True: the latest run under
    ``root`` (a new one if there is none yet). A run id: that run, which must exist. Stale temporaries of a
    killed writer are removed from the run that is continued.
    """
    root = Path(root)
    if resume is False:
        return root / new_run_id(), False
    if resume is True:
        runs = list_runs(root)
        if not runs:
            log.info("training.checkpoint.resume is on but %s holds no run yet: starting a new run", root)
            return root / new_run_id(), False
        run = runs[-1]
    else:
        run = root / str(resume)
        if not run.is_dir():
            known = ", ".join(p.name for p in list_runs(root)[-5:]) or "none"
            raise CheckpointError(
                f"training.checkpoint.resume names run {resume!r}, but {run} does not exist (latest runs: {known})."
            )
    for stale in remove_stale_temporaries(run):
        log.warning("Removed %s, left by a writer that was killed", stale)
    return run, True


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
    if not keep:
        return None
    out = tensor.detach().cpu().contiguous()
    if out.untyped_storage().nbytes() != out.numel() * out.element_size():
        out = out.clone()  # a view into a larger buffer (flat optimiser state): safetensors wants its own
    return out


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
                if full is not None:  # a step counter may be one tensor shared by a group: its own copy
                    tensors[f"{name}{SEP}{key}"] = full.clone() if key == "step" else full
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
    for group, group_names in zip(optimizer.param_groups, names):
        for name, param in zip(group_names, group["params"]):
            state = optimizer.state.get(param, {})  # empty before the first step, but for MasterWeightAdamW
            for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                flat = tensors.get(f"{name}{SEP}{key}")
                if flat is None:
                    continue
                if key in state:  # pre-allocated (views into flat buffers): filled in place
                    state[key].copy_(flat.to(state[key].device))
                else:
                    state[key] = like(flat, param) if key != "step" else flat.clone()
            if state:
                optimizer.state[param] = state


def like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``tensor`` (a full CPU tensor from a checkpoint) placed like ``param``: on its device, and sharded the
    same way when ``param`` is an FSDP DTensor (every rank holds the full tensor: no data moves)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(tensor.to(param.device_mesh.device_type), param.device_mesh, param.placements,
                                 src_data_rank=None)
    return tensor.to(param.device)


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    optimizer_names: list[list[str]],
    state: dict[str, Any],
    keep_last: int = 2,
    write: bool = True,
    ctx: DistributedContext | None = None,
) -> Path | None:
    """Write ``root/step_<N>`` atomically and prune older checkpoints beyond ``keep_last``.

    ``root`` is the run folder. ``write=False`` (the other ranks of a multi-device run): take part in the
    gathers of sharded tensors and of the RNG states, touch no file, return None. A complete checkpoint of
    the same step already there (a resumed run that had finished training) is kept as it is: resume is
    exact, so it holds the same weights, and removing it first would leave a moment without one.
    """
    from safetensors.torch import save_file

    masters = getattr(optimizer, "masters", {})  # fp32 masters of bf16 compute weights (MasterWeightAdamW)
    trainable = {n: full_cpu(masters.get(p, p), keep=write) for n, p in model.named_parameters() if p.requires_grad}
    opt_tensors, opt_meta = optimizer_to_flat(optimizer, optimizer_names, keep=write)
    rng_states = gather_objects(capture_rng(), ctx)
    if not write:
        return None
    root = Path(root)
    final = root / checkpoint_name(step)
    if final in list_checkpoints(root):
        log.info("Checkpoint %s exists already (same step of the same run): kept", final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{final.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({f"rank{r}.{k}": v for r, (tensors, _) in enumerate(rng_states) for k, v in tensors.items()},
                  str(tmp / "rng.safetensors"))
        payload = {"step": step, "optimizer": opt_meta, "rng": [scalars for _, scalars in rng_states],
                   "world_size": len(rng_states), **state}
        atomic_write_json(tmp / STATE_FILE, payload, indent=1)
        fsync_tree(tmp)  # make the bytes durable before the rename publishes them
        tmp.rename(final)  # fails (and keeps both) rather than replace a folder that appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[: -max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    optimizer_names: list[list[str]],
    ctx: DistributedContext | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Restore trainable weights, optimiser and this rank's RNG from ``path``; return the JSON state.

    Any file that cannot be read raises :class:`CheckpointError` naming it and what to do.
    """
    path = Path(path)
    state, weights, opt_tensors, rng_tensors = _read_checkpoint(path)
    _load_weights(path, model, weights, getattr(optimizer, "masters", {}))
    optimizer_from_flat(optimizer, optimizer_names, opt_tensors, state["optimizer"])
    _restore_rank_rng(path, state, rng_tensors, ctx, seed)
    return state


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], dict, dict, dict]:
    from safetensors.torch import load_file

    what_to_do = (
        f"Remove {path} to resume from the checkpoint before it, or set training.checkpoint.resume: false to "
        "start a new run."
    )
    try:
        state = json.loads((path / STATE_FILE).read_text())
        tensors = [load_file(str(path / name)) for name in FILES[:3]]
    except Exception as err:  # OSError, JSONDecodeError, SafetensorError (its own class): all mean "unreadable"
        raise CheckpointError(f"Checkpoint {path} cannot be read ({type(err).__name__}: {err}). {what_to_do}") from err
    if not isinstance(state, dict) or not {"step", "optimizer", "rng", "total_steps"} <= set(state):
        raise CheckpointError(f"Checkpoint {path}: {STATE_FILE} lacks step / total_steps / optimizer / rng. {what_to_do}")
    return state, tensors[0], tensors[1], tensors[2]


def _load_weights(path: Path, model: nn.Module, weights: dict[str, torch.Tensor],
                  masters: dict[torch.Tensor, torch.Tensor]) -> None:
    """Copy the saved trainable weights into the model (and into the fp32 masters where the optimiser keeps
    them: the checkpoint holds full precision in both ``training.master_weights`` modes)."""
    import torch

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
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"Checkpoint {path}: {name} has shape {tuple(tensor.shape)}, the model "
                                 f"{tuple(params[name].shape)}. Resume with the same model and settings.")
            params[name].copy_(like(tensor.to(params[name].dtype), params[name]))
            if params[name] in masters:
                masters[params[name]].copy_(tensor.to(masters[params[name]].device))


def _restore_rank_rng(path: Path, state: dict, tensors: dict, ctx: DistributedContext | None, seed: int) -> None:
    import torch

    rank = 0 if ctx is None else ctx.rank
    scalars = state["rng"]
    if isinstance(scalars, dict):  # written before per-rank states: one process
        scalars, tensors = [scalars], {f"rank0.{k}": v for k, v in tensors.items()}
    if rank < len(scalars):
        prefix = f"rank{rank}."
        restore_rng({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, scalars[rank])
        return
    # a rank the writing run did not have: its own deterministic stream (the data order is unaffected)
    log.warning("Checkpoint %s was written by %d rank(s); rank %d starts a fresh random stream (dropout, point "
                "sampling), so this resume is not bit-exact", path, len(scalars), rank)
    random.seed(seed + rank)
    torch.manual_seed(seed + 1_000_003 * rank + int(state["step"]))
