"""Patch embeddings of a whole volume on a regular grid, written to disk once.

Patches start at ``k · stride`` (k = 0 … G−1 per axis, G = ⌈(n − patch) / stride⌉ + 1) and
those sticking out of the volume are mirrored at its faces (as the paper reflect-pads). The
``[D, Gz, Gy, Gx]`` result is stored as zarr with the geometry and the encoder in its
attributes, so selection can be rerun (other budgets, windows, k) without re-embedding.

Two ways to embed (``method``):

- ``dense`` (default): the encoder's deepest feature map is computed once over the whole
  volume, blockwise on dask (each block read with a halo, mirrored at the faces, so memory is
  one block whatever the volume), and a patch's embedding is the mean of that map over the
  patch's footprint — the encoder's own global average pool, but each voxel is encoded once
  instead of once per overlapping patch (~(patch/stride)³ times: 32× for 4× overlap per axis).
  Strides are multiples of the encoder's granularity so footprints fall on whole cells.
- ``patch``: every patch cut out and encoded on its own (zero-padded at the patch's borders),
  as the paper does. ``benchmarks/selection.py`` compares the two (speed, neighbour agreement).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ssn_deploy.errors import InvalidInputError
from ssn_deploy.geometry import Block, BlockGrid, Box, anisotropy
from ssn_deploy.models.checkpoint import load_checkpoint
from ssn_deploy.volumes import Volume, create_volume, open_volume, reflect_read

Triple = tuple[int, int, int]
METHODS = ("dense", "patch")
BLOCK_VOXELS = 8_000_000
"""Dense embedding reads blocks of about this many voxels (halo included): ~0.5 GB per
16-channel activation at full resolution, so a worker's peak stays near 2 GB."""


