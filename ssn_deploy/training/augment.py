"""EM augmentations applied identically to raw, labels and the known-label mask.

Geometric transforms (flips, transposes, misalignment, elastic) move labels with the raw, so
affinity targets computed afterwards stay aligned with what the network sees. Intensity
transforms touch the raw only. Every random draw comes from the augmenter's own
``np.random.Generator``, whose state checkpoints save for exact resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ssn_deploy.training.config import AugmentConfig


@dataclass(frozen=True)
class Geometry:
    """Axis permutation and flips, drawn before cropping so a transposed crop keeps its shape."""

    perm: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[bool, bool, bool] = (False, False, False)

    def source_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The crop shape to read so that, once transposed, it has ``shape``."""
        out = [0, 0, 0]
        for k, axis in enumerate(self.perm):
            out[axis] = shape[k]
        return tuple(out)  # type: ignore[return-value]

    def apply(self, a: np.ndarray) -> np.ndarray:
        a = a.transpose(self.perm)
        flip_axes = tuple(i for i, f in enumerate(self.flips) if f)
        return np.ascontiguousarray(np.flip(a, flip_axes) if flip_axes else a)


class Augmenter:
    """Draws and applies augmentations; ``isotropic`` allows z transposes and 3D elastic."""

    def __init__(self, config: AugmentConfig, isotropic: bool, rng: np.random.Generator) -> None:
        self.config = config
        self.isotropic = isotropic
        self.rng = rng

    def _happens(self, p: float) -> bool:
        return p > 0 and self.rng.random() < p

    def geometry(self, crop: tuple[int, int, int], region: tuple[int, ...]) -> Geometry:
        """y/x transposes always allowed; z transposes only for isotropic data.

        The sampler reads :meth:`Geometry.source_shape`, so a permutation keeps the crop's
        shape; one whose source would not fit in ``region`` falls back to no transpose.
        """
        perm: tuple[int, ...] = (0, 1, 2)
        if self._happens(self.config.transpose):
            axes = [0, 1, 2] if self.isotropic else [1, 2]
            chosen = [int(a) for a in self.rng.permutation(axes)]
            perm = tuple(chosen) if self.isotropic else (0, *chosen)
            source = Geometry(perm).source_shape(crop)  # type: ignore[arg-type]
            if any(s > r for s, r in zip(source, region, strict=True)):
                perm = (0, 1, 2)
        flips = tuple(bool(self._happens(self.config.flip)) for _ in range(3))
        return Geometry(perm=perm, flips=flips)  # type: ignore[arg-type]

    def __call__(
        self, raw: np.ndarray, labels: np.ndarray, known: np.ndarray, geometry: Geometry
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """raw float32 in [0, 1], labels, known (bool) → augmented copies, same shape."""
        raw, labels, known = (geometry.apply(a) for a in (raw, labels, known))
        raw = raw.astype(np.float32, copy=True)
        c = self.config
        if self._happens(c.misalignment):
            raw, labels, known = self.misalign(raw, labels, known)
        if self._happens(c.elastic):
            raw, labels, known = self.elastic(raw, labels, known)
        if self._happens(c.intensity):
            raw = self.intensity(raw)
        if self._happens(c.blur):
            sigma = self.rng.uniform(0.5, 1.5)
            raw = ndimage.gaussian_filter(raw, (sigma if self.isotropic else 0.0, sigma, sigma))
        if self._happens(c.noise):
            raw = raw + self.rng.normal(0.0, c.noise_std, raw.shape).astype(np.float32)
        if self._happens(c.missing_section) and raw.shape[0] > 2:
            raw[self.rng.integers(1, raw.shape[0] - 1)] = 0.0
        return np.clip(raw, 0.0, 1.0, out=raw), labels, known

    def intensity(self, raw: np.ndarray) -> np.ndarray:
        contrast = self.rng.uniform(0.8, 1.2)
        brightness = self.rng.uniform(-0.1, 0.1)
        gamma = self.rng.uniform(0.7, 1.4)
        return np.clip(raw * contrast + brightness, 0.0, 1.0) ** np.float32(gamma)

    def misalign(
        self, raw: np.ndarray, labels: np.ndarray, known: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shift sections z >= k (a "step") or only section k (a "slip") in y, x.

        Raw and labels move together; voxels rolled in from the opposite side are unknown.
        """
        z = raw.shape[0]
        if z < 2:
            return raw, labels, known
        k = int(self.rng.integers(1, z))
        stop = z if self.rng.random() < 0.5 else k + 1
        m = self.config.max_shift
        dy, dx = (int(s) for s in self.rng.integers(-m, m + 1, size=2))
        sl = slice(k, stop)
        raw[sl] = np.roll(raw[sl], (dy, dx), axis=(1, 2))
        labels = labels.copy()
        labels[sl] = np.roll(labels[sl], (dy, dx), axis=(1, 2))
        known = known.copy()
        known[sl] = np.roll(known[sl], (dy, dx), axis=(1, 2))
        if dy:
            known[sl, slice(0, dy) if dy > 0 else slice(dy, None), :] = False
        if dx:
            known[sl, :, slice(0, dx) if dx > 0 else slice(dx, None)] = False
        return raw, labels, known

    def elastic(
        self, raw: np.ndarray, labels: np.ndarray, known: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A small smooth displacement (a few voxels); in-plane only for anisotropic data."""
        shape = raw.shape
        sigma = self.config.elastic_sigma
        coarse = tuple(max(2, s // 8) for s in shape)
        grid = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
        coords = []
        for axis in range(3):
            if axis == 0 and not self.isotropic:
                coords.append(grid[0])
                continue
            field = self.rng.normal(0.0, sigma, coarse).astype(np.float32)
            zoom = tuple(s / c for s, c in zip(shape, coarse, strict=True))
            disp = ndimage.zoom(field, zoom, order=3, mode="nearest", grid_mode=True)
            coords.append(grid[axis] + disp[: shape[0], : shape[1], : shape[2]])
        raw = ndimage.map_coordinates(raw, coords, order=1, mode="reflect").astype(np.float32)
        # map_coordinates works in float64: warp small consecutive ids, then map back.
        ids, inverse = np.unique(labels, return_inverse=True)
        warped = ndimage.map_coordinates(
            inverse.reshape(shape).astype(np.int32), coords, order=0, mode="reflect"
        )
        labels = ids[warped]
        known = ndimage.map_coordinates(known.astype(np.uint8), coords, order=0, mode="reflect")
        return raw, labels, known.astype(bool)


PERTURBATIONS = ("intensity", "noise", "blur", "cutout", "misalignment", "elastic", "flip")
"""What a view of an unlabelled crop may undergo (one at a time): SimSiam uses them all;
consistency targets use :data:`ALIGNED_PERTURBATIONS`, which keep every voxel in place."""
ALIGNED_PERTURBATIONS = ("intensity", "noise", "blur", "cutout")


def perturb(raw: np.ndarray, kind: str, augmenter: Augmenter) -> np.ndarray:
    """``raw`` (float32 in [0, 1]) after one perturbation ``kind``, drawn with the augmenter's
    random stream; a new array."""
    rng, raw = augmenter.rng, raw.astype(np.float32, copy=True)
    ones = np.ones(raw.shape, bool)
    if kind == "intensity":
        raw = augmenter.intensity(raw)
    elif kind == "noise":
        raw = raw + rng.normal(0.0, 0.05, raw.shape).astype(np.float32)
    elif kind == "blur":
        s = rng.uniform(0.5, 1.5)
        raw = ndimage.gaussian_filter(raw, (s if augmenter.isotropic else 0.0, s, s))
    elif kind == "cutout":
        size = [max(1, int(n * rng.uniform(0.2, 0.4))) for n in raw.shape]
        lo = [int(rng.integers(0, n - s + 1)) for n, s in zip(raw.shape, size, strict=True)]
        raw[tuple(slice(a, a + s) for a, s in zip(lo, size, strict=True))] = float(raw.mean())
    elif kind == "misalignment":
        raw = augmenter.misalign(raw, np.zeros(raw.shape, np.uint8), ones)[0]
    elif kind == "elastic":
        raw = augmenter.elastic(raw, np.zeros(raw.shape, np.uint8), ones)[0]
    elif kind == "flip":
        axes = [a for a in range(3) if rng.random() < 0.5] or [2]
        raw = np.ascontiguousarray(np.flip(raw, axes))
    else:
        raise ValueError(f"unknown perturbation {kind!r} (known: {', '.join(PERTURBATIONS)})")
    return np.clip(raw, 0.0, 1.0).astype(np.float32)
