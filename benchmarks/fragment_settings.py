"""Fragment and agglomeration settings on validation (issue 16): do they move VOI?

The default model's affinities of a validation region, as ``ssn-deploy infer`` stored them
(uint8), are segmented with every combination of the interior threshold of the boundary map
(seeds come from the distance transform of ``boundary < t``), the seeds' minimum distance,
and the agglomeration threshold; VOI and ARAND against the region's labels. The region is one
block, so the in-memory path equals the blockwise one. Make the inputs with

    NAMES=model ROI=93:125,:,: scripts/evaluate_model.sh iso OUT/iso_val ../shared/data
    NAMES=model DATASET=fib_medulla_250_aniso5 ROI=18:25,:,: \\
        scripts/evaluate_model.sh aniso OUT/aniso_val ../shared/data
    python benchmarks/fragment_settings.py OUT/iso_val OUT/aniso_val
    python benchmarks/fragment_settings.py --quantiles OUT/iso_val OUT/aniso_val

Writes benchmarks/results/default_model/fragment_settings.json. ``--quantiles`` instead scores
the agglomeration's merge quantile (the score of an edge is 1 − that quantile of its affinity
histogram; the shipped 50 is waterz's ``aff50_his256``) at the shipped fragment settings, into
``merge_quantile.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from ssn_deploy.agglomeration import agglomerate, edge_statistics, relabel
from ssn_deploy.agglomeration import fragments as fragments_module
from ssn_deploy.metrics import evaluate
from ssn_deploy.pipeline import is_anisotropic
from ssn_deploy.volumes import open_volume

RESULTS = Path(__file__).resolve().parent / "results" / "default_model"
INTERIOR = (0.3, 0.4, 0.5, 0.6, 0.7)
SEED_DISTANCE = (1, 2, 3, 5)
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
QUANTILES = (10, 25, 50, 60, 75, 90)


def sweep(run: Path) -> dict:
    affs, gt, anisotropic = read_run(run)
    default = fragments_module.BOUNDARY_THRESHOLD
    rows = []
    try:
        for interior, distance in itertools.product(INTERIOR, SEED_DISTANCE):
            fragments_module.BOUNDARY_THRESHOLD = interior
            start = time.perf_counter()
            frags = fragments_module.watershed_fragments(
                affs, anisotropic=anisotropic, min_seed_distance=distance
            )
            history = agglomerate(edge_statistics(affs, frags, fragments_module.DEFAULT_OFFSETS))
            for threshold in THRESHOLDS:
                m = evaluate(relabel(frags, history.lookup(threshold)), gt)
                rows.append({
                    "interior_threshold": interior, "min_seed_distance": distance,
                    "threshold": threshold, "fragments": int(frags.max()),
                    "voi_split": round(m["voi_split"], 4), "voi_merge": round(m["voi_merge"], 4),
                    "voi": round(m["voi"], 4), "arand": round(m["arand"], 4),
                })  # fmt: skip
            best = min(rows[-len(THRESHOLDS) :], key=lambda r: r["voi"])
            print(
                f"{run.name}: interior < {interior}, seed distance {distance}: "
                f"{best['fragments']} fragments, best VOI {best['voi']:.3f} at {best['threshold']}"
                f" [{time.perf_counter() - start:.1f} s]",
                flush=True,
            )
    finally:
        fragments_module.BOUNDARY_THRESHOLD = default
    shipped = [
        r for r in rows if r["interior_threshold"] == default and r["min_seed_distance"] == 3
    ]
    best = min(rows, key=lambda r: r["voi"])
    return {
        "region": str(run),
        "anisotropic": anisotropic,
        "best": best,
        "shipped_settings_best_threshold": min(shipped, key=lambda r: r["voi"]),
        "rows": rows,
    }


def read_run(run: Path) -> tuple[np.ndarray, np.ndarray, bool]:
    """The stored affinities as [0, 1] floats, the labels, and whether the data is anisotropic."""
    affs_vol = open_volume(str(run / "model.zarr" / "affinities"))
    affs = np.asarray(affs_vol[:]).astype(np.float32) / np.float32(255)
    gt = np.asarray(open_volume(str(run / "test_gt.zarr"))[:])
    return affs, gt, is_anisotropic(affs_vol.voxel_size)


def quantile_sweep(run: Path) -> dict:
    """VOI per merge quantile and threshold, at the shipped fragment settings."""
    affs, gt, anisotropic = read_run(run)
    frags = fragments_module.watershed_fragments(affs, anisotropic=anisotropic)
    stats = edge_statistics(affs, frags, fragments_module.DEFAULT_OFFSETS)
    rows = []
    for quantile in QUANTILES:
        history = agglomerate(stats, quantile=quantile)
        for threshold in (*THRESHOLDS, 0.9):
            m = evaluate(relabel(frags, history.lookup(threshold)), gt)
            rows.append({"quantile": quantile, "threshold": threshold,
                         "voi": round(m["voi"], 4), "arand": round(m["arand"], 4)})  # fmt: skip
        best = min((r for r in rows if r["quantile"] == quantile), key=lambda r: r["voi"])
        print(f"{run.name}: quantile {quantile}: best VOI {best['voi']:.3f} at {best['threshold']}")
    best_by_quantile = {
        q: min((r for r in rows if r["quantile"] == q), key=lambda r: r["voi"]) for q in QUANTILES
    }
    return {"region": str(run), "best_by_quantile": best_by_quantile, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="evaluate_model.sh output folders")
    parser.add_argument("--quantiles", action="store_true", help="sweep the merge quantile")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.quantiles:
        output = args.output or RESULTS / "merge_quantile.json"
        quantiles = {run.name: quantile_sweep(run) for run in args.runs}
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(quantiles, indent=1) + "\n")
        return
    args.output = args.output or RESULTS / "fragment_settings.json"
    result = {run.name: sweep(run) for run in args.runs}
    for name, r in result.items():
        b, s = r["best"], r["shipped_settings_best_threshold"]
        print(
            f"{name}: best VOI {b['voi']:.3f} (interior < {b['interior_threshold']}, seed "
            f"distance {b['min_seed_distance']}, threshold {b['threshold']}); shipped fragment "
            f"settings {s['voi']:.3f} at threshold {s['threshold']}"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
