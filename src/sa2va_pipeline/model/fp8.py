"""fp8 matmuls for prediction (Hopper / Ada GPUs): the ``nn.Linear`` layers of chosen parts as
:class:`Fp8Linear`.

Inference only, off by default (``prediction.fp8``). Each converted layer holds its weight in float8 e4m3 with
one scale per output channel (row amax / 448, computed once); its forward quantises the input per row (per
token) on the fly and runs ``torch._scaled_mm`` with both row-wise scales, bias in bf16, output in bf16 (cast
back to the input's dtype). ``quantize_linears_fp8(..., scaling="tensor")`` uses one scale per weight and per
input instead, and ``fast_accum=True`` Hopper's faster, less precise fp8 accumulation. Layers whose in/out
features are not multiples of 16 (``_scaled_mm``'s rule) stay as they are and are listed in the summary.

Parts that may be converted (:data:`PARTS`), where nearly all of prediction's matmul FLOPs are:
- ``sam2_image_encoder``: the SAM2 Hiera trunk (qkv, proj, MLPs; its FPN neck is convolutions, left alone);
- ``vision_tower``: InternViT (Qwen-VL: the vision blocks; their mergers are the projector, never converted);
- ``llm``: the LLM body's attention and MLP projections.
Never converted, because fp8 would cost precision where the model is small or sensitive and saves little
time: the embeddings and ``lm_head``, the projector (vision -> LLM; Qwen-VL's mergers), ``text_hidden_fcs``
(the [SEG] prompt), SAM2's mask decoder and prompt encoder (a few small matmuls that shape the mask logits
directly).

How far fp8 maps agree with bf16 ones is measured, not assumed: ``benchmarks/predict_throughput.py --fp8``
(see benchmarks/RESULTS.md; on an H200, sa2va-internvl3-2b compiled with all three parts, fp8 was slower than
bf16: 63 against 77 images/s from files; tensor-wise with fast accumulation 88 against 89). Layer by layer
(``benchmarks/fp8_gemm.py``) the fp8 matmuls save a third of the Linear time, but quantising the activations
costs more. The quantisation is only cheap when fused, so use it with ``Sa2VA.compile_for_inference``
(convert first, then compile).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sa2va_pipeline.errors import UserError

logger = logging.getLogger(__name__)

# part name -> parameter group of sa2va_pipeline.training.parameter_groups
PARTS = {"sam2_image_encoder": "sam2_image_encoder", "vision_tower": "vision_tower", "llm": "llm_base"}
DEFAULT_PARTS = tuple(PARTS)
FP8_MAX = 448.0  # largest finite float8 e4m3fn value
SETTING = "prediction.fp8"
SCALINGS = ("row", "tensor")  # one scale per token and output channel, or one per tensor


def fp8_parts_setting(value: Any, setting: str = SETTING) -> tuple[str, ...]:
    """The parts a user's fp8 setting asks for: ``false``/``null``/``[]`` = none (off), ``true`` = all of
    :data:`PARTS`, or a list (or comma-separated string) of part names."""
    if value is None or value is False:
        return ()
    if value is True:
        return DEFAULT_PARTS
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UserError(
            f"{setting} must be false, true or a list of parts among {list(PARTS)}; got {value!r}."
        )
    unknown = [v for v in value if v not in PARTS]
    if unknown:
        raise UserError(f"{setting} names unknown part(s) {unknown}; the parts are {list(PARTS)}.")
    return tuple(dict.fromkeys(value))


def require_fp8_support(device: torch.device | str, setting: str = SETTING) -> None:
    """Refuse (``UserError``) a device without fp8 ``torch._scaled_mm``: CUDA below compute capability 8.9
    (before Ada/Hopper), or a torch whose kernel rejects row-wise scales there. CPU works (slowly: tests)."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise UserError(f"{setting} asks for fp8 matmuls, which {device} lacks; set {setting}: false.")
    name = torch.cuda.get_device_name(device)
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise UserError(
            f"{setting} asks for fp8 matmuls, but {device} ({name}, compute capability "
            f"{capability[0]}.{capability[1]}) has none: they need compute capability 8.9 or more (Ada, "
            f"Hopper). Set {setting}: false."
        )
    try:  # the exact call Fp8Linear makes, on a tiny problem
        w = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
        ones = torch.ones(16, 1, device=device)
        torch._scaled_mm(w, w.t(), scale_a=ones, scale_b=ones.t().contiguous(),
                         bias=torch.zeros(16, device=device, dtype=torch.bfloat16), out_dtype=torch.bfloat16)
    except RuntimeError as error:
        raise UserError(
            f"{setting}: torch {torch.__version__} cannot run row-wise scaled fp8 matmuls on {device} "
            f"({name}): {error}. Set {setting}: false."
        ) from error


