"""Where patches go and how their outputs are blended: a patch lattice anchored at the volume.

Why a global lattice: if each block tiled *itself* with patches, a voxel's prediction would
depend on where the block grid falls (different patch positions, different padding), and block
faces would show seams. Here patch positions are fixed relative to the volume origin, so every
block that needs a voxel computes exactly the same patches for it and blends them in the same
order: results are independent of the block shape up to the backend's batch numerics (~1e-7).

A patch of ``patch_shape`` voxels keeps only its *core*: the patch minus ``margin`` voxels each
side (by default the model's context), where outputs never saw the patch's padding. Cores sit
at multiples of ``stride = core − overlap`` (rounded down to the model's granularity, so every
patch has the same pooling alignment and the model is translation-equivariant between them).

Blending: where cores overlap, outputs are averaged with a separable Gaussian window
(σ = core/4, so a core's edge still weighs e⁻² ≈ 0.14 per axis and no voxel is ever weighed
zero). With a margin of at least the context, overlapping cores agree up to float rounding and
blending changes nothing, so the default overlap is 0; overlap pays off when a smaller margin
is used to save compute, or for models whose outputs depend on the whole patch (GroupNorm).

Cost, in model voxels per output voxel: ``Π patch / Π stride`` in an endless volume, more
where patches straddle block faces (both blocks compute them; :meth:`PatchGrid.cost` counts
it). Blocks whose shape is a multiple of the stride waste least. Examples: the test U-Net
(context 9×15×15), patches 32×64×64: stride 14×34×34, 8.1× (overlap 0) or stride 12×32×32,
10.7× (overlap 2); 15.2× either way in 64×256×256 blocks. The default U-Net (context
18×157×157, granularity 1×16×16), patches 64×512×512: stride 28×192×192, 16.3×; 25.4× in
112×768×768 blocks. Its context is a conservative bound: a smaller margin (plus some overlap)
is the way to trade exactness for speed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ssn_deploy.errors import ConfigError
from ssn_deploy.geometry import Box

Triple = tuple[int, int, int]


def _triple(value: Sequence[int] | int, name: str) -> Triple:
    values = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != 3 or any(v < 0 for v in values):
        raise ConfigError(f"{name}: expected three non-negative integers z,y,x, got {value!r}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class PatchGrid:
    """Patch cores at ``k · stride`` (k any integer vector) in volume voxel coordinates."""

    patch_shape: Triple
    margin: Triple
    stride: Triple

    @classmethod
    def plan(
        cls,
        patch_shape: Sequence[int],
        margin: Sequence[int] | int,
        overlap: Sequence[int] | int,
        granularity: Sequence[int],
    ) -> PatchGrid:
        """Validate the options against the model and derive the stride."""
        patch, margin = _triple(patch_shape, "patch shape"), _triple(margin, "margin")
        overlap, g = _triple(overlap, "overlap"), _triple(granularity, "granularity")
        if any(p == 0 or p % m for p, m in zip(patch, g, strict=True)):
            raise ConfigError(f"patch shape {patch} must be positive multiples of {g} (z,y,x)")
        core = tuple(p - 2 * m for p, m in zip(patch, margin, strict=True))
        stride = tuple((c - o) // m * m for c, o, m in zip(core, overlap, g, strict=True))
        if min(stride) < 1:
            need = tuple(2 * m + o + k for m, o, k in zip(margin, overlap, g, strict=True))
            raise ConfigError(
                f"patch shape {patch} leaves no room for margin {margin} each side plus "
                f"overlap {overlap}: use at least {need} (and a multiple of {g})"
            )
        return cls(patch, margin, stride)  # type: ignore[arg-type]

    @property
    def core_shape(self) -> Triple:
        return tuple(p - 2 * m for p, m in zip(self.patch_shape, self.margin, strict=True))  # type: ignore[return-value]

    def cores_for(self, box: Box) -> list[Box]:
        """The cores that overlap ``box``, in C order (the blending order, the same in any box)."""
        ranges = [
            range(-((c - b - 1) // s), (e - 1) // s + 1)  # cores [k·s, k·s + c) that meet [b, e)
            for b, e, s, c in zip(box.begin, box.end, self.stride, self.core_shape, strict=True)
        ]
        return [
            Box(tuple(k * s for k, s in zip(index, self.stride, strict=True)), self.core_shape)
            for index in itertools.product(*ranges)
        ]

    def input_box(self, core: Box) -> Box:
        """The patch a core is cut from."""
        return core.grow(self.margin)

    def window(self) -> np.ndarray:
        """Blending weights over a core: Gaussian along axes where cores overlap, else 1."""
        axes = []
        for c, s in zip(self.core_shape, self.stride, strict=True):
            x = np.arange(c, dtype=np.float64) - (c - 1) / 2
            axes.append(np.exp(-0.5 * (x / (c / 4)) ** 2) if s < c else np.ones(c))
        return np.einsum("i,j,k->ijk", *axes).astype(np.float32)

    def cost(self, block_shape: Sequence[int]) -> float:
        """Model voxels evaluated per output voxel for an interior block of ``block_shape``."""
        block = Box(tuple(block_shape), tuple(block_shape))
        patch_voxels = int(np.prod(self.patch_shape))
        return len(self.cores_for(block)) * patch_voxels / block.size
