"""Labelled training data: z-slabs read once, random crops, augmentation, affinity targets.

Only the z-ranges named in the config are ever read, so a test slab stays unseen (DESIGN:
evaluation regions must not leak into training or checkpoint selection).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import exposure

from ssn_deploy.affinities import affinities_from_labels, class_balance_weights
from ssn_deploy.errors import InvalidInputError
from ssn_deploy.training.augment import Augmenter
from ssn_deploy.training.config import ExtraVolume, ThickSections, UnlabelledSource
from ssn_deploy.training.lsd import local_shape_descriptors
from ssn_deploy.volumes import Volume, open_volume

ZRange = tuple[int, int]


@dataclass
class Slab:
    """A z-range of a labelled volume held in memory (raw uint8, labels uint64, known bool)."""

    raw: np.ndarray
    labels: np.ndarray
    known: np.ndarray
    z_range: ZRange
    voxel_size: tuple[float, float, float]
    share: float | None = None  # fraction of crops drawn from it; None: by crop positions


def _open(spec: str) -> Volume:
    return open_volume(spec)


def read_slab(
    raw_spec: str,
    labels_spec: str,
    z_range: ZRange | None,
    unknown_label: int | None = None,
    yx: tuple[ZRange, ZRange] | None = None,
) -> Slab:
    """Read ``z_range`` (whole volume when None) of raw and labels, optionally only the
    ``yx`` box in-plane; check they align."""
    raw_vol, lab_vol = _open(raw_spec), _open(labels_spec)
    if tuple(raw_vol.shape) != tuple(lab_vol.shape):
        raise InvalidInputError(
            f"raw {raw_spec} {tuple(raw_vol.shape)} and labels {labels_spec} "
            f"{tuple(lab_vol.shape)} differ in shape"
        )
    if np.dtype(raw_vol.dtype) != np.uint8:
        raise InvalidInputError(f"raw {raw_spec} must be uint8, got {raw_vol.dtype}")
    z0, z1 = z_range if z_range is not None else (0, raw_vol.shape[0])
    if z1 > raw_vol.shape[0]:
        raise InvalidInputError(
            f"z range [{z0}, {z1}) exceeds the volume's {raw_vol.shape[0]} sections ({raw_spec})"
        )
    planes = [slice(None), slice(None)]
    for axis, rng in enumerate(yx or ()):
        if rng[1] > raw_vol.shape[axis + 1]:
            raise InvalidInputError(
                f"box {list(rng)} exceeds axis {'yx'[axis]} of {tuple(raw_vol.shape)} ({raw_spec})"
            )
        planes[axis] = slice(*rng)
    box = (slice(z0, z1), *planes)
    raw = np.asarray(raw_vol[box])
    labels = np.asarray(lab_vol[box]).astype(np.uint64, copy=False)
    known = labels != unknown_label if unknown_label is not None else np.ones(labels.shape, bool)
    voxel = tuple(float(v) for v in raw_vol.voxel_size)
    return Slab(raw, labels, known, (z0, z1), voxel)  # type: ignore[arg-type]


def make_targets(
    labels: np.ndarray,
    known: np.ndarray,
    offsets: Sequence[Sequence[int]],
    mask_channels: Sequence[int] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Affinities and loss weights (class-balanced; 0 for unknown voxels and masked channels)."""
    affs, mask = affinities_from_labels(labels, offsets, unknown=~known)
    for c in mask_channels:
        mask[c] = 0.0
    return affs, class_balance_weights(affs, mask)


def read_rois(
    raw_spec: str,
    labels_spec: str,
    boxes: Sequence[tuple[ZRange, ZRange, ZRange]],
    unknown_label: int | None = None,
) -> list[Slab]:
    """One slab per labelled box (``data.rois``): nothing outside the boxes is read."""
    return [read_slab(raw_spec, labels_spec, b[0], unknown_label, (b[1], b[2])) for b in boxes]


