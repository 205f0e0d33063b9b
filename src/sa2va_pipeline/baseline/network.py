"""The baseline network: MONAI's ``DynUNet``, the architecture nnU-Net configures, at widths a CPU can train.

Why DynUNet and not BasicUNet: it is the network behind nnU-Net, the baseline reviewers in medical
segmentation expect (instance norm, leaky ReLU, strided convolutions down, transposed convolutions up, optional
residual blocks), and its depth and widths are plain lists, so the same code runs at nnU-Net's widths
(32 ... 320) on a GPU and at tiny ones on the sample. What we do NOT copy from nnU-Net: its automatic
configuration, heavy augmentation and 1,000-epoch schedule (a wall-clock budget sizes training here).

One output channel per phrase (multi-label, sigmoid per channel): objects of different phrases may overlap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class NetworkConfig:
    """DynUNet settings (``baseline.network``); ``filters`` sets the depth: one entry per resolution level."""

    filters: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    kernel_size: int = 3
    res_block: bool = False
    norm: str = "instance"
    dropout: float | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "NetworkConfig":
        """Build from ``baseline.network``; unknown keys are an error that names them."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"baseline.network: unknown key(s) {unknown}; known: {sorted(known)}")
        config = cls(**{**params, "filters": [int(f) for f in params.get("filters", cls().filters)]})
        if len(config.filters) < 2:
            raise ValueError(f"baseline.network.filters needs >= 2 levels, got {config.filters}")
        return config

    @property
    def size_multiple(self) -> int:
        """Input sides must be a multiple of this (each level below the first halves the resolution)."""
        return 2 ** (len(self.filters) - 1)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able settings (stored with the weights)."""
        return asdict(self)


def build_network(config: NetworkConfig, in_channels: int, out_channels: int) -> "nn.Module":
    """A 2-D DynUNet: ``in_channels`` (RGB: 3) -> ``out_channels`` logits (one per phrase), same size."""
    from monai.networks.nets import DynUNet

    levels = len(config.filters)
    return DynUNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=[config.kernel_size] * levels,
        strides=[1] + [2] * (levels - 1),
        upsample_kernel_size=[2] * (levels - 1),
        filters=list(config.filters),
        dropout=config.dropout,
        norm_name=config.norm,
        res_block=config.res_block,
    )