def quantize_rows(x: torch.Tensor, scaling: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """Float8 e4m3 values and fp32 scales of a 2-D tensor (amax / 448): one scale per row, [rows, 1]
    (``scaling="row"``), or one for the whole tensor, a 0-d tensor (``"tensor"``)."""
    if scaling not in SCALINGS:
        raise ValueError(f"fp8 scaling must be one of {SCALINGS}, got {scaling!r}")
    amax = x.abs().amax(dim=-1, keepdim=True) if scaling == "row" else x.abs().amax()
    scale = amax.float().clamp(min=1e-12) / FP8_MAX
    # row-major, as _scaled_mm wants its first operand (a transposed input would keep its layout)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous(), scale


class Fp8Linear(nn.Module):
    """``nn.Linear`` for inference with fp8 matmuls: weight [N, K] float8 e4m3 with scales [1, N] (row-wise,
    fixed), input quantised per row in the forward; any leading shape; output in the input's dtype.

    Weight, scales and bias are buffers, not parameters: no optimiser can reach them, and a forward that
    would need autograd through the layer raises. Convert after any ``.to(dtype)`` (it would cast the fp8
    buffers).
    """

    def __init__(
        self,
        weight_fp8: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        fast_accum: bool = False,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        self.scaling = "tensor" if weight_scale.ndim == 0 else "row"
        self.fast_accum = fast_accum
        self.register_buffer("weight_fp8", weight_fp8)  # [N, K] row-major: .t() is the column-major [K, N]
        self.register_buffer("weight_scale", weight_scale)  # [1, N] fp32 (row-wise) or 0-d (tensor-wise)
        self.register_buffer("bias", bias)  # [N] bf16 or None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scaling: str = "row", fast_accum: bool = False) -> Fp8Linear:
        """The fp8 copy of ``linear``'s weight (a scale per output channel, or one for the weight) and its
        bias in bf16."""
        with torch.no_grad():
            weight, scale = quantize_rows(linear.weight.detach(), scaling)
            bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        scale = scale.reshape(1, -1).contiguous() if scaling == "row" else scale
        return cls(weight, scale, bias, fast_accum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                "Fp8Linear is for inference only (torch.no_grad / inference_mode): it got an input that "
                "requires grad. Training must use the bf16 model, not one converted by quantize_linears_fp8."
            )
        leading = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 0:
            return x.new_zeros(*leading, self.out_features)
        x_fp8, x_scale = quantize_rows(rows, self.scaling)
        out = torch._scaled_mm(
            x_fp8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale, bias=self.bias,
            out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum,
        )
        return out.to(x.dtype).reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, "
                f"scaling={self.scaling}, fast_accum={self.fast_accum}")


def quantize_linears_fp8(
    model: nn.Module,
    parts: Sequence[str] = DEFAULT_PARTS,
    setting: str = SETTING,
    scaling: str = "row",
    fast_accum: bool = False,
) -> dict[str, Any]:
    """Replace, in place, the ``nn.Linear`` layers of ``parts`` (see :data:`PARTS`) of an eval-mode Sa2VA by
    :class:`Fp8Linear`; returns (and logs) the summary.

    Summary: ``{"parts": [...], "converted": {part: {"layers", "parameters"}}, "skipped": [{"layer", "part",
    "reason"}] (chosen parts, layers left in their dtype), "kept": {group: {"layers", "parameters"}}`` (Linear
    layers of the parts never converted). Refused (``UserError`` naming ``setting``) on a device without fp8
    matmuls; ``ValueError`` for a model in training mode or already compiled (convert first, then compile).
    """
    from sa2va_pipeline.training.parameter_groups import find_layout, group_of

    parts = fp8_parts_setting(list(parts), setting)
    if model.training:
        raise ValueError("quantize_linears_fp8 is for inference only: call model.eval() first (never train).")
    layout = find_layout(model)
    wanted = {PARTS[p]: p for p in parts}
    chosen: list[tuple[str, nn.Linear, str]] = []
    converted = {p: {"layers": 0, "parameters": 0} for p in parts}
    summary: dict[str, Any] = {"parts": list(parts), "converted": converted, "skipped": [], "kept": {}}
    for name, module in model.named_modules():
        compiled = getattr(module, "_compiled_call_impl", None) is not None
        if compiled and group_of(f"{name}.", layout) in wanted:
            raise ValueError(f"{name} is compiled: call quantize_linears_fp8 before compile_for_inference.")
        if not isinstance(module, nn.Linear):
            continue
        group = group_of(f"{name}.weight", layout)
        if group not in wanted:
            kept = summary["kept"].setdefault(group, {"layers": 0, "parameters": 0})
            kept["layers"] += 1
            kept["parameters"] += sum(p.numel() for p in module.parameters(recurse=False))
            continue
        reason = None
        if type(module) is not nn.Linear:
            reason = f"{type(module).__name__} (a Linear subclass whose weight other code may read)"
        elif "merger" in name:
            reason = "a projector (Qwen-VL DeepStack merger)"
        elif module.in_features % 16 or module.out_features % 16:
            reason = f"in/out features {module.in_features}x{module.out_features} not multiples of 16"
        if reason:
            summary["skipped"].append({"layer": name, "part": wanted[group], "reason": reason})
        else:
            chosen.append((name, module, wanted[group]))
    for device in {m.weight.device for _, m, _ in chosen}:
        require_fp8_support(device, setting)
    while chosen:  # popped: each bf16 weight is freed as soon as its fp8 copy is in place
        name, module, part = chosen.pop(0)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, Fp8Linear.from_linear(module, scaling, fast_accum))
        converted[part]["layers"] += 1
        converted[part]["parameters"] += sum(p.numel() for p in module.parameters(recurse=False))
    logger.info(
        "fp8: converted %s; %d layer(s) of these parts skipped%s; never converted: %s",
        ", ".join(f"{p} {c['layers']} layers ({c['parameters'] / 1e6:.1f}M parameters)"
                  for p, c in converted.items()) or "nothing",
        len(summary["skipped"]),
        "".join(f"; {s['layer']}: {s['reason']}" for s in summary["skipped"][:5]),
        ", ".join(f"{g} {k['layers']} layers" for g, k in summary["kept"].items()) or "none",
    )
    return summary