def thicken(raw: np.ndarray, labels: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ``factor`` consecutive sections → one: raw averaged (rounded half to even, as
    ``fib_medulla_250_aniso5`` was made), labels of the middle section; a remainder is dropped."""
    n = raw.shape[0] // factor
    runs = raw[: n * factor].reshape(n, factor, *raw.shape[1:])
    thick = np.round(runs.mean(axis=1, dtype=np.float64)).astype(np.uint8)
    return thick, labels[factor // 2 : n * factor : factor]


def read_thick_sections(
    thick: ThickSections, unknown_label: int | None = None, z: ZRange | None = None
) -> list[Slab]:
    """One slab per phase of :class:`ThickSections`: the source's ``z`` (``thick.z`` unless
    given, e.g. ``thick.val_z``) thickened by ``factor`` starting at ``z[0] + phase``, at the
    thick voxel size."""
    z = z or thick.z
    source = read_slab(thick.raw, thick.labels, z, unknown_label)
    slabs = []
    for phase in thick.phases:
        raw, labels = thicken(source.raw[phase:], source.labels[phase:], thick.factor)
        known = np.ones(labels.shape, bool) if unknown_label is None else labels != unknown_label
        z0 = z[0] + phase
        voxel = (source.voxel_size[0] * thick.factor, *source.voxel_size[1:])
        slabs.append(Slab(raw, labels, known, (z0, z0 + len(raw) * thick.factor), voxel))
    return slabs


def fill_boundary(labels: np.ndarray, fill_label: int) -> np.ndarray:
    """Voxels of ``fill_label`` take the nearest other voxel's id (3D Euclidean), so boundaries
    lie between bodies as in densely labelled volumes; a copy, the input is left as it is."""
    fill = labels == fill_label
    if not fill.any() or fill.all():
        return labels.copy()
    _, nearest = ndimage.distance_transform_edt(fill, return_indices=True)
    return labels[tuple(nearest)]


def match_intensity(raw: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``raw`` (uint8) with the intensity histogram of ``reference``, rounded to uint8."""
    matched = exposure.match_histograms(raw, reference)
    return np.clip(np.round(matched), 0, 255).astype(np.uint8)


def read_extra_volume(extra: ExtraVolume, reference: np.ndarray | None = None) -> Slab:
    """An extra labelled volume (``data.extra``), boundary label filled and intensities matched
    to ``reference`` (the main training raw) when asked."""
    slab = read_slab(extra.raw, extra.labels, extra.z, extra.unknown_label)
    if extra.match_intensity:
        if reference is None:
            raise InvalidInputError("data.extra.match_intensity: no reference raw given")
        slab.raw = match_intensity(slab.raw, reference)
    if extra.fill_label is not None:
        slab.labels = fill_boundary(slab.labels, extra.fill_label)
    slab.share = extra.share
    return slab


