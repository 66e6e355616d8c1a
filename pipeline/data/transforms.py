"""The device transforms: a batch's normalization and augmentation, on the device, in one batched operation.

Images stay uint8 until a batch is on the device, where it is normalized (and augmented) at once: no
per-sample Python on the hot path. `Normalize` is a module, so a served model carries its statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import AugmentConfig
from pipeline.data.store import DatasetSpec

__all__ = ["Normalize", "augment", "normalizer"]


class Normalize(nn.Module):
    """uint8 images -> float in [0, 1] -> standardized per channel; features standardized per column.

    A module, so that the statistics move with `.to(device)` and travel inside a served model.
    """

    # Buffers, registered in __init__: declared here so that their type is Tensor, not nn.Module's
    # `Tensor | Module` for any attribute it holds.
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, spec: DatasetSpec, enabled: bool) -> None:
        super().__init__()
        shape = (1, -1, 1, 1) if spec.is_image else (1, -1)
        self.enabled = enabled
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std if self.enabled else x


def normalizer(spec: DatasetSpec, enabled: bool, device: torch.device) -> Normalize:
    return Normalize(spec, enabled).to(device)  # the statistics are made once, not per batch


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random flip, rotation and resized crop for a whole batch at once, as one affine warp per sample."""
    if x.dim() != 4 or (not cfg.hflip and cfg.rotation_degrees == 0 and cfg.crop_min_scale == 1.0):
        return x
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=x.device) * (high - low) + low

    angle = torch.deg2rad(uniform(-cfg.rotation_degrees, cfg.rotation_degrees))
    scale = uniform(cfg.crop_min_scale, 1.0).sqrt()  # side of a crop covering that fraction of the area
    shift_x, shift_y = (uniform(-1, 1) * (1 - scale) for _ in range(2))
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(n, device=x.device)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift_x], 1), torch.stack([sin * flip, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
