"""Selection at scale, and whether CGS covers more than the baselines (issue: Selection).

Parts (each in its own process, so that its peak memory is its own):

- ``iso``: the whole ``ssn-deploy select`` over ``fib_medulla_520_raw`` (520³ voxels, the
  packaged isotropic encoder unless ``--encoder-iso``), embedding included: seconds, patches/s,
  peak RSS, and the coverage of CGS, 5 random selections and k-means++ at the same budget.
- ``aniso``: the same on ``fib_medulla_250_aniso5`` sections [0, 25) (a copy of those sections;
  the test sections are never read), with the packaged anisotropic encoder.
- ``methods``: dense embedding (the default) against the paper's patch-by-patch encoding on
  sections [0, 25) of the anisotropic volume and on a 128³ crop of ``fib_medulla_520_raw``:
  time of each, and how much they agree (mean shared fraction of each patch's 30 nearest
  neighbours; the coverage each method's CGS picks reach under the *patch* method's kNN).
- ``knn``: the kNN step on a synthetic 100×100×100 grid (10^6 patches) of 80-d embeddings
  with spatial structure (a smooth 8-d latent field, randomly projected, plus noise): time,
  peak RSS, recall measured against exact search on 1,000 patches.

Writes (merging into) ``benchmarks/results/selection.json``.

    python benchmarks/selection.py [--data ../shared/data] [--parts iso aniso methods knn]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "selection.json"
PARTS = ("iso", "aniso", "methods", "knn")
ANISO_SECTIONS = 25
BUDGET = 4


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def copy_crop(spec: str, box: tuple[slice, ...], out: str) -> str:
    from ssn_deploy.volumes import create_volume, open_volume

    src = open_volume(spec)
    data = np.asarray(src[box])
    create_volume(out, data.shape, np.uint8, voxel_size=src.voxel_size)[...] = data
    return out


def whole_selection(volume: str, encoder: str | None, out: str, **options: Any) -> dict[str, Any]:
    """``ssn-deploy select`` as the CLI runs it, timed in its two stages."""
    from ssn_deploy.selection.embed import Encoder, embed_volume, packaged_encoder
    from ssn_deploy.selection.select import select
    from ssn_deploy.volumes import open_volume

    raw = open_volume(volume)
    enc = Encoder(encoder or packaged_encoder(raw.voxel_size))
    start = time.perf_counter()
    store = embed_volume(raw, enc, f"{out}/embeddings.zarr", progress=False, overwrite=True)
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    report = select(f"{out}/embeddings.zarr", out, budget=BUDGET, overwrite=True, **options)
    select_s = time.perf_counter() - start
    patches = int(np.prod(store.shape[1:]))
    return {
        "volume": volume,
        "volume_shape": list(raw.shape),
        "voxel_size": list(raw.voxel_size),
        "encoder": Path(enc.path).name,
        "patch": list(enc.patch),
        "stride": report["stride"],
        "patches": patches,
        "embed_s": embed_s,
        "select_s": select_s,
        "total_s": embed_s + select_s,
        "patches_per_s": patches / (embed_s + select_s),
        "mvox_per_s": float(np.prod(raw.shape)) / (embed_s + select_s) / 1e6,
        "budget": BUDGET,
        "k": report["k"],
        "knn": report["knn"],
        "window_patches": report["window_patches"],
        "window_voxels": report["window_voxels"],
        "annotated_fraction": report["annotated_fraction"],
        "coverage": report["coverage"],
        "cgs_ge_random_best": report["coverage"]["cgs"] >= report["coverage"]["random_best"],
        "cgs_ge_kmeanspp": report["coverage"]["cgs"] >= report["coverage"]["kmeans++"],
    }


def part_iso(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    volume = f"{args.data / 'fib_medulla_520_raw.hdf'}:volumes/raw"
    return whole_selection(volume, args.encoder_iso, f"{tmp}/iso")


def part_aniso(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    volume = copy_crop(
        f"{args.data / 'fib_medulla_250_aniso5.hdf'}:volumes/raw",
        np.s_[:ANISO_SECTIONS], f"{tmp}/aniso5_train.zarr",
    )  # fmt: skip
    return whole_selection(volume, args.encoder_aniso, f"{tmp}/aniso") | {
        "sections": [0, ANISO_SECTIONS]
    }


def compare_methods(volume: str, encoder: str | None, tmp: str) -> dict[str, Any]:
    from ssn_deploy.selection.cover import coverage, grid_windows, knn
    from ssn_deploy.selection.embed import Encoder, embed_volume, packaged_encoder
    from ssn_deploy.selection.greedy import cgs
    from ssn_deploy.volumes import open_volume

    raw = open_volume(volume)
    enc = Encoder(encoder or packaged_encoder(raw.voxel_size))
    vectors, seconds = {}, {}
    for method in ("dense", "patch"):
        start = time.perf_counter()
        store = embed_volume(raw, enc, f"{tmp}/{method}.zarr", method=method, progress=False)
        seconds[method] = time.perf_counter() - start
        data = np.asarray(store[...])
        grid = data.shape[1:]
        vectors[method] = data.reshape(data.shape[0], -1).T.copy()
    k = min(30, len(vectors["patch"]))
    nn = {m: knn(v, k) for m, v in vectors.items()}
    shared = np.mean(
        [len(np.intersect1d(a, b)) / k for a, b in zip(nn["dense"], nn["patch"], strict=True)]
    )
    window, budget = (1, 1, 1), 4  # single patches: small grids hold few windows
    windows = grid_windows(grid, window)
    picks = {m: windows[cgs(nn[m], windows, budget)].ravel() for m in nn}
    return {
        "volume": volume,
        "volume_shape": list(raw.shape),
        "patches": len(vectors["patch"]),
        "seconds": seconds,
        "speedup_dense": seconds["patch"] / seconds["dense"],
        "knn_shared_fraction": float(shared),
        "k": k,
        "window_patches": list(window),
        "budget": budget,
        "coverage_under_patch_knn": {m: coverage(nn["patch"], p) for m, p in picks.items()},
    }


def part_methods(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    aniso = copy_crop(
        f"{args.data / 'fib_medulla_250_aniso5.hdf'}:volumes/raw",
        np.s_[:ANISO_SECTIONS], f"{tmp}/aniso5_train.zarr",
    )  # fmt: skip
    side = args.iso_crop
    iso = copy_crop(
        f"{args.data / 'fib_medulla_520_raw.hdf'}:volumes/raw",
        np.s_[:side, :side, :side], f"{tmp}/iso_crop.zarr",
    )  # fmt: skip
    return {
        "aniso": compare_methods(aniso, args.encoder_aniso, f"{tmp}/aniso"),
        "iso": compare_methods(iso, args.encoder_iso, f"{tmp}/iso"),
    }


def synthetic_grid(side: int, dim: int, seed: int) -> np.ndarray:
    """``float32[side³, dim]``: a smooth 8-d latent field over the grid, projected to ``dim``
    dimensions, plus noise (neighbouring patches look alike, as in real volumes)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    latent = np.stack(
        [ndimage.gaussian_filter(rng.standard_normal((side,) * 3), 4, mode="wrap")
         for _ in range(8)], axis=-1,
    ).reshape(-1, 8)  # fmt: skip
    latent /= latent.std(axis=0)
    projection = rng.standard_normal((8, dim))
    x = latent @ projection + 0.3 * rng.standard_normal((side**3, dim))
    return x.astype(np.float32)


