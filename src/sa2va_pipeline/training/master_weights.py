"""bf16 compute weights whose fp32 masters live in the optimiser (``training.master_weights: optimizer``).

With fp32 trainable parameters under bf16 autocast, every use of a trainable tensor is a cast: each forward
casts the LoRA matrices and the full embeddings to bf16, each backward casts their gradients back, and since
the trainable embedding returns fp32, the LLM's whole residual stream runs in fp32 (every Linear casts its
input again). On an H200 those copies were a fifth of the GPU time of a sa2va-internvl3-2b step.

Here the model computes with bf16 copies of the trainable tensors, as the official DeepSpeed bf16 recipe does,
and the optimiser keeps the fp32 masters. Per parameter group, the bf16 weights, their bf16 gradients, the fp32
masters and the AdamW moments are each one flat buffer (the parameters and their ``.grad`` are views into
them), so a step is: the gradient norm in one reduction, then per chunk of the flat buffer one bf16 -> fp32
gradient conversion, one fused AdamW update (gradient clipping folded in as its gradient scale) and one copy
of the masters back into the bf16 weights. The AdamW arithmetic is torch's own fused kernel on fp32 masters
and fp32 gradients, as with ``training.master_weights: model``.

Gradients are accumulated in bf16 over micro-batches (``grad_accumulation`` > 1), so ``auto`` uses this path
only without accumulation, on one CUDA device, under bf16 autocast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

CHUNK = 1 << 26  # elements per AdamW call: bounds the temporary fp32 gradient at 256 MB


class MasterWeightAdamW:
    """AdamW over fp32 masters of bf16 model parameters held in flat buffers (see the module docstring).

    Has the parts of ``torch.optim.Optimizer`` the training loop and checkpoints use: ``param_groups`` (the
    model's parameters, ``lr`` set per step), ``state`` (per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``
    as views into the flat buffers), ``zero_grad``, ``step``; plus :meth:`clip_grad_norm_`, ``masters`` (the
    fp32 master of each parameter, what checkpoints save) and :meth:`masters_into_model`.
    """

    def __init__(self, groups: list[dict[str, Any]], betas: tuple[float, float], weight_decay: float,
                 eps: float = 1e-8, compute_dtype: torch.dtype | None = None) -> None:
        import torch

        compute_dtype = compute_dtype or torch.bfloat16
        self.betas, self.weight_decay, self.eps = tuple(betas), float(weight_decay), float(eps)
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        self.masters: dict[torch.Tensor, torch.Tensor] = {}
        self._flat: list[dict[str, Any]] = []
        self._grad_scale: torch.Tensor | None = None
        # set before step() as GradScaler does for torch's AdamW: a device tensor, 1 skips the update
        self.found_inf: torch.Tensor | None = None
        for group in groups:
            params = list(group["params"])
            device = params[0].device
            total = sum(p.numel() for p in params)
            flat = {
                "master": torch.empty(total, dtype=torch.float32, device=device),
                "weight": torch.empty(total, dtype=compute_dtype, device=device),
                "grad": torch.zeros(total, dtype=compute_dtype, device=device),
                "exp_avg": torch.zeros(total, dtype=torch.float32, device=device),
                "exp_avg_sq": torch.zeros(total, dtype=torch.float32, device=device),
                "step": torch.zeros((), dtype=torch.float32, device=device),
                "views": [],
                "grad_ptrs": [],
            }
            offset = 0
            with torch.no_grad():
                for p in params:
                    n = p.numel()
                    flat["master"][offset : offset + n].copy_(p.detach().reshape(-1))
                    flat["views"].append((p, slice(offset, offset + n)))
                    offset += n
                flat["weight"].copy_(flat["master"])
            for p, where in flat["views"]:
                p.data = flat["weight"][where].view(p.shape)
                p.grad = flat["grad"][where].view(p.shape)
                flat["grad_ptrs"].append(p.grad.data_ptr())
                self.masters[p] = flat["master"][where].view(p.shape)
                self.state[p] = {"step": flat["step"], "exp_avg": flat["exp_avg"][where].view(p.shape),
                                 "exp_avg_sq": flat["exp_avg_sq"][where].view(p.shape)}
            self.param_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params,
                                      "betas": self.betas, "weight_decay": self.weight_decay, "eps": self.eps})
            self._flat.append(flat)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffers (the gradients stay views into them, whatever ``set_to_none``)."""
        for flat in self._flat:
            flat["grad"].zero_()
            for (p, where), ptr in zip(flat["views"], flat["grad_ptrs"]):
                if p.grad is None or p.grad.data_ptr() != ptr:
                    p.grad = flat["grad"][where].view(p.shape)
        self._grad_scale = None

    def _adopt_stray_gradients(self) -> None:
        """A gradient that is not a view of the flat buffer (someone set ``.grad`` to None and backward made
        a new one) is copied in, so that no gradient is ever silently left out of the update."""
        import torch

        with torch.no_grad():
            for flat in self._flat:
                for (p, where), ptr in zip(flat["views"], flat["grad_ptrs"]):
                    grad = p.grad
                    if grad is not None and grad.data_ptr() == ptr:
                        continue
                    view = flat["grad"][where]
                    if grad is None:
                        view.zero_()
                    else:
                        view.copy_(grad.reshape(-1))
                    p.grad = view.view(p.shape)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The global gradient norm (fp32 accumulation over the bf16 gradients); the clipping factor
        ``torch.nn.utils.clip_grad_norm_`` would apply is folded into the next :meth:`step`."""
        import torch

        self._adopt_stray_gradients()
        norms = [torch.linalg.vector_norm(flat["grad"], dtype=torch.float32) for flat in self._flat]
        total = torch.linalg.vector_norm(torch.stack(norms)) if len(norms) > 1 else norms[0]
        # clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); fused AdamW divides by grad_scale
        if max_norm and max_norm < float("inf"):
            self._grad_scale = torch.clamp((total + 1e-6) / float(max_norm), min=1.0)
        return total

    def step(self) -> None:
        """One AdamW update of the masters (chunk by chunk), then the bf16 weights are refreshed from them.
        Where ``found_inf`` is 1 the update is skipped on the device (masters, moments and step count stay)."""
        import torch

        if self._grad_scale is None:
            self._adopt_stray_gradients()
        beta1, beta2 = self.betas
        with torch.no_grad():
            for group, flat in zip(self.param_groups, self._flat):
                flat["step"].add_(1)
                total = flat["master"].numel()
                for start in range(0, total, CHUNK):
                    part = slice(start, min(total, start + CHUNK))
                    torch._fused_adamw_(
                        [flat["master"][part]], [flat["grad"][part].float()], [flat["exp_avg"][part]],
                        [flat["exp_avg_sq"][part]], [], [flat["step"]], lr=float(group["lr"]), beta1=beta1,
                        beta2=beta2, weight_decay=self.weight_decay, eps=self.eps, amsgrad=False,
                        maximize=False, grad_scale=self._grad_scale, found_inf=self.found_inf,
                    )
                    flat["weight"][part].copy_(flat["master"][part])
                if self.found_inf is not None:
                    flat["step"].sub_(self.found_inf)
        self._grad_scale = None

    def masters_into_model(self) -> None:
        """Hand the fp32 masters to the model as its trainable weights (after training: the trained model
        is the same as with ``master_weights: model``); the optimiser must not step afterwards."""
        for flat in self._flat:
            for p, _ in flat["views"]:
                p.data = self.masters[p]
                p.grad = None
        self._flat = []


def use_master_weights(setting: str, device: torch.device, amp_dtype: Any, grad_accumulation: int,
                       distributed: bool) -> bool:
    """Whether the optimiser keeps the masters (``training.master_weights``): ``optimizer`` asks for it,
    ``model`` refuses it, ``auto`` takes it on one CUDA device under bf16 autocast without accumulation."""
    import torch

    if setting == "model":
        return False
    usable = amp_dtype == torch.bfloat16 and not distributed
    if setting == "optimizer":
        if not usable:
            raise ValueError("training.master_weights: optimizer needs bf16 precision (training.precision: bf16, "
                             "or auto on a GPU) and one device; use auto or model here.")
        return True
    return usable and device.type == "cuda" and grad_accumulation == 1
