"""What one process of a multi-device run needs to know and do with the others (torch.distributed).

A leaf module: the training loop, the validation and the FSDP helpers import it; it imports none of them.
How the processes are started (``training.devices: N`` or torchrun) is in ``distributed.py``.

What a step means. ``training.batch_size`` stays per device; the global batch of an optimiser step is
``batch_size x grad_accumulation x world_size``. The loop draws the global micro-batch (its data order is
the one-device order) and each rank takes its contiguous share (:func:`shard`); gradients are averaged over
ranks, so a step equals a one-device step over the same global batch (up to prompts, dropout and
point-sampling randomness, which are drawn per rank). Logged losses are the mean over ranks.
"""

from __future__ import annotations

import copy
import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sa2va_pipeline.training.config import TrainingConfig

# How long a rank waits for the others at the rendezvous and in any collective. Under torchrun the other
# ranks wait for rank 0 to run the chain up to the training node, which can take a while.
GROUP_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank, the number of ranks, its device and the process-group backend."""

    rank: int
    world_size: int
    device: str
    backend: str
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that logs, writes files and talks to MLflow."""
        return self.rank == 0

    @property
    def collective_device(self) -> str:
        """Where tensors of a collective must live (NCCL: this rank's GPU; gloo: the CPU)."""
        return self.device if self.backend == "nccl" else "cpu"


def init_file_group(rank: int, world_size: int, rendezvous: str, use_cuda: bool) -> DistributedContext:
    """Join a one-host group through a ``file://`` store (``training.devices: N``; see distributed.py).

    ``rendezvous``: a file path that does not exist yet, private to this run (unlike a TCP port picked in
    advance, no other process on the host can take it before the workers bind it).
    """
    import torch
    import torch.distributed as dist

    if use_cuda:
        torch.cuda.set_device(rank)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world_size,
                            timeout=GROUP_TIMEOUT, device_id=torch.device("cuda", rank) if use_cuda else None)
    return DistributedContext(rank, world_size, f"cuda:{rank}" if use_cuda else "cpu", backend, rank)


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or SLURM with the same variables) started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def join_env_group() -> None:
    """Join the group torchrun describes (env:// rendezvous: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT). With GPUs the group carries both backends (``cpu:gloo,cuda:nccl``), so every rank joins
    the same way before it knows the run's ``training.device``; this rank's GPU is ``cuda:LOCAL_RANK``."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, init_method="env://", timeout=GROUP_TIMEOUT)


def env_context(device: str = "auto") -> DistributedContext:
    """This torchrun rank's context for ``training.device`` (after :func:`join_env_group`)."""
    from sa2va_pipeline.devices import resolve_device

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if resolve_device(device).startswith("cuda"):
        return DistributedContext(rank, world, f"cuda:{local}", "nccl", local)
    return DistributedContext(rank, world, "cpu", "gloo", local)


def shard(samples: Sequence[Any], ctx: DistributedContext) -> list[Any]:
    """This rank's contiguous share of a global micro-batch (the loop draws ``batch_size x world`` samples)."""
    per_rank = len(samples) // ctx.world_size
    if per_rank * ctx.world_size != len(samples):
        raise ValueError(f"A global micro-batch of {len(samples)} samples does not split over {ctx.world_size} devices")
    return list(samples[ctx.rank * per_rank : (ctx.rank + 1) * per_rank])


def rank_config(config: TrainingConfig, ctx: DistributedContext) -> TrainingConfig:
    """This rank's view of the config: the global micro-batch for the loop's data order and its device.

    Everything else is the same on every rank (checkpoint interval included: under FSDP saving gathers
    sharded tensors, so all ranks take part; only rank 0 writes)."""
    out = copy.deepcopy(config)
    out.batch_size = config.batch_size * ctx.world_size
    out.device = ctx.device
    return out


def mean_over_ranks_for_logging(out: dict[str, Any], ctx: DistributedContext) -> dict[str, Any]:
    """Scalar losses averaged over ranks for the logs; ``loss`` keeps this rank's gradient.

    ``loss`` becomes ``local + (mean - local).detach()``: its value is the global mean (so every rank sees the
    same number: the non-finite check stops all of them together) and its gradient the local one (DDP / FSDP
    average the gradients). Non-scalar entries (``per_object``) stay this rank's own.
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


LossFn = Callable[["nn.Module", Any], dict[str, Any]]


def ddp_loss_fn(model: nn.Module, loss_fn: LossFn, ctx: DistributedContext) -> LossFn:
    """A ``loss_fn(model, batch)`` that runs through DDP (gradient all-reduce in backward).

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

        def forward(self, batch: Any) -> dict[str, Any]:
            return loss_fn(self.model, batch)

    device_ids = [torch.device(ctx.device).index] if ctx.device.startswith("cuda") else None
    wrapped = DistributedDataParallel(
        LossModule(), device_ids=device_ids, find_unused_parameters=True, gradient_as_bucket_view=True,
    )

    def run(_model: nn.Module, batch: Any) -> dict[str, Any]:
        return mean_over_ranks_for_logging(wrapped(batch), ctx)

    return run


def fsdp_loss_fn(loss_fn: LossFn, ctx: DistributedContext) -> LossFn:
    """A ``loss_fn(model, batch)`` for an FSDP-sharded model: as ``loss_fn``, losses logged as the mean over
    ranks. FSDP reduce-scatters (averages) the gradients in backward by itself."""

    def run(model: nn.Module, batch: Any) -> dict[str, Any]:
        return mean_over_ranks_for_logging(loss_fn(model, batch), ctx)

    return run


def max_over_ranks(value: float, ctx: DistributedContext | None) -> float:
    """The largest ``value`` of all ranks (every rank gets it): ranks agree on a measured speed."""
    if ctx is None or ctx.world_size == 1:
        return float(value)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([float(value)], dtype=torch.float64, device=ctx.collective_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def any_rank(flag: bool, ctx: DistributedContext | None) -> bool:
    """True on every rank if ``flag`` is true on one (ranks stop together when one runs out of time)."""
    return max_over_ranks(1.0 if flag else 0.0, ctx) > 0.5


def gather_objects(obj: Any, ctx: DistributedContext | None) -> list[Any]:
    """Every rank's ``obj`` (small, JSON-like: pids, RNG states, per-phrase sums), in rank order."""
    if ctx is None or ctx.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistributedContext) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` is ignored elsewhere). Objects travel pickled between the
    processes of this one run only (nothing is read from disk this way)."""
    import torch.distributed as dist

    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def peak_memory_per_rank(ctx: DistributedContext) -> list[float]:
    """Peak GPU memory allocated by torch on each rank, in GB (all ranks call this; empty on CPU)."""
    import torch
    import torch.distributed as dist

    if not ctx.device.startswith("cuda"):
        return []
    mine = torch.tensor([torch.cuda.max_memory_allocated(ctx.device) / 1e9], dtype=torch.float64, device=ctx.device)
    everyone = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(everyone, mine)
    return [round(float(t.item()), 3) for t in everyone]
