"""Multi-GPU training with torch.distributed: one process per device, DDP or FSDP2, only rank 0 logs and saves.

How it is started. ``training.devices: N`` (N > 1) makes :func:`sa2va_pipeline.training.recipe.run_training`
call :func:`run_training_distributed`, which spawns N worker processes with ``torch.multiprocessing``
(start method ``spawn``), one per GPU (``cuda:0..N-1``; gloo on CPU for tests). Kedro itself runs once, in
the parent: the training node calls ``run_training`` as usual and gets a ``TrainedModel`` back. Rank 0 is
the only worker that shows progress, sends metrics (through a queue the parent drains into the
``log_metrics`` callback, i.e. MLflow) and writes checkpoints and the trained model (into a temporary
folder the parent reads back, in the same format as a single-device run). Use ``CUDA_VISIBLE_DEVICES`` to
choose the GPUs.

What a step means. ``training.batch_size`` stays per device; the global batch of an optimiser step is
``batch_size x grad_accumulation x devices``. The trainer draws the global micro-batch (its data order is
unchanged) and each rank takes its contiguous share; gradients are averaged over ranks, so a step equals a
single-device step over the same global batch (up to prompts, dropout and point-sampling randomness,
which are drawn per rank). Logged losses are the mean over ranks. Validation is spread over the ranks too
(``validation.py``); every rank gets the metrics, rank 0 reports them.

Strategies (``training.strategy``):
- ``ddp`` (default): every GPU holds the whole model, its gradients and AdamW state; gradients are
  all-reduced in backward. Fastest while the model and its trainable state fit on one GPU.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``). Each LLM decoder layer, each vision-tower
  layer, each SAM2 Hiera block, ``embed_tokens`` and ``lm_head`` is its own shard group, the rest (projector,
  SAM2 neck / prompt encoder / mask decoder, ``text_hidden_fcs``) is the root group. Weights, gradients and
  AdamW moments are split over the ranks; a group's weights are gathered just before its forward (and
  again in backward) and freed after. This saves most for the trainable state (fp32 weights + gradients +
  two AdamW moments: 16 bytes per trainable parameter, e.g. the full embeddings and lm_head) and for the
  frozen weights during the step. Every worker still builds the whole model on its GPU before sharding,
  so the model in bf16 must fit on one GPU at start. Dtypes are left as they are (see :func:`fsdp_shard`).
  Checkpoints and the final model are gathered to full tensors (all ranks take part, rank 0 writes), so
  their files are the same as with DDP or one device.

``training.compile: true`` compiles each LLM decoder layer with ``torch.compile`` (after sharding under
FSDP, before wrapping under DDP; FSDP's hooks stay outside the compiled graphs).

Limits (for now): ``schedule.time_budget_s`` and ``checkpoint.resume`` need one device (ranks would size or
resume differently).
"""

from __future__ import annotations

import copy
import json
import logging
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


def init_worker(rank: int, world_size: int, rendezvous: str, use_cuda: bool) -> DistributedContext:
    """Join the process group (NCCL on GPUs, gloo on CPU) and pin this worker to its device.

    ``rendezvous``: a file path that does not exist yet, private to this run (a ``file://`` store: unlike a
    TCP port picked in advance, no other process on the host can take it before the workers bind it).
    """
    import torch
    import torch.distributed as dist

    if use_cuda:
        torch.cuda.set_device(rank)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world_size,
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


