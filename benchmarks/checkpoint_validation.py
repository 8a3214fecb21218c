"""Score candidate models on a packaged model's validation region through the product's path.

The trainer ranks checkpoints by its own whole-slab prediction; what ships is judged through
``ssn-deploy infer`` + ``segment`` + ``evaluate``, which is what this runs for each ``--model``
(a packaged name or a .ckpt): infer on the validation region (never the test region), then the
stored affinities segmented at every threshold of ``_common.THRESHOLD_SWEEP``. ``--nearest``
first cuts each checkpoint back to the 3 nearest-neighbour offsets (``ssn_deploy.models.heads``;
same weights for those channels), which is how a model trained with long-range auxiliary affinities
would ship. The packaged model of the region is always scored too, in the same run, as the
baseline. ``--region aniso_cuts`` scores the ``aniso`` validation tissue cut into 50 nm sections
at all 5 phases (``_common.aniso_validation_cuts``: 31 sections instead of 7) and ranks by the
mean VOI over the cuts. Writes JSON (default
``benchmarks/results/default_model/checkpoint_validation.json``).

    python benchmarks/checkpoint_validation.py --model runs/x/checkpoints/iter_0000400.ckpt ...
        [--region iso|aniso|aniso_cuts] [--nearest] [--precision fp32] [--work DIR] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import _common as c

from ssn_deploy import __version__
from ssn_deploy.inference.loader import default_model
from ssn_deploy.models import load_checkpoint, save_checkpoint
from ssn_deploy.models.heads import NEAREST, with_offsets


def nearest_only(path: Path, work: Path) -> Path:
    """``path`` cut back to the 3 nearest offsets (itself if it has no others)."""
    loaded = load_checkpoint(path)
    if tuple(loaded.config.offsets) == NEAREST:
        return path
    model, _ = with_offsets(loaded.model, NEAREST)
    target = work / f"{path.parent.parent.name}_{path.stem}_nearest.ckpt"
    kw = {"normalization": loaded.normalization, "voxel_size": loaded.voxel_size}
    return save_checkpoint(target, model, iteration=loaded.iteration, extra=loaded.extra, **kw)


def _combine(cuts: list[dict]) -> dict:
    """One region's row as it is; several cuts' rows with their mean VOI per threshold."""
    if len(cuts) == 1:
        return cuts[0]
    sweep = {
        t: round(sum(cut["voi_by_threshold"][t] for cut in cuts) / len(cuts), 4)
        for t in cuts[0]["voi_by_threshold"]
    }
    best = min(sweep, key=sweep.__getitem__)
    at_model = {
        k: round(sum(cut["at_model_threshold"][k] for cut in cuts) / len(cuts), 4)
        for k in ("voi", "voi_split", "voi_merge")
    }
    return {
        "infer_seconds": round(sum(cut["infer_seconds"] for cut in cuts), 1),
        "at_model_threshold": at_model,
        "voi_by_threshold": sweep,
        "best_threshold": float(best),
        "best_voi": sweep[best],
        "cuts": cuts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], help="name or .ckpt; repeat")
    parser.add_argument("--region", choices=[*c.VALIDATION, "aniso_cuts"], default="iso")
    parser.add_argument("--nearest", action="store_true", help="cut to the 3 nearest offsets")
    parser.add_argument("--precision", default="fp32", help="infer --precision (default fp32)")
    parser.add_argument("--data", type=Path, default=c.DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=Path("/tmp/checkpoint_validation"))
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the packaged model (fp32 VOI is deterministic: an earlier run's row stands)",
    )
    parser.add_argument("--label", default=None, help="what the candidates are (for the JSON)")
    parser.add_argument(
        "--output", type=Path, default=c.RESULTS / "default_model" / "checkpoint_validation.json"
    )
    args = parser.parse_args()
    work = args.work / args.region
    if args.region == "aniso_cuts":
        regions = c.aniso_validation_cuts(args.data, work)
    else:
        regions = [c.validation_region(args.data, work, args.region)]
    packaged = "aniso" if args.region == "aniso_cuts" else args.region
    # the aniso model carries 0.8, above the common sweep
    thresholds = (*c.THRESHOLD_SWEEP, 0.8) if packaged == "aniso" else c.THRESHOLD_SWEEP
    baseline = str(default_model("torch", packaged))
    rows: dict[str, dict] = {}
    for name in [*([] if args.no_baseline else [baseline]), *args.model]:
        model = Path(name) if name.endswith(".ckpt") else name
        if args.nearest and isinstance(model, Path) and str(model) != baseline:
            model = nearest_only(model, work)
        tag = f"m{len(rows)}"
        cuts = []
        for i, (raw, gt) in enumerate(regions):
            out = work / f"{tag}_cut{i}.zarr"
            start = time.perf_counter()
            c.cli("infer", str(raw), "-o", str(out), "--model", str(model), "--precision",
                  args.precision, "--overwrite", "--no-progress", "--no-preview")  # fmt: skip
            seconds = time.perf_counter() - start
            report = json.loads(c.cli("evaluate", f"{out}/segmentation", str(gt), "--json"))
            cuts.append({
                "infer_seconds": round(seconds, 1),
                "at_model_threshold": {
                    k: round(report[k], 4) for k in ("voi", "voi_split", "voi_merge")
                },
                **c.threshold_sweep(f"{out}/affinities", gt, work, f"{tag}_cut{i}", thresholds),
            })  # fmt: skip
        rows[name] = {"scored": str(model), **_combine(cuts)}
        print(name, json.dumps(rows[name]), flush=True)
    for row in rows.values() if baseline in rows else ():
        row["best_voi_vs_baseline"] = round(row["best_voi"] - rows[baseline]["best_voi"], 4)
    report = {
        "benchmark": "checkpoint_validation",
        "version": __version__,
        "label": args.label,
        "region": {
            "model": packaged,
            "dataset_and_roi": c.VALIDATION[packaged],
            "cuts": [0, *c.ANISO_CUTS] if args.region == "aniso_cuts" else [0],
        },
        "nearest_only": args.nearest,
        "precision": args.precision,
        "thresholds": list(thresholds),
        "baseline": baseline if baseline in rows else None,
        "candidates": rows,
        "load_average": os.getloadavg(),
    }
    c.write_json(args.output, report)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
