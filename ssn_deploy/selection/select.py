"""``ssn-deploy select``: embeddings → kNN cover → CGS windows → ROIs, crops and a picture.

Everything a lab needs to start annotating: ``rois.json`` (voxel and world boxes, the gain and
running coverage of each pick, the coverage the baselines reach at the same budget, and every
parameter), one crop of raw per ROI in the format annotation tools read (zarr or HDF5 in the
CREMI layout), and ``selection.png`` (the embedding in 2D with selected / covered / other
patches, and each ROI drawn on a section of the volume).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ssn_deploy import __version__
from ssn_deploy.errors import ConfigError, InvalidInputError, OutputExistsError
from ssn_deploy.geometry import Box
from ssn_deploy.selection.cover import EXACT_LIMIT, coverage, covered, grid_windows, knn, knn_recall
from ssn_deploy.selection.embed import (
    EmbeddingGrid,
    Encoder,
    embed_volume,
    embedding_grid,
    embeddings_meta,
    load_embeddings,
    packaged_encoder,
)
from ssn_deploy.selection.greedy import (
    Exclusion,
    SelectionError,
    cgs,
    kmeanspp_windows,
    random_windows,
)
from ssn_deploy.volumes import Volume, create_volume, open_volume, refuse_overlap

log = logging.getLogger(__name__)

RANDOM_SEEDS = 5


def default_window(anisotropic: bool) -> tuple[int, int, int]:
    """Window in patches: the paper's 1×9×9 for serial sections, 3×3×3 for isotropic data."""
    return (1, 9, 9) if anisotropic else (3, 3, 3)


def _allowed(grid: EmbeddingGrid, exclude: Sequence[Box]) -> np.ndarray:
    """Patches whose box meets no excluded region (flat ids, C order): per axis, which patch
    intervals overlap the region's, then their outer product."""
    ok = np.ones(grid.shape, bool)
    for region in exclude:
        hits = [
            (np.arange(g) * s < e) & (np.arange(g) * s + p > b)
            for g, s, p, b, e in zip(
                grid.shape, grid.stride, grid.patch, region.begin, region.end, strict=True
            )
        ]
        ok &= ~np.einsum("i,j,k->ijk", *hits).astype(bool)
    return ok.ravel()


