"""LoRA on the LLM body of a native Sa2VA model, through peft.

The adapter is injected in place into ``model.vlm`` (the transformers InternVL model) with task_type None
and a target regex that only matches Linear layers inside the LLM body, so the vision tower, projector and
lm_head never get LoRA. Module names stay as they were (no PeftModel wrapper), which keeps the rest of
the code base unaware of peft. The adapter saves in peft's own format (``adapter_config.json`` +
``adapter_model.safetensors``, keys relative to ``model.vlm``), which ``peft.set_peft_model_state_dict``
and ``PeftModel.from_pretrained`` on the InternVL model both read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig
    from torch import nn

    from sa2va_pipeline.training.config import LoraSettings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def llm_linear_names(vlm: nn.Module, llm_prefix: str) -> list[str]:
    """Short names (q_proj, ...) of every nn.Linear inside the LLM body of ``vlm``."""
    from torch import nn

    llm = vlm.get_submodule(llm_prefix.rstrip("."))
    return sorted({name.rsplit(".", 1)[-1] for name, mod in llm.named_modules() if isinstance(mod, nn.Linear)})


def build_lora_config(
    vlm: nn.Module,
    settings: LoraSettings,
    llm_prefix: str = "model.language_model.",
    new_token_ids: list[int] | None = None,
) -> LoraConfig:
    """A peft LoraConfig whose targets are limited to the LLM body (regex on names relative to ``vlm``).

    ``new_token_ids`` turns on peft's trainable-token deltas for exactly those rows of both
    ``embed_tokens`` and ``lm_head`` (Sa2VA checkpoints are untied, so both must be named).
    """
    from peft import LoraConfig

    if settings.target_modules == "all-linear":
        short = llm_linear_names(vlm, llm_prefix)
    else:
        short = list(settings.target_modules)
    if not short:
        raise ValueError("training.lora.target_modules matches no Linear layer of the LLM.")
    regex = re.escape(llm_prefix) + r"(.*\.)?(" + "|".join(re.escape(s) for s in short) + ")"
    kwargs: dict[str, Any] = {}
    if new_token_ids:
        kwargs["trainable_token_indices"] = {"embed_tokens": list(new_token_ids), "lm_head": list(new_token_ids)}
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=regex,
        bias="none",
        task_type=None,
        **kwargs,
    )


def inject_lora(vlm: nn.Module, config: LoraConfig) -> None:
    """Inject LoRA layers (and trainable-token deltas, if configured) into ``vlm`` in place.

    Into a model whose weights are on ``meta`` (FSDP's deferred init, model/deferred_init.py) the LoRA
    matrices are drawn as always (on the CPU, from the global generator, cast to the base layer's dtype) and
    kept on the CPU, where peft would send them to ``meta`` with their base layer and lose the values: the
    same seed gives the same LoRA init with and without meta init."""
    from peft import inject_adapter_in_model

    with _initial_adapters_kept_beside_meta(vlm):
        inject_adapter_in_model(config, vlm, adapter_name="default")
    n_lora = sum(1 for name, _ in vlm.named_parameters() if ".lora_A." in name)
    if n_lora == 0:
        raise ValueError(f"LoRA target regex {config.target_modules!r} matched no layer of the LLM.")
    fuse_lora_forward(vlm)


def fuse_lora_forward(module: nn.Module) -> int:
    """Give every plain peft LoRA Linear (one adapter, no variant, an ``nn.Linear`` base) a forward whose
    low-rank update is one in-place ``addmm_`` on the base output (:mod:`.lora_linear`):
    ``base(x) + scaling * B(A(dropout(x)))`` with the scaling and the sum in the GEMM's epilogue, instead of
    peft's separate multiply and add over the whole output (and its cast of the input to the adapter's dtype).
    Same function, one rounding fewer; anything else falls back to peft's own forward at call time. Returns
    how many layers got it."""
    import types

    from peft.tuners.lora.layer import Linear as LoraLinear
    from torch import nn

    count = 0
    for sub in module.modules():
        if isinstance(sub, LoraLinear) and isinstance(sub.get_base_layer(), nn.Linear):
            sub.forward = types.MethodType(_fused_lora_linear_forward, sub)
            count += 1
    return count


def _fused_lora_linear_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    import torch.nn.functional as F

    from .lora_linear import lora_linear

    active = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
            or active[0] not in self.lora_A or active[0] in self.lora_variant):
        return type(self).forward(self, x, *args, **kwargs)
    name, base = active[0], self.base_layer
    low = F.linear(self.lora_dropout[name](x), self.lora_A[name].weight)
    return lora_linear(x, base.weight, base.bias, low, self.lora_B[name].weight, self.scaling[name])


@contextmanager
def _initial_adapters_kept_beside_meta(vlm: nn.Module) -> Iterator[None]:
    """peft draws each LoRA pair on the CPU (``reset_lora_parameters``), then moves it to its base layer's
    device and dtype. For base layers on ``meta`` the drawn values are recorded as they are drawn and, after
    the injection, put back as CPU parameters in the dtype peft gave them (the base layer's)."""
    import torch
    from peft.tuners.lora import LoraLayer
    from torch import nn

    if not any(p.is_meta for p in vlm.parameters()):
        yield
        return
    drawn: dict[int, list[tuple[nn.Module, str, torch.Tensor]]] = {}
    original = LoraLayer.reset_lora_parameters

    def reset(self: LoraLayer, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        original(self, adapter_name, *args, **kwargs)
        record = drawn.setdefault(id(self), [])
        for part in self.adapter_layer_names:
            modules = getattr(self, part, {})
            if adapter_name in modules and isinstance(modules[adapter_name], nn.Module):
                sub = modules[adapter_name]
                record += [(sub, n, p.detach().clone()) for n, p in sub.named_parameters(recurse=False)]

    LoraLayer.reset_lora_parameters = reset  # type: ignore[method-assign]
    try:
        yield
    finally:
        LoraLayer.reset_lora_parameters = original  # type: ignore[method-assign]
    for records in drawn.values():
        for sub, name, value in records:
            now = sub._parameters[name]
            if now is not None and now.is_meta:
                sub._parameters[name] = nn.Parameter(value.to(now.dtype), requires_grad=now.requires_grad)


def adapter_state_dict(vlm: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors in peft's saved-key format (no ``.default``), relative to ``vlm``."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(vlm, adapter_name="default").items()}


def save_adapter(vlm: nn.Module, directory: Path) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (peft format) into ``directory``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = vlm.peft_config["default"]
    config_dict = config.to_dict()
    # JSON cannot hold sets; peft stores target_modules as str here, but be safe with lists/sets.
    for key, value in list(config_dict.items()):
        if isinstance(value, set):
            config_dict[key] = sorted(value)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config_dict, indent=2, default=str))
    tensors = {k: v.cpu() for k, v in adapter_state_dict(vlm).items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def load_adapter(vlm: nn.Module, directory: Path) -> None:
    """Inject the adapter saved in ``directory`` into ``vlm`` and load its weights (strict on adapter keys)."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(directory))
    config.inference_mode = False
    inject_lora(vlm, config)
    weights = load_file(str(directory / ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(vlm, weights, adapter_name="default")
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"Adapter in {directory} has keys the model does not: {unexpected[:5]}")


def merge_lora(vlm: nn.Module) -> None:
    """Fold every LoRA layer / trainable-token delta into its base weight and remove the peft wrappers."""
    from sa2va_pipeline.model.checkpoint import peft_wrappers, unwrap_merged

    for name in peft_wrappers(vlm):  # outermost wrappers only: their inner modules go with them
        parent_name, _, child = name.rpartition(".")
        parent = vlm.get_submodule(parent_name) if parent_name else vlm
        setattr(parent, child, unwrap_merged(vlm.get_submodule(name)))
    if hasattr(vlm, "peft_config"):
        del vlm.peft_config