@dataclass(frozen=True)
class EmbeddingGrid:
    """Where a volume's patches are: ``shape`` in patches, ``patch`` and ``stride`` in voxels."""

    volume_shape: Triple
    patch: Triple
    stride: Triple

    @property
    def shape(self) -> Triple:
        return tuple(  # type: ignore[return-value]
            max(1, math.ceil((n - p) / s) + 1)
            for n, p, s in zip(self.volume_shape, self.patch, self.stride, strict=True)
        )

    def box(self, index: Sequence[int]) -> Box:
        begin = tuple(int(i) * s for i, s in zip(index, self.stride, strict=True))
        return Box(begin, self.patch)

    def window_voxels(self, window: Sequence[int]) -> Triple:
        """Voxel extent of ``window`` adjacent patches: ``(w − 1) · stride + patch``."""
        return tuple(  # type: ignore[return-value]
            (int(w) - 1) * s + p for w, s, p in zip(window, self.stride, self.patch, strict=True)
        )

    def window_patches(self, voxels: Sequence[int]) -> Triple:
        """The largest window (in patches) whose voxel extent fits in ``voxels``."""
        return tuple(  # type: ignore[return-value]
            max(1, (int(v) - p) // s + 1)
            for v, s, p in zip(voxels, self.stride, self.patch, strict=True)
        )


class Encoder:
    """A pretrained encoder (``ssn-deploy pretrain``'s ``encoder.ckpt``) ready to embed."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        ckpt = load_checkpoint(path)
        if ckpt.extra.get("kind") != "simsiam-encoder":
            raise InvalidInputError(f"{path} is not an encoder from ssn-deploy pretrain")
        if threads:
            torch.set_num_threads(threads)
        self.path = str(path)
        self.net = ckpt.model.encoder().eval()
        self.normalization = ckpt.normalization
        self.voxel_size = tuple(float(v) for v in ckpt.voxel_size)
        self.patch: Triple = tuple(int(v) for v in ckpt.extra["patch_shape"])  # type: ignore[assignment]
        self.granularity: Triple = tuple(ckpt.model.granularity)  # type: ignore[assignment]
        self.dim = int(self.net.out_features)

    @property
    def isotropic(self) -> bool:
        return anisotropy(self.voxel_size) < 2

    @torch.inference_mode()
    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """``float32[N, D]`` embeddings of normalised ``float32[N, Z, Y, X]`` patches."""
        return self.net(torch.from_numpy(patches[:, None])).float().numpy()

    @torch.inference_mode()
    def features(self, block: np.ndarray) -> np.ndarray:
        """``float32[D, z/gz, y/gy, x/gx]``: the deepest feature map of one normalised block."""
        return self.net.features(torch.from_numpy(block[None, None]))[0].float().numpy()

    def check_voxel_size(self, raw: Volume) -> None:
        if raw.voxel_size is not None and not np.allclose(
            raw.voxel_size, self.voxel_size, rtol=0.25
        ):
            raise InvalidInputError(
                f"{raw.spec} is {format_size(raw.voxel_size)} nm but the encoder was trained at "
                f"{format_size(self.voxel_size)} nm: pretrain one for this voxel size "
                "(ssn-deploy pretrain VOLUME)"
            )


def packaged_encoder(voxel_size: Sequence[float] | None) -> Path:
    """The encoder shipped for the packaged model nearest ``voxel_size`` (iso or aniso)."""
    from importlib import resources

    from ssn_deploy.inference.loader import choose_packaged

    name = choose_packaged(voxel_size).name
    path = Path(str(resources.files("ssn_deploy") / "assets" / "encoders" / f"{name}.ckpt"))
    if not path.is_file():
        raise InvalidInputError(f"packaged encoder missing: {path} (reinstall ssn-deploy)")
    return path


def format_size(size: Sequence[float]) -> str:
    return "×".join(f"{v:g}" for v in size)


@lru_cache(maxsize=2)
def _cached_encoder(path: str, threads: int | None) -> Encoder:
    """One encoder per worker process (dask tasks reuse it)."""
    return Encoder(path, threads)


def default_stride(
    patch: Sequence[int], granularity: Sequence[int] = (1, 1, 1), isotropic: bool = False
) -> Triple:
    """A quarter of the patch in-plane (and in z for isotropic data), ~0.45 of it in z for
    serial sections (paper: 8×40×40 for 18×160×160), rounded to the encoder's granularity."""
    z = patch[0] / 4 if isotropic else patch[0] * 4 / 9
    wanted = (z, patch[1] / 4, patch[2] / 4)
    return tuple(max(g, round(w / g) * g) for w, g in zip(wanted, granularity, strict=True))  # type: ignore[return-value]


def embedding_grid(
    volume_shape: Sequence[int], encoder: Encoder, stride: Sequence[int] | None, method: str
) -> EmbeddingGrid:
    """The patch grid for ``encoder`` on a volume, checking that the stride suits ``method``."""
    if method not in METHODS:
        raise InvalidInputError(f"embedding method: expected one of {METHODS}, got {method!r}")
    stride = tuple(stride or default_stride(encoder.patch, encoder.granularity, encoder.isotropic))
    if len(stride) != 3 or min(stride) < 1:
        raise InvalidInputError(f"--stride: expected three positive sizes, got {stride}")
    g = encoder.granularity
    if method == "dense" and any(s % a for s, a in zip(stride, g, strict=True)):
        raise InvalidInputError(
            f"--stride {format_size(stride)} must be a multiple of the encoder's granularity "
            f"{format_size(g)} for dense embedding (or use the patch method)"
        )
    return EmbeddingGrid(tuple(volume_shape), encoder.patch, stride)  # type: ignore[arg-type]


def embed_volume(
    volume: str | Volume,
    encoder: Encoder,
    out: str,
    *,
    stride: Sequence[int] | None = None,
    method: str = "dense",
    batch_size: int = 8,
    scheduler: Any = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Volume:
    """Embed every patch of ``volume`` into ``out`` (zarr ``float32[D, Gz, Gy, Gx]``)."""
    raw = open_volume(volume) if isinstance(volume, str) else volume
    if raw.ndim != 3 or np.dtype(raw.dtype) != np.uint8:
        raise InvalidInputError(f"{raw.spec}: expected 3D uint8 raw, got {raw.ndim}D {raw.dtype}")
    encoder.check_voxel_size(raw)
    grid = embedding_grid(raw.shape, encoder, stride, method)
    gz, gy, gx = grid.shape
    attrs: dict[str, Any] = {
        "ssn_deploy": {
            "stage": "embeddings",
            "source": raw.spec,
            "encoder": encoder.path,
            "method": method,
            "volume_shape": list(raw.shape),
            "patch": list(grid.patch),
            "stride": list(grid.stride),
            "voxel_size": list(raw.voxel_size) if raw.voxel_size else None,
        }
    }
    store = create_volume(
        out, (encoder.dim, gz, gy, gx), np.float32, chunks=(encoder.dim, 1, gy, gx),
        voxel_size=(1.0, 1.0, 1.0), overwrite=overwrite, attrs=attrs, ome=False,
    )  # fmt: skip
    if method == "patch":
        _embed_patches(raw, encoder, grid, store, batch_size, progress)
    else:
        features = _dense_features(raw, encoder, grid, out, scheduler, workers, progress)
        _pool_patches(features, encoder, grid, store)
    return store


def _embed_patches(raw: Volume, encoder: Encoder, grid: EmbeddingGrid, store: Volume,
                   batch_size: int, progress: bool) -> None:  # fmt: skip
    """Each patch encoded on its own, one z-row of patches at a time."""
    gz, gy, gx = grid.shape
    bar = tqdm(total=gz * gy * gx, unit="patch", disable=not progress)
    for z in range(gz):
        row = grid.box((z, 0, 0))
        region = Box(row.begin, (row.shape[0], *grid.window_voxels((1, gy, gx))[1:]))
        data = encoder.normalization(reflect_read(raw, region))
        result = np.empty((encoder.dim, gy, gx), np.float32)
        cells = list(itertools.product(range(gy), range(gx)))
        for start in range(0, len(cells), batch_size):
            chunk = cells[start : start + batch_size]
            patches = np.stack(
                [data[:, y * grid.stride[1] : y * grid.stride[1] + grid.patch[1],
                      x * grid.stride[2] : x * grid.stride[2] + grid.patch[2]] for y, x in chunk]
            )  # fmt: skip
            emb = encoder(np.ascontiguousarray(patches))
            for (y, x), e in zip(chunk, emb, strict=True):
                result[:, y, x] = e
            bar.update(len(chunk))
        store[(slice(None), slice(z, z + 1), slice(None), slice(None))] = result[:, None]
    bar.close()


def dense_layout(encoder: Encoder, extent: Sequence[int]) -> tuple[Triple, Triple]:
    """Block core and halo (voxels, multiples of the granularity) for dense embedding: a halo of
    a quarter patch (the default stride), and cores that split ``extent`` evenly with blocks of
    ≤ :data:`BLOCK_VOXELS`. Features within a halo of a block face see mirrored instead of real
    context, a milder version of the zero padding every patch sees in the paper's method."""
    g = encoder.granularity
    halo = tuple(-(-p // 4 // a) * a for p, a in zip(encoder.patch, g, strict=True))
    pieces = [1, 1, 1]

    def core_of(axis: int) -> int:  # ceil(extent / pieces), rounded up to the granularity
        return -(-extent[axis] // pieces[axis] // g[axis]) * g[axis] or g[axis]

    core = [core_of(a) for a in range(3)]
    while math.prod(c + 2 * h for c, h in zip(core, halo, strict=True)) > BLOCK_VOXELS:
        splittable = [a for a in range(3) if core[a] > g[a]]
        if not splittable:
            break
        axis = max(splittable, key=lambda a: core[a] + 2 * halo[a])
        pieces[axis] += 1
        core[axis] = core_of(axis)
    return tuple(core), halo  # type: ignore[return-value]


def _dense_features(raw: Volume, encoder: Encoder, grid: EmbeddingGrid, out: str,
                    scheduler: Any, workers: int, progress: bool) -> Volume:  # fmt: skip
    """The deepest feature map over the patch grid's extent, blockwise on dask, into
    :func:`features_path` (``float32[D, cells...]``, one chunk per block)."""
    from ssn_deploy.inference.scheduling import dask_client, run_blocks

    g = encoder.granularity
    extent = grid.window_voxels(grid.shape)
    core, halo = dense_layout(encoder, extent)
    create_volume(
        features_path(out), (encoder.dim, *(e // a for e, a in zip(extent, g, strict=True))),
        np.float32, chunks=(encoder.dim, *(c // a for c, a in zip(core, g, strict=True))),
        voxel_size=(1.0, 1.0, 1.0), overwrite=True, ome=False,
    )  # fmt: skip
    blocks = BlockGrid(Box.from_shape(extent), core, 0)
    spec, path, threads = raw.spec, encoder.path, torch.get_num_threads()

    def task(block: Block) -> int:
        enc = _cached_encoder(path, max(1, threads // max(1, workers)))
        source = open_volume(spec)
        box = block.write_box
        data = enc.normalization(reflect_read(source, box.grow(halo)))
        feats = enc.features(np.ascontiguousarray(data, np.float32))
        inner = cells(halo, [h + n for h, n in zip(halo, box.shape, strict=True)], g)
        target = open_volume(features_path(out), mode="r+")
        target[(slice(None), *cells(box.begin, box.end, g))] = feats[(slice(None), *inner)]
        return box.size

    with dask_client(scheduler, workers) as client:
        run_blocks(client, task, iter(blocks), 2 * workers, len(blocks), 0, progress, "embed")
    return open_volume(features_path(out))


def cells(begin: Sequence[int], end: Sequence[int], granularity: Sequence[int]) -> tuple:
    """Slices of the feature map's cells covering voxels ``[begin, end)`` (multiples of the
    granularity)."""
    return tuple(slice(b // a, e // a) for b, e, a in zip(begin, end, granularity, strict=True))


def features_path(out: str) -> str:
    """Where dense embedding keeps the feature map: ``X.zarr`` → ``X_features.zarr``."""
    return f"{out.rstrip('/').removesuffix('.zarr')}_features.zarr"


def _pool_patches(features: Volume, encoder: Encoder, grid: EmbeddingGrid, store: Volume) -> None:
    """Each patch's embedding = the mean of the feature map over its footprint, one z-row of
    patches at a time (memory: one row of cells)."""
    g = encoder.granularity
    kernel = tuple(p // a for p, a in zip(grid.patch, g, strict=True))
    step = tuple(s // a for s, a in zip(grid.stride, g, strict=True))
    for z in range(grid.shape[0]):
        rows = np.asarray(features[:, z * step[0] : z * step[0] + kernel[0]])
        pooled = torch.nn.functional.avg_pool3d(torch.from_numpy(rows)[None], kernel, step)[0]
        store[(slice(None), slice(z, z + 1), slice(None), slice(None))] = pooled.numpy()


def embeddings_meta(spec: str) -> tuple[EmbeddingGrid, dict[str, Any]]:
    """The grid and attributes of stored embeddings (no data read)."""
    meta = dict(open_volume(spec).attrs.get("ssn_deploy", {}))
    if meta.get("stage") != "embeddings":
        raise InvalidInputError(f"{spec} is not an embeddings array from ssn-deploy select")
    grid = EmbeddingGrid(tuple(meta["volume_shape"]), tuple(meta["patch"]), tuple(meta["stride"]))  # type: ignore[arg-type]
    return grid, meta


def load_embeddings(spec: str) -> tuple[np.ndarray, EmbeddingGrid, dict[str, Any]]:
    """``float32[Gz·Gy·Gx, D]`` (flat patch ids in C order), the grid and the attributes."""
    grid, meta = embeddings_meta(spec)
    data = np.asarray(open_volume(spec)[...])
    return data.reshape(data.shape[0], -1).T.copy(), grid, meta