def fsdp_loss_fn(
    loss_fn: Callable[[nn.Module, Any], dict[str, torch.Tensor]], ctx: DistributedContext
) -> Callable[[nn.Module, Any], dict[str, torch.Tensor]]:
    """A ``loss_fn(model, batch)`` for an FSDP-sharded model: as ``loss_fn``, losses logged as the mean over
    ranks. FSDP reduce-scatters (averages) the gradients in backward by itself."""

    def run(model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        return mean_over_ranks_for_logging(loss_fn(model, batch), ctx)

    return run


# Repeated blocks that become their own FSDP group (relative to the part's prefix in ModelLayout), found
# where the model has them: LLM decoder layers; InternViT layers (InternVL) or Qwen-VL vision blocks; SAM2
# Hiera blocks. Modules used outside their own forward (the mask decoder's conv_s0 / conv_s1, SAM2's
# no_memory_embedding) must stay in the root group, whose weights are gathered for the whole step.
FSDP_BLOCKS = {"llm": ("layers",), "vision_tower": ("encoder.layer", "blocks"), "sam2_image_encoder": ("backbone.blocks",)}


def fsdp_unit_names(model: nn.Module) -> list[str]:
    """Names of the submodules that :func:`fsdp_shard` makes their own FSDP group, in model order."""
    from torch import nn

    from sa2va_pipeline.training.parameter_groups import find_layout

    layout = find_layout(model)
    names: list[str] = []
    for part, candidates in FSDP_BLOCKS.items():
        prefix = getattr(layout, part)
        for candidate in candidates:
            try:
                blocks = model.get_submodule(prefix + candidate)
            except AttributeError:
                continue
            if isinstance(blocks, nn.ModuleList):
                names += [f"{prefix}{candidate}.{i}" for i in range(len(blocks))]
                break
        else:
            if part == "llm":
                raise ValueError(f"training.strategy fsdp: no decoder layers under {prefix}layers in this model")
    # the largest single matrices (vocab x hidden): gathered only around the embedding lookup and the LM loss
    return names + [layout.embed_tokens.rstrip("."), layout.lm_head.rstrip(".")]


def fsdp_shard(model: nn.Module, ctx: DistributedContext) -> list[str]:
    """Shard ``model`` in place with FSDP2 over all ranks; returns the names of the per-block groups.

    Dtypes. On GPU the frozen weights are bf16 and the trainable ones fp32 masters (recipe.trainable_to_fp32),
    often inside one group (a decoder layer: bf16 base weights + fp32 LoRA). FSDP2 accepts that as is: it
    only needs one dtype among a group's TRAINABLE parameters (the dtype of its gradient reduce-scatter, here
    fp32) and all-gathers a group with mixed dtypes as bytes. So no MixedPrecisionPolicy: casting everything
    to bf16 (param_dtype) would gather the same bytes for the frozen weights and only save on the small LoRA
    matrices, while fp32 everywhere would double the frozen weights' memory and traffic. Compute stays as on
    one device (bf16 autocast; fp32 LoRA weights are cast per matmul), gradients are reduced in fp32, and
    the numbers match DDP / single-device training.

    ``training_forward`` and ``predict_proba`` are registered as FSDP forward methods of the root, so the
    root group's weights are gathered around them as around ``forward``.

    Every group is gathered and freed once right here. FSDP allocates a group's unsharded weights at its
    first gather and reuses them; if that first gather ran inside ``predict_proba`` (a validation at step 0,
    under ``torch.inference_mode``) they would be inference tensors, which training can never write again
    ("Inplace update to inference tensor outside InferenceMode").
    """
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh("cuda" if ctx.device.startswith("cuda") else "cpu", (ctx.world_size,))
    names = fsdp_unit_names(model)
    for name in names:
        fully_shard(model.get_submodule(name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    for method in ("training_forward", "predict_proba"):
        register_fsdp_forward_method(model, method)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.unshard()
                module.reshard()
    return names


def unsharded_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are empty (meta device; requires_grad kept) and whose buffers
    are CPU copies: the plain module that rank 0 fills with the gathered weights after FSDP training
    (:func:`gather_full_model`). Made before sharding, so it has no FSDP hooks; costs no device memory.
    The tokenizer is shared, not copied."""
    import copy

    import torch

    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach().to("cpu", copy=True)
    if getattr(model, "tokenizer", None) is not None:
        memo[id(model.tokenizer)] = model.tokenizer
    return copy.deepcopy(model, memo)


def gather_full_model(model: nn.Module, skeleton: nn.Module | None, ctx: DistributedContext) -> nn.Module | None:
    """Gather every weight of the FSDP-sharded ``model`` (a collective: all ranks call this) and, on rank 0,
    load them into ``skeleton`` (:func:`unsharded_skeleton`). Returns that plain, unsharded model on the CPU
    with the dtypes of training on rank 0, None elsewhere: the same model DDP or one device hands back."""
    from sa2va_pipeline.training.checkpoint import full_cpu

    state = {}
    for name, tensor in model.state_dict().items():
        full = full_cpu(tensor, keep=ctx.is_main)
        if full is not None:
            state[name] = full
    if not ctx.is_main:
        return None
    if skeleton is None:
        raise ValueError("gather_full_model needs rank 0's skeleton (unsharded_skeleton before fully_shard)")
    skeleton.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, p in skeleton.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"FSDP gather left parameters without weights: {leftover[:5]}")
    return skeleton


def check_supported(config: TrainingConfig) -> None:
    """Refuse settings that the multi-device path does not handle yet, with what to do instead."""
    if config.schedule.time_budget_s and not config.schedule.max_steps:
        raise ValueError(
            "training.schedule.time_budget_s needs training.devices: 1 (each rank would size the run "
            "differently); set schedule.max_steps or schedule.epochs for multi-device runs."
        )
    if config.checkpoint.resume:
        raise ValueError("training.checkpoint.resume needs training.devices: 1 for now.")


def worker_config(config: TrainingConfig, ctx: DistributedContext) -> TrainingConfig:
    """This rank's view of the config: the global micro-batch for the trainer's data order and its device.

    Everything else is the same on every rank (checkpoint interval included: under FSDP saving gathers
    sharded tensors, so all ranks take part; only rank 0 writes, see ``trainer.train(main_process=...)``)."""
    out = copy.deepcopy(config)
    out.batch_size = config.batch_size * ctx.world_size
    out.device = ctx.device
    return out


def peak_memory_per_rank(ctx: DistributedContext) -> list[float]:
    """Peak GPU memory allocated by torch on each rank during this process, in GB (all ranks call this;
    empty on CPU)."""
    import torch
    import torch.distributed as dist

    if not ctx.device.startswith("cuda"):
        return []
    mine = torch.tensor([torch.cuda.max_memory_allocated(ctx.device) / 1e9], dtype=torch.float64, device=ctx.device)
    everyone = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(everyone, mine)
    return [round(float(t.item()), 3) for t in everyone]


def _worker(
    rank: int,
    world_size: int,
    rendezvous: str,
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

    ctx = init_worker(rank, world_size, rendezvous, use_cuda)
    try:
        def send(metrics: dict[str, float], step: int) -> None:
            queue.put(("metrics", {k: float(v) for k, v in metrics.items()}, int(step)))

        # every rank validates its share of val_samples (validation.py)
        trained = run_training(
            train_samples, val_samples, params,
            log_metrics=send if ctx.is_main else None, progress=ctx.is_main, distributed=ctx,
        )
        trained.result.peak_memory_gb = peak_memory_per_rank(ctx)
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
    from sa2va_pipeline.devices import resolve_device
    from sa2va_pipeline.training.trainer import TrainResult

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
    with tempfile.TemporaryDirectory(prefix="sa2va-workers-") as out_dir:
        log.info("Training on %d %s workers (%s, %s)", devices, "GPU" if use_cuda else "CPU", config.strategy.upper(),
                 "nccl" if use_cuda else "gloo")
        procs = mp.start_processes(
            _worker,
            args=(devices, str(Path(out_dir) / "rendezvous"), use_cuda, list(train_samples), list(val_samples),
                  params, queue, out_dir),
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

