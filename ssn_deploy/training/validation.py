"""Validation: predict a held-out slab whole, segment it, score VOI/ARAND against its labels."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ssn_deploy.metrics import evaluate
from ssn_deploy.models.unet import UNet3d

Segmenter = Callable[[np.ndarray], "np.ndarray | Sequence[np.ndarray]"]


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU (AVX512-BF16) or CUDA; a no-op for ``amp == "none"``."""
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_whole(
    model: UNet3d, raw: np.ndarray, device: torch.device, amp: str = "none"
) -> np.ndarray:
    """Affinities ``float32[C, Z, Y, X]`` for a normalised ``float32[Z, Y, X]`` region.

    The region is reflect-padded up to the model's granularity (never read beyond, so a
    neighbouring test slab stays unseen) and the padding is cropped off again.
    """
    g = model.granularity
    pad = [(0, -s % m) for s, m in zip(raw.shape, g, strict=True)]
    x = np.pad(raw, pad, mode="reflect") if any(p for _, p in pad) else raw
    was_training = model.training
    model.eval()
    try:
        with autocast(device, amp):
            out = model(torch.from_numpy(np.ascontiguousarray(x))[None, None].to(device))
    finally:
        model.train(was_training)
    z, y, xx = raw.shape
    return out[0, :, :z, :y, :xx].float().cpu().numpy()


METRICS = ("voi", "voi_split", "voi_merge", "arand", "cremi_score")


def score_by_threshold(
    affs: np.ndarray,
    gt: np.ndarray,
    segmenter: Segmenter,
    thresholds: Sequence[float],
    ignore_ids: Sequence[int] = (),
) -> list[dict[str, float]]:
    """The metrics of the segmentation at each threshold, in the order of ``thresholds``."""
    segs = segmenter(affs)
    segs = [segs] if isinstance(segs, np.ndarray) else list(segs)
    if len(segs) != len(thresholds):
        raise ValueError(f"segmenter returned {len(segs)} segmentations for {len(thresholds)}")
    rows = []
    for threshold, seg in zip(thresholds, segs, strict=True):
        m = evaluate(seg, gt, ignore_ids=ignore_ids)
        rows.append({k: float(m[k]) for k in METRICS} | {"threshold": float(threshold)})
    return rows


def best_mean(per_region: Sequence[Sequence[dict[str, float]]]) -> dict[str, float]:
    """The threshold whose VOI averaged over the regions is lowest, with every metric averaged:
    one threshold for all regions, as the model will carry one."""
    rows = [
        {k: float(np.mean([r[i][k] for r in per_region])) for k in METRICS}
        | {"threshold": per_region[0][i]["threshold"]}
        for i in range(len(per_region[0]))
    ]
    return min(rows, key=lambda row: row["voi"])
