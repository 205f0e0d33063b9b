"""FSDP2 sharding (``training.strategy: fsdp``): which blocks become shard groups, the model built without
ever being whole on one device, and the plain model back.

Each LLM decoder layer, each vision-tower layer, each SAM2 Hiera block, ``embed_tokens`` and ``lm_head`` is
its own shard group; the rest (projector, SAM2 neck / prompt encoder / mask decoder, ``text_hidden_fcs``) is
the root group. Weights, gradients and AdamW moments are split over the ranks; a group's weights are
gathered just before its forward (and again in backward) and freed after. This saves most for the
trainable state (fp32 weights + gradients + two AdamW moments: 16 bytes per trainable parameter, e.g. the
full embeddings and lm_head) and for the frozen weights during the step.

Deferred init (``training.fsdp.meta_init``, the default): every rank builds the model with its parameters on
the ``meta`` device (model/deferred_init.py), injects LoRA, sets dtypes and shards it, and only then
allocates its own shards and fills them one tensor at a time (:func:`fsdp_shard_deferred`): from the
checkpoint (each rank reads the rows it holds) or from a preset built on rank 0's CPU. So a rank holds about
1/N of the model at start, plus one tensor in flight, instead of the whole bf16 model. Checkpoints and the
final model are gathered to full tensors (all ranks take part, rank 0 writes), so their files are the same
as with DDP or one device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sa2va_pipeline.training.ranks import DistributedContext


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
    """Shard ``model`` (its weights real) in place with FSDP2 over all ranks; returns the names of the
    per-block groups.

    Dtypes. On GPU the frozen weights are bf16 and the trainable ones fp32 masters (recipe.trainable_to_fp32),
    often inside one group (a decoder layer: bf16 base weights + fp32 LoRA). FSDP2 accepts that as is: it
    only needs one dtype among a group's TRAINABLE parameters (the dtype of its gradient reduce-scatter, here
    fp32) and all-gathers a group with mixed dtypes as bytes. So no MixedPrecisionPolicy: casting everything
    to bf16 (param_dtype) would gather the same bytes for the frozen weights and only save on the small LoRA
    matrices, while fp32 everywhere would double the frozen weights' memory and traffic. Compute stays as on
    one device (bf16 autocast; fp32 LoRA weights are cast per matmul), gradients are reduced in fp32, and
    the numbers match DDP / single-device training.
    """
    names = shard_groups(model, ctx)
    gather_once(model)
    return names


def shard_groups(model: nn.Module, ctx: DistributedContext) -> list[str]:
    """``fully_shard`` every block of :func:`fsdp_unit_names`, then the root; returns the block names.

    ``training_forward`` and ``predict_proba`` are registered as FSDP forward methods of the root, so the
    root group's weights are gathered around them as around ``forward``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh("cuda" if ctx.device.startswith("cuda") else "cpu", (ctx.world_size,))
    names = fsdp_unit_names(model)
    for name in names:
        fully_shard(model.get_submodule(name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    for method in ("training_forward", "predict_proba"):
        register_fsdp_forward_method(model, method)
    return names


def gather_once(model: nn.Module) -> None:
    """Gather and free every group once, right after sharding.

    FSDP allocates a group's unsharded weights at its first gather and reuses them; if that first gather ran
    inside ``predict_proba`` (a validation at step 0, under ``torch.inference_mode``) they would be inference
    tensors, which training can never write again ("Inplace update to inference tensor outside
    InferenceMode")."""
    import torch
    from torch.distributed.fsdp import FSDPModule

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.unshard()
                module.reshard()


@dataclass
class LoadReport:
    """What filling one rank's shards held (bytes): its shards and buffers, and the most it held besides."""

    local_bytes: int  # this rank's parameter shards + its buffers (full copies)
    model_bytes: int  # every parameter and buffer at full size: what an eager build holds per rank
    largest_read_bytes: int  # the most held at once while reading one source tensor (read + converted)
    read_bytes: int  # everything read or received

    @property
    def peak_bytes(self) -> int:
        """The most this rank held during the load: its shards plus the largest tensor in flight."""
        return self.local_bytes + self.largest_read_bytes


def fsdp_shard_deferred(model: nn.Module, ctx: DistributedContext, weights: Any) -> tuple[list[str], LoadReport]:
    """Shard a model built on ``meta`` (model/deferred_init.py), then allocate and fill this rank's shards.

    ``weights``: a :class:`~sa2va_pipeline.model.deferred_init.CheckpointTensors` (every rank reads its rows)
    or :class:`~sa2va_pipeline.model.deferred_init.PresetTensors` (rank 0 holds the model and sends each
    tensor). What exists before the weights (the LoRA matrices drawn at injection, the buffers computed at
    construction) is kept and put back after ``to_empty``. Every parameter and buffer must be filled, or this
    raises naming the first few that were not. Returns the block names and what the load held.
    """
    initial = take_initial_values(model)
    names = shard_groups(model, ctx)
    report = fill_shards(model, ctx, initial, weights)
    gather_once(model)
    return names, report


def take_initial_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the tensors of a meta-built model that are already real (LoRA matrices on the CPU, buffers),
    by name; those parameters move to ``meta`` too, so that every parameter is sharded the same way."""
    import torch

    values: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        prefix = prefix + "." if prefix else ""
        for name, param in list(module._parameters.items()):
            if param is not None and not param.is_meta:
                values[prefix + name] = param.detach().clone()
                module._parameters[name] = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta:  # meta: peft's copies of embedding rows (token_rows)
                values[prefix + name] = buffer.detach().clone()
    return values


def local_rows(param: torch.Tensor) -> tuple[int, int] | None:
    """The rows (dim 0) of the full tensor that this rank holds of a ``Shard(0)`` DTensor (FSDP2 splits as
    ``torch.chunk``: ceil(rows / ranks) per rank, the last ones shorter or empty); None for anything else."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor) or tuple(param.placements) != (Shard(0),):
        return None
    rows, world = param.shape[0], param.device_mesh.size()
    chunk = -(-rows // world)
    start = min(param.device_mesh.get_local_rank() * chunk, rows)
    held = param.to_local().shape[0]
    if held != min(chunk, rows - start):
        raise RuntimeError(f"FSDP shard of {tuple(param.shape)} holds {held} rows, expected {min(chunk, rows - start)}")
    return start, start + held


def fill_shards(model: nn.Module, ctx: DistributedContext, initial: dict[str, torch.Tensor],
                weights: Any) -> LoadReport:
    """``to_empty`` on this rank's device, then every parameter shard and buffer from ``initial`` (by name)
    or ``weights`` (by the plain native name, without peft's ``base_layer``), one tensor at a time."""
    import torch
    from torch.distributed.tensor import DTensor

    derived = token_rows(model)
    model.to_empty(device=ctx.device)
    params = dict(model.named_parameters())
    entries = {**params, **dict(model.named_buffers())}
    persistent = set(model.state_dict())
    copies = {name for targets in derived.values() for name, _ in targets}
    wanted = {_plain(n): n for n in entries
              if n not in copies and (n not in initial or (n in persistent and n not in params))}
    local = {n: (t.to_local() if isinstance(t, DTensor) else t) for n, t in entries.items()}
    filled: set[str] = set()
    largest = read = 0

    def rows_wanted(plain: str) -> tuple[int, int] | None:
        name = wanted.get(plain)
        if name is None or plain in derived:  # rows copied from it may lie in any rank's share: read whole
            return None
        return local_rows(entries[name])

    def put(name: str, tensor: torch.Tensor, start: int) -> None:
        rows = local_rows(entries[name])
        part = tensor if rows is None else tensor[rows[0] - start : rows[1] - start]
        if part.shape != local[name].shape:
            raise RuntimeError(f"{name}: {tuple(part.shape)} for a shard of {tuple(local[name].shape)}")
        local[name].copy_(part)
        filled.add(name)

    with torch.no_grad():
        for name, value in initial.items():
            put(name, value, 0)
        for plain, tensor, start, nbytes in _source(weights, wanted, entries, rows_wanted, ctx):
            if plain not in wanted:
                raise RuntimeError(f"The weights give {plain!r}, which this model does not have")
            put(wanted[plain], tensor, start)
            for name, rows in derived.get(plain, ()):
                put(name, tensor[rows], 0)  # read whole (rows_wanted): start is 0
            largest, read = max(largest, nbytes), read + nbytes
    missing = sorted(set(entries) - filled)
    if missing:
        raise RuntimeError(f"Deferred init left {len(missing)} tensors unfilled: {missing[:5]}")
    return LoadReport(
        local_bytes=sum(_nbytes(t) for t in local.values()),
        model_bytes=sum(_nbytes(t) for t in entries.values()),
        largest_read_bytes=largest,
        read_bytes=read,
    )


@contextlib.contextmanager
def parts_materialised(model: nn.Module, prefixes: Sequence[str], ctx: DistributedContext,
                       weights: Any) -> Iterator[None]:
    """Within this context the parameters under ``prefixes`` of a model built on ``meta`` are real, whole
    and filled from ``weights`` on this rank's device; after it they are on ``meta`` again (memory freed).

    For what must run before sharding: the feature cache fills from the frozen encoders alone (vision tower,
    SAM2 image encoder), so a rank holds those for a moment instead of the whole model. A collective with a
    preset (rank 0 sends the tensors): every rank enters it with the same ``prefixes``."""
    import torch

    slots = [(module, leaf, f"{prefix}.{leaf}" if prefix else leaf)
             for prefix, module in model.named_modules()
             for leaf, param in module._parameters.items()
             if param is not None and any(f"{prefix}.{leaf}".startswith(p) for p in prefixes)]
    entries: dict[str, torch.Tensor] = {}
    for module, leaf, name in slots:
        meta = module._parameters[leaf]
        module._parameters[leaf] = torch.nn.Parameter(torch.empty_like(meta, device=ctx.device),
                                                      requires_grad=meta.requires_grad)
        entries[name] = module._parameters[leaf]
    wanted = {_plain(n): n for n in entries}
    try:
        with torch.no_grad():
            filled = set()
            for plain, tensor, _, _ in _source(weights, wanted, entries, lambda plain: None, ctx, only=True):
                if plain in wanted:  # a split tensor may give names outside the parts
                    entries[wanted[plain]].copy_(tensor)
                    filled.add(plain)
        if filled != set(wanted):
            raise RuntimeError(f"The weights left {len(set(wanted) - filled)} tensors of {list(prefixes)} "
                               f"unfilled: {sorted(set(wanted) - filled)[:5]}")
        yield
    finally:
        for module, leaf, _ in slots:
            real = module._parameters[leaf]
            module._parameters[leaf] = torch.nn.Parameter(real.detach().to("meta"), requires_grad=real.requires_grad)


def token_rows(model: nn.Module) -> dict[str, list[tuple[str, list[int]]]]:
    """peft's trainable-token tensors (``trainable.embeddings: new_tokens``), which copy rows of an embedding
    matrix when LoRA is injected (on meta: rows of nothing): {plain name of that matrix: [(name of the copy,
    its token ids)]}, for the delta parameter and the original-rows buffer of each adapter."""
    derived: dict[str, list[tuple[str, list[int]]]] = {}
    for prefix, module in model.named_modules():
        indices = getattr(module, "token_indices", None)
        delta = getattr(module, "trainable_tokens_delta", None)
        if not isinstance(indices, dict) or delta is None:
            continue
        base = _plain(f"{prefix}.base_layer.weight")
        for adapter, ids in indices.items():
            for kind in ("trainable_tokens_delta", "trainable_tokens_original"):
                if adapter in getattr(module, kind, {}):
                    derived.setdefault(base, []).append((f"{prefix}.{kind}.{adapter}", list(ids)))
    return derived


def _source(weights: Any, wanted: dict[str, str], entries: dict[str, torch.Tensor], rows_wanted: Any,
            ctx: DistributedContext, only: bool = False) -> Iterator[tuple[str, torch.Tensor, int, int]]:
    """``(plain name, tensor, first row, bytes)``: a checkpoint streams itself (``only``: just the groups
    giving a name in ``wanted``); a preset is sent tensor by tensor from rank 0 (every rank walks the names
    of ``wanted`` in the same order)."""
    import torch
    import torch.distributed as dist

    if hasattr(weights, "stream"):
        yield from weights.stream(rows_wanted, set(wanted) if only else None)
        return
    for plain, name in wanted.items():
        target = entries[name]
        dtype = weights.dtype if target.is_floating_point() else target.dtype
        if ctx.is_main:
            full = weights[plain].to(ctx.collective_device, dtype)
        else:
            full = torch.empty(target.shape, dtype=dtype, device=ctx.collective_device)
        if ctx.world_size > 1:
            dist.broadcast(full, src=0)
        yield plain, full, 0, _nbytes(full)


def _plain(name: str) -> str:
    """A parameter's name in the plain model (peft's LoRA wrapper holds the base weight in ``base_layer``,
    its trainable-token wrapper in ``token_adapter.base_layer``)."""
    return name.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", ".")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def unsharded_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are empty (meta device; requires_grad kept) and whose buffers
    are CPU copies (or empty where still on meta): the plain module that rank 0 fills with the gathered weights after FSDP training
    (:func:`gather_full_model`). Made before sharding, so it has no FSDP hooks; costs no device memory.
    The tokenizer is shared, not copied."""
    import copy

    import torch

    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for buffer in model.buffers():  # on meta (deferred init, peft's token rows): copied at the gather
        memo[id(buffer)] = buffer.detach().to("cpu", copy=True) if not buffer.is_meta else torch.empty_like(buffer)
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
    buffers = dict(model.named_buffers())
    for name, buffer in list(skeleton.named_buffers()):
        if buffer.is_meta:  # not in the state dict and empty in the skeleton: every rank holds it whole
            owner, _, leaf = name.rpartition(".")
            skeleton.get_submodule(owner)._buffers[leaf] = buffers[name].detach().to("cpu", copy=True)
    leftover = [n for n, p in skeleton.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"FSDP gather left parameters without weights: {leftover[:5]}")
    return skeleton
