"""FSDP2 sharding (``training.strategy: fsdp``): which blocks become shard groups, and the plain model back.

Each LLM decoder layer, each vision-tower layer, each SAM2 Hiera block, ``embed_tokens`` and ``lm_head`` is
its own shard group; the rest (projector, SAM2 neck / prompt encoder / mask decoder, ``text_hidden_fcs``) is
the root group. Weights, gradients and AdamW moments are split over the ranks; a group's weights are
gathered just before its forward (and again in backward) and freed after. This saves most for the
trainable state (fp32 weights + gradients + two AdamW moments: 16 bytes per trainable parameter, e.g. the
full embeddings and lm_head) and for the frozen weights during the step. Every rank still builds the whole
model before sharding, so the model in bf16 must fit on one GPU at start. Checkpoints and the final model
are gathered to full tensors (all ranks take part, rank 0 writes), so their files are the same as with DDP
or one device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
