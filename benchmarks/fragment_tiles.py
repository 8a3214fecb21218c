"""What the fragment-tile lattice costs: tiled vs untiled segmentation of both FIB test regions.

For each dataset, the test region's affinities come from ``ssn-deploy infer`` with the packaged
model chosen for its voxel size (run once, reused from ``--work`` afterwards). Then
``ssn-deploy segment`` runs on those affinities twice, in one process run each: with infer's
own settings (the default fragment-tile lattice) and with one tile and one block over the whole
region (no tile faces at all). Both are scored against the ground truth with
``ssn-deploy evaluate``, and against each other (VOI between). The floor of the VOI between is
measured too: the untiled fragments renumbered at random and agglomerated again, which only
changes how equal scores are tie-broken. Writes ``benchmarks/results/fragment_tiles.json``.

    python benchmarks/fragment_tiles.py [--data ../shared/data] [--work /tmp/fragment_tiles]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ssn_deploy import __version__
from ssn_deploy.agglomeration import agglomerate, edge_statistics, relabel
from ssn_deploy.agglomeration.blockwise import FRAGMENT_CONTEXT, read_affinities
from ssn_deploy.geometry import Box
from ssn_deploy.metrics import evaluate
from ssn_deploy.volumes import open_volume

REPO = Path(__file__).resolve().parents[1]
DATASETS = {  # file stem → test region (never used for training or checkpoint selection)
    "fib_medulla_250": "125:250,:,:",
    "fib_medulla_250_aniso5": "25:50,:,:",
}


def cli(*args: str) -> str:
    exe = Path(sys.executable).with_name("ssn-deploy")
    done = subprocess.run([str(exe), *args], check=True, capture_output=True, text=True)
    return done.stdout


def scores(seg: str, gt: str) -> dict[str, float]:
    report = json.loads(cli("evaluate", seg, gt, "--json"))
    return {k: report[k] for k in ("voi_split", "voi_merge", "voi", "arand")}


def tie_floor(affs_spec: str, frags_spec: str, threshold: float) -> float:
    """VOI between the untiled segmentation and the same after renumbering its fragments."""
    affs_vol = open_volume(affs_spec)
    affs = read_affinities(affs_vol, Box.from_shape(affs_vol.shape[1:]))
    frags = np.asarray(open_volume(frags_spec)[...])
    offsets = affs_vol.attrs["ssn_deploy"]["offsets"]

    def segment(fragments: np.ndarray) -> np.ndarray:
        history = agglomerate(edge_statistics(affs, fragments, offsets), stop=threshold)
        return relabel(fragments, history.lookup(threshold))

    ids = np.unique(frags)
    renumbered = np.random.default_rng(0).permutation(len(ids)).astype(np.uint64) + 1
    shuffled = renumbered[np.searchsorted(ids, frags)]
    return float(evaluate(segment(frags), segment(shuffled))["voi"])


def measure(stem: str, data: Path, work: Path) -> dict:
    out = work / stem
    out.mkdir(parents=True, exist_ok=True)
    roi = DATASETS[stem]
    raw, gt = out / "test_raw.zarr", out / "test_gt.zarr"
    if not raw.exists():
        cli("convert", f"{data / stem}.hdf:volumes/raw", str(raw), "--roi", roi, "--no-progress")
    if not gt.exists():
        cli("convert", f"{data / stem}.hdf:volumes/labels/neuron_ids", str(gt), "--roi", roi,
            "--no-progress")  # fmt: skip
    infer_out = out / "infer.zarr"
    if not (infer_out / "segmentation").exists():
        cli("infer", str(raw), "-o", str(infer_out), "--no-progress", "--no-preview",
            "--overwrite")  # fmt: skip
    affs = f"{infer_out}/affinities"
    settings = open_volume(affs).attrs["ssn_deploy"]["segmentation"]
    shape = ",".join(str(s) for s in open_volume(str(raw)).shape)
    runs = {}
    for name, extra in (
        ("tiled", []),
        ("untiled", ["--block-shape", shape, "--fragment-tile", shape]),
    ):
        start = time.perf_counter()
        cli("segment", affs, "-o", str(out / f"{name}.zarr"), "--overwrite", "--no-progress",
            *extra)  # fmt: skip
        runs[name] = {
            "seconds": round(time.perf_counter() - start, 2),
            **scores(f"{out}/{name}.zarr/segmentation", str(gt)),
        }
    between = scores(f"{out}/tiled.zarr/segmentation", f"{out}/untiled.zarr/segmentation")
    floor = tie_floor(affs, f"{out}/untiled.zarr/fragments", settings["threshold"])
    return {
        "test_region": roi,
        "model": open_volume(affs).attrs["ssn_deploy"]["predictor"].get("model"),
        "settings": settings,
        **runs,
        "voi_to_gt_difference": round(runs["tiled"]["voi"] - runs["untiled"]["voi"], 4),
        "voi_between_tiled_and_untiled": between["voi"],
        "voi_between_renumbered_untiled": floor,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fragment_tiles"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument(
        "--output", type=Path, default=REPO / "benchmarks/results/fragment_tiles.json"
    )
    args = parser.parse_args()
    earlier = json.loads(args.output.read_text()) if args.output.exists() else {}
    results = {  # datasets not run this time keep their earlier figures
        "version": __version__,
        "fragment_context": FRAGMENT_CONTEXT,
        "load_average": os.getloadavg(),
        "datasets": earlier.get("datasets", {}),
    }
    for stem in args.datasets:
        results["datasets"][stem] = measure(stem, args.data, args.work)
        print(stem, json.dumps(results["datasets"][stem], indent=1), flush=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