def part_knn(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    from ssn_deploy.selection.cover import EXACT_LIMIT, NPROBE, knn, knn_recall

    x = synthetic_grid(args.knn_side, 80, 0)
    start = time.perf_counter()
    neighbours = knn(x, 30)
    seconds = time.perf_counter() - start
    recall = knn_recall(x, neighbours)
    return {
        "patches": len(x),
        "dim": int(x.shape[1]),
        "k": 30,
        "method": "exact" if len(x) <= EXACT_LIMIT else f"faiss IVF, nprobe {NPROBE}",
        "seconds": seconds,
        "recall_at_30": recall,
        "peak_rss_gb": peak_rss_gb(),
    }


def run_part(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = globals()[f"part_{name}"](args, tmp)
    if name != "methods":
        result["peak_rss_gb"] = peak_rss_gb()
    return result


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--encoder-iso", help="default: the packaged isotropic encoder")
    parser.add_argument("--encoder-aniso", help="default: the packaged anisotropic encoder")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--iso-crop", type=int, default=128)
    parser.add_argument("--knn-side", type=int, default=100, help="synthetic grid side")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_part(args.child, args)))
        return
    results = json.loads(args.output.read_text()) if args.output.exists() else {}
    for name in args.parts:
        argv = [a for a in sys.argv[1:] if a]
        proc = subprocess.run(
            [sys.executable, __file__, *argv, "--child", name],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode:
            sys.exit(f"part {name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {json.dumps(results[name], indent=1)}", flush=True)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        results["machine"] = {"threads": args.threads, "cpu": _cpu(), "load": os.getloadavg()}
        args.output.write_text(json.dumps(results, indent=2) + "\n")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
