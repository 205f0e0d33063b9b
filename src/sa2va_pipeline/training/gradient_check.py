"""Proof that training trains: gradients reach the parts that must learn, and frozen parts stay put.

Earlier attempts trained through a no-grad inference path for hours without changing a weight. This check
runs once, around the first optimiser step: before the step it reads each group's gradient norm, after
the step it compares per-tensor checksums with those taken before it.

Under FSDP parameters and gradients are sharded DTensors: each rank sums its own shard and one all-reduce
per call adds the shards up, so every rank sees the same global numbers (and raises together).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class GradientReachError(RuntimeError):
    """The loss does not reach (or does not change) parts of the model that are meant to train."""


@dataclass
class GradientReport:
    """What the first optimiser step did, per group."""

    grad_norm: dict[str, float] = field(default_factory=dict)
    changed: dict[str, bool] = field(default_factory=dict)
    frozen_changed: list[str] = field(default_factory=list)


def _local_sums(tensors: list[torch.Tensor | None]) -> tuple[list[tuple[float, float]], list[bool]]:
    """(sum, sum of squares) in float64 of each tensor (zeros for None), and which ones are sharded."""
    import torch
    from torch.distributed.tensor import DTensor

    sums, sharded = [], []
    with torch.no_grad():
        for t in tensors:
            is_dtensor = isinstance(t, DTensor)
            local = t.to_local() if is_dtensor else t
            if local is None:
                sums.append((0.0, 0.0))
            else:
                t64 = local.detach().double()
                sums.append((float(t64.sum()), float((t64 * t64).sum())))
            sharded.append(is_dtensor)
    return sums, sharded


def _global_sums(tensors: list[torch.Tensor | None]) -> list[tuple[float, float]]:
    """:func:`_local_sums` with the shards of sharded tensors added up over ranks (one all-reduce)."""
    import torch

    sums, sharded = _local_sums(tensors)
    rows = [i for i, s in enumerate(sharded) if s]
    if rows:
        import torch.distributed as dist

        # NCCL reduces on the GPU only; gloo on the CPU
        device = tensors[rows[0]].device if dist.get_backend() == "nccl" else torch.device("cpu")
        packed = torch.tensor([sums[i] for i in rows], dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        for i, row in zip(rows, packed.cpu().tolist()):
            sums[i] = (row[0], row[1])
    return sums


class GradientReachCheck:
    """Call :meth:`before_step` after backward and before ``optimizer.step()``, then :meth:`after_step`."""

    def __init__(self, params_by_group: dict[str, list[tuple[str, torch.Tensor]]], required: list[str],
                 masters: dict[torch.Tensor, torch.Tensor] | None = None):
        self.params_by_group = params_by_group
        self.masters = masters or {}  # fp32 masters of bf16 compute weights: a 4e-5 update may not move bf16
        self.required = list(required)
        self.report = GradientReport()
        self._sums: dict[str, tuple[float, float]] = {}

    def before_step(self) -> None:
        """Record gradient norms of trainable groups and checksums of every tensor."""
        named = [(group, name, p) for group, params in self.params_by_group.items() for name, p in params]
        weights = _global_sums([self.masters.get(p, p) for _, _, p in named])
        grads = _global_sums([p.grad if p.requires_grad else None for _, _, p in named])
        totals: dict[str, float] = {}
        for (group, name, p), checksum, (_, grad_sq) in zip(named, weights, grads):
            self._sums[name] = checksum
            if p.requires_grad:
                totals[group] = totals.get(group, 0.0) + grad_sq
        self.report.grad_norm = {group: total**0.5 for group, total in totals.items()}

    def after_step(self) -> GradientReport:
        """Compare checksums; raise :class:`GradientReachError` when a required group got no gradient or
        did not change, or a frozen tensor changed."""
        named = [(group, name, p) for group, params in self.params_by_group.items() for name, p in params]
        now = dict(zip([name for _, name, _ in named], _global_sums([self.masters.get(p, p) for _, _, p in named])))
        for group, params in self.params_by_group.items():
            changed = False
            for name, p in params:
                moved = now[name] != self._sums[name]
                if p.requires_grad:
                    changed |= moved
                elif moved:
                    self.report.frozen_changed.append(name)
            if group in self.report.grad_norm:
                self.report.changed[group] = changed
        problems = []
        for group in self.required:
            if group not in self.report.grad_norm:
                problems.append(f"{group} (nothing in it is trainable)")
            elif not self.report.grad_norm[group] > 0:
                problems.append(f"{group} (zero gradient: the loss does not reach it)")
            elif not self.report.changed[group]:
                problems.append(f"{group} (had gradient but did not change)")
        unchanged = [
            g
            for g, c in self.report.changed.items()
            if g not in self.required and (not c or not self.report.grad_norm[g] > 0)
        ]
        if problems or self.report.frozen_changed:
            msg = []
            if problems:
                msg.append("the training loss must reach " + ", ".join(problems))
            if self.report.frozen_changed:
                msg.append(f"frozen tensors changed: {self.report.frozen_changed[:5]}")
            if unchanged:
                msg.append(f"also unchanged: {unchanged}")
            raise GradientReachError(
                "Gradient-reach check failed after the first optimiser step: "
                + "; ".join(msg)
                + ". Check training.trainable and that the training forward keeps gradients (no no_grad / "
                "inference_mode / detach on the path from the loss to these parts)."
            )
        if unchanged:
            import logging

            logging.getLogger(__name__).warning(
                "Trainable groups without gradient or unchanged by the first step: %s", unchanged
            )
        return self.report
