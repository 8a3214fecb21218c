"""Weighted, masked affinity losses on logits (weights carry class balance and the mask)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _weighted_mean(per_voxel: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # Normalising by the weight sum keeps the loss scale independent of crop size and of how
    # many voxels are masked (a crop that is mostly unknown does not shrink the gradient).
    return (per_voxel * weights).sum() / weights.sum().clamp_min(1e-6)


def weighted_bce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Class-weighted binary cross-entropy, computed in fp32 from logits for stability."""
    per_voxel = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return _weighted_mean(per_voxel, weights)


def weighted_mse(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Class-weighted squared error of the sigmoid output (the superhuman paper's option)."""
    return _weighted_mean((torch.sigmoid(logits.float()) - target) ** 2, weights)


LOSSES = {"bce": weighted_bce, "mse": weighted_mse}
