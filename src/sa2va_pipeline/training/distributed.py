"""Multi-GPU training with torch.distributed: one process per device, DDP, only rank 0 logs and saves.

How it is started. ``training.devices: N`` (N > 1) makes :func:`sa2va_pipeline.training.recipe.run_training`
call :func:`run_training_distributed`, which spawns N worker processes with ``torch.multiprocessing``
(start method ``spawn``), one per GPU (``cuda:0..N-1``; gloo on CPU for tests). Kedro itself runs once, in
the parent: the training node calls ``run_training`` as usual and gets a ``TrainedModel`` back. Rank 0 is
the only worker that validates, shows progress, sends metrics (through a queue the parent drains into the
``log_metrics`` callback, i.e. MLflow) and writes the trained model (into a temporary folder the parent
reads back). Use ``CUDA_VISIBLE_DEVICES`` to choose the GPUs.

What a step means. ``training.batch_size`` stays per device; the global batch of an optimiser step is
``batch_size x grad_accumulation x devices``. The trainer draws the global micro-batch (its data order is
unchanged) and each rank takes its contiguous share; DDP averages the gradients, so a step equals a
single-device step over the same global batch (up to prompts, dropout and point-sampling randomness,
which are drawn per rank). Logged losses are the mean over ranks.

Limits (for now): ``schedule.time_budget_s`` and ``checkpoint.resume`` need one device (ranks would size or
resume differently); non-zero ranks write their end-of-run checkpoint into a throwaway folder.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sa2va_pipeline.training.artifacts import TrainedModel
    from sa2va_pipeline.training.config import TrainingConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Where this worker stands: its rank, the number of workers, its device and the process-group backend."""

    rank: int
    world_size: int
    device: str
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that logs, validates and saves."""
        return self.rank == 0


def free_port() -> int:
    """A free TCP port on this host for the process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_worker(rank: int, world_size: int, port: int, use_cuda: bool) -> DistributedContext:
    """Join the process group (NCCL on GPUs, gloo on CPU) and pin this worker to its device."""
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    if use_cuda:
        torch.cuda.set_device(rank)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            device_id=torch.device("cuda", rank) if use_cuda else None)
    return DistributedContext(rank, world_size, f"cuda:{rank}" if use_cuda else "cpu", backend)


def shard(samples: Sequence[Any], ctx: DistributedContext) -> list[Any]:
    """This rank's contiguous share of a global micro-batch (the trainer draws ``batch_size x world`` samples)."""
    per_rank = len(samples) // ctx.world_size
    if per_rank * ctx.world_size != len(samples):
        raise ValueError(f"A global micro-batch of {len(samples)} samples does not split over {ctx.world_size} devices")
    return list(samples[ctx.rank * per_rank : (ctx.rank + 1) * per_rank])


def mean_over_ranks_for_logging(out: dict[str, torch.Tensor], ctx: DistributedContext) -> dict[str, torch.Tensor]:
    """Scalar losses averaged over ranks for the logs; ``loss`` keeps this rank's gradient.

    ``loss`` becomes ``local + (mean - local).detach()``: its value is the global mean (so every rank sees the
    same number: the non-finite check stops all of them together) and its gradient the local one (DDP does
    the averaging of gradients).
    """
    import torch
    import torch.distributed as dist

    keys = [k for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1]
    values = torch.stack([out[k].detach().float().reshape(()) for k in keys])
    dist.all_reduce(values)
    values /= ctx.world_size
    result = dict(out)
    for i, key in enumerate(keys):
        if key == "loss":
            result[key] = out[key] + (values[i] - out[key].detach().float()).to(out[key].dtype)
        else:
            result[key] = values[i]
    return result