class CropSampler:
    """Uniformly random crops of one or several slabs (labelled boxes), each crop inside one.

    A slab is drawn with probability proportional to its number of crop positions, so every
    position of every box is equally likely, except slabs with a ``share`` (extra volumes),
    drawn with that probability; with one slab nothing is drawn, which keeps the random
    sequence of single-slab runs. The Generator is saved for exact resume.
    """

    def __init__(self, slabs: Slab | Sequence[Slab], rng: np.random.Generator) -> None:
        self.slabs = [slabs] if isinstance(slabs, Slab) else list(slabs)
        self.rng = rng
        self.slab = self.slabs[0]

    def choose(self, shape: Sequence[int]) -> Slab:
        """The slab the next crop comes from (refused when the crop fits in none)."""
        if len(self.slabs) == 1:
            self.slab = self.slabs[0]
            return self.slab
        positions = np.array(
            [
                np.prod([max(f - s + 1, 0) for s, f in zip(shape, sl.raw.shape, strict=True)])
                for sl in self.slabs
            ],
            float,
        )
        if positions.sum() == 0:
            raise InvalidInputError(
                f"training crop {tuple(shape)} fits in none of the labelled boxes "
                f"{[sl.raw.shape for sl in self.slabs]}"
            )
        shared = np.array([sl.share is not None for sl in self.slabs])
        fixed = np.array([sl.share or 0.0 for sl in self.slabs])
        p = np.where(shared, 0.0, positions)
        p = p / p.sum() * (1 - fixed.sum()) if p.sum() else p
        p = np.where(shared & (positions > 0), fixed, p)
        self.slab = self.slabs[int(self.rng.choice(len(self.slabs), p=p / p.sum()))]
        return self.slab

    def crop(self, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        full = self.slab.raw.shape
        if any(s > f for s, f in zip(shape, full, strict=True)):
            raise InvalidInputError(
                f"training crop {tuple(shape)} is larger than the training region {full}"
            )
        start = [int(self.rng.integers(0, f - s + 1)) for s, f in zip(shape, full, strict=True)]
        box = tuple(slice(b, b + s) for b, s in zip(start, shape, strict=True))
        return self.slab.raw[box], self.slab.labels[box], self.slab.known[box]


@dataclass
class Batch:
    """Network-ready tensors as numpy: raw [N,1,Z,Y,X], affinities and weights [N,C,Z,Y,X];
    with local shape descriptors, their targets [N,10,Z,Y,X] and weights [N,1,Z,Y,X]."""

    raw: np.ndarray
    affs: np.ndarray
    weights: np.ndarray
    lsds: np.ndarray | None = None
    lsd_weights: np.ndarray | None = None


@dataclass(frozen=True)
class LsdTarget:
    """Local shape descriptors as an auxiliary target: window ``sigma`` nm, computed on a grid
    ``downsample`` times coarser (see :mod:`ssn_deploy.training.lsd`)."""

    sigma: float
    downsample: int | tuple[int, int, int] = 2


class BatchSource:
    """Crop → augment → normalise → targets, for one batch at a time."""

    def __init__(
        self,
        sampler: CropSampler,
        augmenter: Augmenter,
        normalize: Callable[[np.ndarray], np.ndarray],
        crop: Sequence[int],
        offsets: Sequence[Sequence[int]],
        mask_channels: Sequence[int] = (),
        lsd: LsdTarget | None = None,
    ) -> None:
        self.lsd = lsd
        self.sampler = sampler
        self.augmenter = augmenter
        self.normalize = normalize
        self.crop = tuple(crop)
        self.offsets = offsets
        self.mask_channels = tuple(mask_channels)

    def sample(self) -> tuple[np.ndarray, ...]:
        """raw, affinities, their weights (and descriptors, their weights with ``lsd``)."""
        slab = self.sampler.choose(self.crop)
        geometry = self.augmenter.geometry(self.crop, slab.raw.shape)
        raw, labels, known = self.sampler.crop(geometry.source_shape(self.crop))
        raw = raw.astype(np.float32) / np.float32(255.0)
        raw, labels, known = self.augmenter(raw, labels, known, geometry)
        affs, weights = make_targets(labels, known, self.offsets, self.mask_channels)
        if self.lsd is None:
            return self.normalize(raw)[None], affs, weights
        # After augmentation, from the labels the network is shown: flips, transposes and
        # elastic warps need no transform of the descriptors themselves.
        lsds = local_shape_descriptors(labels, self.lsd.sigma, slab.voxel_size, self.lsd.downsample)
        lsd_weights = (known & (labels != 0)).astype(np.float32)[None]
        return self.normalize(raw)[None], affs, weights, lsds, lsd_weights

    def batch(self, size: int) -> Batch:
        items = [self.sample() for _ in range(size)]
        return Batch(*(np.stack(parts) for parts in zip(*items, strict=True)))


class UnlabelledSampler:
    """Random crops of unlabelled volumes (each within its z-range), spread by voxel count."""

    def __init__(
        self, sources: Sequence[UnlabelledSource], crop: Sequence[int], rng: np.random.Generator
    ) -> None:
        self.crop = tuple(crop)
        self.rng = rng
        self.volumes: list[tuple[Volume, tuple[int, int]]] = []
        for source in sources:
            vol = open_volume(source.raw)
            if vol.ndim != 3 or np.dtype(vol.dtype) != np.uint8:
                raise InvalidInputError(f"{source.raw}: unlabelled raw must be 3D uint8")
            z = source.z or (0, vol.shape[0])
            if (
                z[1] > vol.shape[0]
                or z[1] - z[0] < self.crop[0]
                or any(s < c for s, c in zip(vol.shape[1:], self.crop[1:], strict=True))
            ):
                raise InvalidInputError(
                    f"{source.raw} z {list(z)} {tuple(vol.shape)} cannot hold the crop {self.crop}"
                )
            self.volumes.append((vol, z))
        sizes = np.array([(z[1] - z[0]) * np.prod(v.shape[1:]) for v, z in self.volumes], float)
        self.weights = sizes / sizes.sum()

    def crop_once(self) -> np.ndarray:
        vol, (z0, z1) = self.volumes[int(self.rng.choice(len(self.volumes), p=self.weights))]
        lo = [int(self.rng.integers(z0, z1 - self.crop[0] + 1))]
        lo += [
            int(self.rng.integers(0, n - c + 1))
            for n, c in zip(vol.shape[1:], self.crop[1:], strict=True)
        ]
        box = tuple(slice(a, a + c) for a, c in zip(lo, self.crop, strict=True))
        return np.asarray(vol[box]).astype(np.float32) / np.float32(255.0)