def _placements(grid: EmbeddingGrid, window: Sequence[int]) -> int:
    """How many windows fit side by side without sharing a voxel (per axis, multiplied)."""
    count = 1
    for g, w, e, s in zip(grid.shape, window, grid.window_voxels(window), grid.stride, strict=True):
        reach = -(-e // s)  # grid cells between two windows that do not overlap
        count *= (g - w) // reach + 1
    return count


def _shrink(window: Sequence[int]) -> tuple[int, int, int] | None:
    """One step smaller: x or y (the larger), then z; None at 1×1×1."""
    w = list(window)
    axis = 2 if w[2] >= w[1] and w[2] > 1 else 1 if w[1] > 1 else 0
    if w[axis] == 1:
        return None
    w[axis] -= 1
    return tuple(w)  # type: ignore[return-value]


def _shrink_chain(window: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """``window`` and every smaller one :func:`_shrink` steps through, down to 1×1×1."""
    chain: list[tuple[int, int, int]] = []
    w: tuple[int, int, int] | None = window
    while w is not None:
        chain.append(w)
        w = _shrink(w)
    return chain


def fit_window(grid: EmbeddingGrid, window: Sequence[int], budget: int) -> tuple[int, int, int]:
    """``window`` (patches), shrunk in x/y (then z) until ``budget`` of them fit side by side
    without sharing a voxel."""
    w: tuple[int, int, int] | None = tuple(
        min(int(a), g) for a, g in zip(window, grid.shape, strict=True)
    )  # type: ignore[assignment]
    while w is not None and _placements(grid, w) < budget:
        w = _shrink(w)
    if w is None:
        raise ConfigError(
            f"{budget} windows cannot fit in a grid of {grid.shape} patches; lower --budget"
        )
    return w


def _anisotropic(voxel: Sequence[float]) -> bool:
    return voxel[0] >= 2 * min(voxel[1:])


def check_request(
    grid: EmbeddingGrid,
    voxel: Sequence[float],
    window: Sequence[int] | None,
    budget: int,
    exclude: Sequence[Box],
) -> tuple[tuple[int, int, int], np.ndarray]:
    """The window asked for (patches) and the allowed patches, or a one-line error when the
    request cannot be met (checked before anything is embedded or written)."""
    wanted = tuple(window) if window is not None else default_window(_anisotropic(voxel))
    allowed = _allowed(grid, exclude)
    if not allowed.any():
        raise InvalidInputError("every patch lies in an excluded region: nothing to select")
    fit_window(grid, wanted, budget)
    return wanted, allowed  # type: ignore[return-value]


def select(
    embeddings: str,
    out_dir: str | Path,
    *,
    budget: int = 4,
    window: Sequence[int] | None = None,
    k: int = 30,
    exclude: Sequence[Box] = (),
    seed: int = 0,
    crop_format: str = "zarr",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Select ``budget`` windows from stored embeddings; write rois.json, crops, selection.png."""
    out_dir = Path(out_dir)
    rois_path = out_dir / "rois.json"
    if rois_path.exists() and not overwrite:
        raise OutputExistsError(f"{rois_path} exists; pass --overwrite to replace it")
    if crop_format not in ("zarr", "hdf5"):
        raise ConfigError(f"crop format: expected zarr or hdf5, got {crop_format!r}")
    data, grid, meta = load_embeddings(embeddings)
    raw = open_volume(meta["source"])
    voxel = tuple(meta.get("voxel_size") or (1.0, 1.0, 1.0))
    wanted, allowed = check_request(grid, voxel, window, budget, exclude)
    local = np.full(len(allowed), -1, np.int64)
    local[allowed] = np.arange(int(allowed.sum()))
    vectors = data[allowed]
    neighbours = knn(vectors, min(k, len(vectors)))
    exact = len(vectors) <= EXACT_LIMIT
    search = {"exact": exact, "recall": 1.0 if exact else knn_recall(vectors, neighbours)}
    positions = np.array(np.unravel_index(np.flatnonzero(allowed), grid.shape)).T
    sizes = _shrink_chain(fit_window(grid, wanted, budget))
    # free placement at every size first (real choice); a tiling lattice only as a last resort
    for fitted, aligned in [(w, False) for w in sizes] + [(w, True) for w in sizes]:
        windows = grid_windows(grid.shape, fitted)
        extent = grid.window_voxels(fitted)
        reach = [-(-e // s) for e, s in zip(extent, grid.stride, strict=True)]
        if aligned:  # fit_window guarantees the lattice of side-by-side windows holds `budget`
            corners = np.array(np.unravel_index(windows[:, 0], grid.shape)).T
            windows = windows[(corners % np.array(reach) == 0).all(axis=1)]
        windows = local[windows[allowed[windows].all(axis=1)]]

        def exclusion() -> Exclusion:  # windows whose voxels overlap a pick are ruled out
            return Exclusion(windows, positions[windows[:, 0]], reach)  # noqa: B023

        try:
            if len(windows) == 0:
                raise SelectionError("no window lies outside the excluded regions")
            picks = cgs(neighbours, windows, budget, exclusion)
            randoms = [
                random_windows(windows, budget, seed + s, exclusion) for s in range(RANDOM_SEEDS)
            ]
            centre = kmeanspp_windows(
                vectors, windows, positions, fitted, budget, seed, exclusion()
            )
            break
        except SelectionError as exc:  # greedy placement can block a tiling that fits
            failure = exc
    else:
        raise ConfigError(f"{failure}; lower --budget or --window")
    if fitted != tuple(min(a, g) for a, g in zip(wanted, grid.shape, strict=True)):
        log.warning("window %s patches shrunk to %s so that %d fit", wanted, fitted, budget)
    global_ids = np.flatnonzero(allowed)
    rois = []
    so_far: list[int] = []
    before = 0.0
    for rank, p in enumerate(picks):
        cells = windows[p]
        so_far += cells.tolist()
        after = coverage(neighbours, so_far)
        first = np.unravel_index(global_ids[cells[0]], grid.shape)
        box = Box(
            tuple(int(i) * s for i, s in zip(first, grid.stride, strict=True)),
            grid.window_voxels(fitted),
        ).intersect(Box.from_shape(raw.shape))
        rois.append(
            {
                "index": rank,
                "offset_voxels": list(box.begin),
                "shape_voxels": list(box.shape),
                "offset_nm": [
                    float(b * v + o) for b, v, o in zip(box.begin, voxel, raw.offset, strict=True)
                ],
                "shape_nm": [float(s * v) for s, v in zip(box.shape, voxel, strict=True)],
                "gain": after - before,
                "coverage": after,
            }
        )
        before = after
    scores = {
        "cgs": coverage(neighbours, windows[picks].ravel()),
        "random": [coverage(neighbours, windows[r].ravel()) for r in randoms],
    }
    scores["random_best"] = max(scores["random"])
    scores["kmeans++"] = coverage(neighbours, windows[centre].ravel())
    report = {
        "version": __version__,
        "method": "cgs",
        "volume": meta["source"],
        "embeddings": embeddings,
        "encoder": meta.get("encoder"),
        "voxel_size": list(voxel),
        "budget": budget,
        "k": int(neighbours.shape[1]),
        "knn": search,
        "patch": list(grid.patch),
        "stride": list(grid.stride),
        "window_patches": list(fitted),
        "window_voxels": list(grid.window_voxels(fitted)),
        "exclude": [[list(b.begin), list(b.end)] for b in exclude],
        "seed": seed,
        "coverage": scores,
        "annotated_fraction": float(
            sum(np.prod(r["shape_voxels"]) for r in rois) / np.prod(raw.shape)
        ),
        "rois": rois,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for roi in rois:
        _write_crop(raw, roi, out_dir, crop_format, overwrite)
    covered_ids = covered(neighbours, windows[picks].ravel())
    _plot(out_dir / "selection.png", raw, vectors, windows[picks], covered_ids, rois)
    rois_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _write_crop(raw: Volume, roi: dict, out_dir: Path, fmt: str, overwrite: bool) -> None:
    box = Box(tuple(roi["offset_voxels"]), tuple(roi["shape_voxels"]))
    data = np.asarray(raw[box])
    name = f"roi_{roi['index']}"
    if fmt == "zarr":
        crop = create_volume(
            str(out_dir / f"{name}.zarr"), data.shape, data.dtype,
            voxel_size=raw.voxel_size or (1.0, 1.0, 1.0), offset=roi["offset_nm"],
            overwrite=overwrite,
        )  # fmt: skip
        crop[...] = data
        roi["crop"] = f"{name}.zarr"
        return
    import h5py

    path = out_dir / f"{name}.hdf"
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("volumes/raw", data=data, compression="gzip")
        ds.attrs["resolution"] = list(raw.voxel_size or (1.0, 1.0, 1.0))
        ds.attrs["offset"] = roi["offset_nm"]
    roi["crop"] = f"{name}.hdf:volumes/raw"


def embed_2d(vectors: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2D coordinates of the embeddings for the picture: UMAP when ``umap-learn`` is
    installed (neighbourhoods, which is what coverage is about), else PCA."""
    try:
        import umap
    except ImportError:
        centred = vectors - vectors.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        return centred @ vt[:2].T, "PCA"
    reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(vectors) - 1))
    return reducer.fit_transform(vectors), "UMAP"


def _plot(path: Path, raw: Volume, vectors: np.ndarray, picked: np.ndarray,
          covered_ids: np.ndarray, rois: list[dict]) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    xy, method = embed_2d(vectors)
    panels = 1 + min(len(rois), 4)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4.5))
    ax = axes[0]
    ax.scatter(*xy.T, s=4, c="0.8", label="other")
    ax.scatter(*xy[covered_ids].T, s=4, c="tab:blue", label="covered")
    ax.scatter(*xy[picked.ravel()].T, s=10, c="tab:red", label="selected")
    ax.set_title(f"patch embeddings ({method})")
    ax.legend(loc="best", fontsize=8)
    for ax, roi in zip(axes[1:], rois, strict=False):
        z0, y0, x0 = roi["offset_voxels"]
        dz, dy, dx = roi["shape_voxels"]
        z = z0 + dz // 2
        ax.imshow(np.asarray(raw[z : z + 1])[0], cmap="gray")
        ax.add_patch(Rectangle((x0, y0), dx, dy, fill=False, ec="tab:red", lw=2))
        ax.set_title(f"ROI {roi['index']} (z = {z}), coverage {roi['coverage']:.2f}")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def select_volume(
    volume: str,
    encoder: str | Path | None,
    out_dir: str | Path,
    *,
    window_voxels: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    method: str = "dense",
    scheduler: Any = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    announce: Callable[[str], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """``ssn-deploy select``: embed ``volume`` with ``encoder`` (the packaged one for the
    volume's voxel size when None) into ``OUT/embeddings.zarr`` (reused when it holds the same
    volume, encoder, method and stride), then :func:`select`. ``window_voxels`` becomes the
    largest window of patches that fits in it. Every request is checked before any work."""
    say = announce or log.info
    raw = open_volume(volume)
    if raw.ndim != 3 or np.dtype(raw.dtype) != np.uint8:
        raise InvalidInputError(f"{raw.spec}: expected 3D uint8 raw, got {raw.ndim}D {raw.dtype}")
    refuse_overlap(out_dir, [raw.spec, encoder], "output folder")
    if encoder is None:
        encoder = packaged_encoder(raw.voxel_size)
        say(f"encoder: packaged {Path(encoder).stem} ({Path(encoder).name})")
    enc = Encoder(encoder)
    enc.check_voxel_size(raw)
    grid = embedding_grid(raw.shape, enc, stride, method)
    if any(p > n for p, n in zip(enc.patch, raw.shape, strict=True)):
        raise InvalidInputError(
            f"{raw.spec} {tuple(raw.shape)} is smaller than the encoder's patch {enc.patch}"
        )
    window = None
    if window_voxels is not None:
        if any(w > n for w, n in zip(window_voxels, raw.shape, strict=True)):
            raise ConfigError(
                f"--window {tuple(window_voxels)} is larger than the volume {tuple(raw.shape)}"
            )
        if any(w < p for w, p in zip(window_voxels, enc.patch, strict=True)):
            raise ConfigError(
                f"--window {tuple(window_voxels)} is smaller than one patch {enc.patch}"
            )
        window = grid.window_patches(window_voxels)
    voxel = tuple(raw.voxel_size or (1.0, 1.0, 1.0))
    check_request(grid, voxel, window, options.get("budget", 4), options.get("exclude", ()))
    out_dir = Path(out_dir)
    if (out_dir / "rois.json").exists() and not overwrite:
        raise OutputExistsError(f"{out_dir / 'rois.json'} exists; pass --overwrite to replace it")
    emb = f"{out_dir}/embeddings.zarr"
    reuse = False
    if Path(emb).exists():  # selecting again (other budget, window, k) takes seconds
        meta = embeddings_meta(emb)[1]
        reuse = (
            meta.get("source") == raw.spec
            and meta.get("encoder") == enc.path
            and meta.get("method", "patch") == method
            and list(grid.stride) == meta.get("stride")
        )
        if not reuse and not overwrite:
            raise OutputExistsError(f"{emb} holds other embeddings; pass --overwrite")
    if reuse:
        say(f"reusing {emb}")
    else:
        embed_volume(raw, enc, emb, stride=grid.stride, method=method, scheduler=scheduler,
                     workers=workers, overwrite=True, progress=progress)  # fmt: skip
    return select(emb, out_dir, window=window, overwrite=overwrite, **options)
