"""Patch embeddings of a whole volume on a regular grid, written to disk once.

Patches start at ``k · stride`` (k = 0 … G−1 per axis, G = ⌈(n − patch) / stride⌉ + 1) and
those sticking out of the volume are mirrored at its faces (as the paper reflect-pads). The
grid is embedded one z-row of patches at a time (memory: one row's raw plus a batch), and the
``[Gz, Gy, Gx, D]`` result is stored as zarr with the geometry and the encoder in its
attributes, so selection can be rerun (other budgets, windows, k) without re-embedding.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ssn_deploy.errors import InvalidInputError
from ssn_deploy.geometry import Box
from ssn_deploy.models.checkpoint import load_checkpoint
from ssn_deploy.volumes import Volume, create_volume, open_volume, reflect_read

Triple = tuple[int, int, int]


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
        self.dim = int(self.net.out_features)

    @torch.inference_mode()
    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """``float32[N, D]`` embeddings of normalised ``float32[N, Z, Y, X]`` patches."""
        return self.net(torch.from_numpy(patches[:, None])).float().numpy()


def default_stride(patch: Sequence[int]) -> Triple:
    """A quarter of the patch in-plane and about 0.45 of it in z (paper: 8×40×40 for 18×160×160)."""
    return (max(1, round(patch[0] * 4 / 9)), max(1, patch[1] // 4), max(1, patch[2] // 4))


def embed_volume(
    volume: str | Volume,
    encoder: Encoder,
    out: str,
    *,
    stride: Sequence[int] | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
) -> Volume:
    """Embed every patch of ``volume`` into ``out`` (zarr ``float32[Gz, Gy, Gx, D]``)."""
    raw = open_volume(volume) if isinstance(volume, str) else volume
    if raw.ndim != 3 or np.dtype(raw.dtype) != np.uint8:
        raise InvalidInputError(f"{raw.spec}: expected 3D uint8 raw, got {raw.ndim}D {raw.dtype}")
    if raw.voxel_size is not None and not np.allclose(
        raw.voxel_size, encoder.voxel_size, rtol=0.25
    ):
        raise InvalidInputError(
            f"{raw.spec} is {raw.voxel_size} nm but the encoder was trained at "
            f"{encoder.voxel_size} nm: pretrain one for this voxel size"
        )
    grid = EmbeddingGrid(
        tuple(raw.shape), encoder.patch, tuple(stride or default_stride(encoder.patch))
    )  # type: ignore[arg-type]
    gz, gy, gx = grid.shape
    attrs: dict[str, Any] = {
        "ssn_deploy": {
            "stage": "embeddings",
            "source": raw.spec,
            "encoder": encoder.path,
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
    return store


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