def ddp_loss_fn(
    model: nn.Module, loss_fn: Callable[[nn.Module, Any], dict[str, torch.Tensor]], ctx: DistributedContext
) -> Callable[[nn.Module, Any], dict[str, torch.Tensor]]:
    """A ``loss_fn(model, batch)`` for the trainer that runs through DDP (gradient all-reduce in backward).

    The model's own ``training_forward`` is not its ``forward``, so DDP wraps a small module whose forward
    calls ``loss_fn``. ``find_unused_parameters``: the IoU head trains in the official set but only picks a
    mask (argmax), so it never receives gradient; DDP leaves such globally unused gradients as None.
    """
    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    class LossModule(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch: Any) -> dict[str, torch.Tensor]:
            return loss_fn(self.model, batch)

    device_ids = [torch.device(ctx.device).index] if ctx.device.startswith("cuda") else None
    wrapped = DistributedDataParallel(
        LossModule(), device_ids=device_ids, find_unused_parameters=True, gradient_as_bucket_view=True,
    )

    def run(_model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        return mean_over_ranks_for_logging(wrapped(batch), ctx)

    return run


def check_supported(config: TrainingConfig) -> None:
    """Refuse settings that the multi-device path does not handle yet, with what to do instead."""
    if config.schedule.time_budget_s and not config.schedule.max_steps:
        raise ValueError(
            "training.schedule.time_budget_s needs training.devices: 1 (each rank would size the run "
            "differently); set schedule.max_steps or schedule.epochs for multi-device runs."
        )
    if config.checkpoint.resume:
        raise ValueError("training.checkpoint.resume needs training.devices: 1 for now.")


def worker_config(config: TrainingConfig, ctx: DistributedContext, scratch: Path) -> TrainingConfig:
    """This rank's view of the config: the global micro-batch for the trainer's data order, its device,
    and for non-zero ranks a throwaway checkpoint folder."""
    out = copy.deepcopy(config)
    out.batch_size = config.batch_size * ctx.world_size
    out.device = ctx.device
    if not ctx.is_main:
        out.checkpoint.dir = str(scratch / f"rank{ctx.rank}_checkpoints")
        out.checkpoint.interval = 0
    return out


def _worker(
    rank: int,
    world_size: int,
    port: int,
    use_cuda: bool,
    train_samples: Sequence[Any],
    val_samples: Sequence[Any],
    params: Any,
    queue: Any,
    out_dir: str,
) -> None:
    import torch.distributed as dist

    from sa2va_pipeline.training.artifacts import save_trained_model
    from sa2va_pipeline.training.recipe import run_training

    ctx = init_worker(rank, world_size, port, use_cuda)
    try:
        def send(metrics: dict[str, float], step: int) -> None:
            queue.put(("metrics", {k: float(v) for k, v in metrics.items()}, int(step)))

        trained = run_training(
            train_samples, val_samples if ctx.is_main else [], params,
            log_metrics=send if ctx.is_main else None, progress=ctx.is_main, distributed=ctx,
        )
        if ctx.is_main:
            save_trained_model(trained, Path(out_dir) / "model")
            (Path(out_dir) / "result.json").write_text(json.dumps(trained.result.as_dict()))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_training_distributed(
    train_samples: Sequence[Any],
    val_samples: Sequence[Any],
    params: Any,
    config: TrainingConfig,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
) -> TrainedModel:
    """Train on ``config.devices`` workers (see the module docstring) and return rank 0's trained model."""
    import torch
    import torch.multiprocessing as mp

    from sa2va_pipeline.training.artifacts import TrainedModel, load_trained_model
    from sa2va_pipeline.training.trainer import TrainResult, resolve_device

    check_supported(config)
    devices = int(config.devices)
    use_cuda = resolve_device(config.device).startswith("cuda")
    if use_cuda and torch.cuda.device_count() < devices:
        raise ValueError(
            f"training.devices is {devices} but only {torch.cuda.device_count()} GPU(s) are visible; lower it or "
            "check CUDA_VISIBLE_DEVICES."
        )
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory(prefix="sa2va-ddp-") as out_dir:
        log.info("Training on %d %s workers (DDP, %s)", devices, "GPU" if use_cuda else "CPU", "nccl" if use_cuda else "gloo")
        procs = mp.start_processes(
            _worker,
            args=(devices, free_port(), use_cuda, list(train_samples), list(val_samples), params, queue, out_dir),
            nprocs=devices, join=False, start_method="spawn",
        )

        def drain() -> None:
            while not queue.empty():
                kind, metrics, step = queue.get()
                if kind == "metrics" and log_metrics is not None:
                    log_metrics(metrics, step)

        while not procs.join(timeout=1.0):
            drain()
        drain()
        model = load_trained_model(Path(out_dir) / "model", device="cpu")
        result = TrainResult(**json.loads((Path(out_dir) / "result.json").read_text()))
    return TrainedModel(model=model, config=config, result=result)

