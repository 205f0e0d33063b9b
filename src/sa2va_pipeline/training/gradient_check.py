"""Proof that training trains: gradients reach the parts that must learn, and frozen parts stay put.

Earlier attempts trained through a no-grad inference path for hours without changing a weight. This check
runs once, around the first optimiser step: before the step it reads each group's gradient norm, after
the step it compares per-tensor checksums with those taken before it.
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


def _checksum(t: torch.Tensor) -> tuple[float, float]:
    import torch

    with torch.no_grad():
        t64 = t.detach().double()
        return float(t64.sum()), float((t64 * t64).sum())


class GradientReachCheck:
    """Call :meth:`before_step` after backward and before ``optimizer.step()``, then :meth:`after_step`."""

    def __init__(self, params_by_group: dict[str, list[tuple[str, torch.Tensor]]], required: list[str]):
        self.params_by_group = params_by_group
        self.required = list(required)
        self.report = GradientReport()
        self._sums: dict[str, tuple[float, float]] = {}

    def before_step(self) -> None:
        """Record gradient norms of trainable groups and checksums of every tensor."""
        for group, params in self.params_by_group.items():
            total, any_trainable = 0.0, False
            for name, p in params:
                self._sums[name] = _checksum(p)
                if p.requires_grad:
                    any_trainable = True
                    if p.grad is not None:
                        total += float(p.grad.detach().double().pow(2).sum())
            if any_trainable:
                self.report.grad_norm[group] = total**0.5

    def after_step(self) -> GradientReport:
        """Compare checksums; raise :class:`GradientReachError` when a required group got no gradient or
        did not change, or a frozen tensor changed."""
        for group, params in self.params_by_group.items():
            changed = False
            for name, p in params:
                moved = _checksum(p) != self._sums[name]
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
