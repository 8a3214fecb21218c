"""What test-time augmentation (``infer --tta``) buys and costs, measured on validation data.

For each packaged model, its validation region (never the test region: a setting chosen here
may become a default) goes through ``ssn-deploy infer`` with ``--tta none``, ``yx`` and ``zyx``
at the model's threshold, and ``ssn-deploy evaluate`` scores each against the labels. Time is
the whole ``infer`` call (model + fragments + agglomeration), so the ratio is what a user pays.
TTA averages affinities towards the middle, so each mode's stored affinities are also segmented
(``ssn-deploy segment --threshold``) at every threshold of ``_common.THRESHOLD_SWEEP``: a mode
could win at a threshold of its own, which would then have to ship with it.
Writes ``benchmarks/results/tta.json``.

    python benchmarks/tta.py [--data ../shared/data] [--work /tmp/tta]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import _common as c

from ssn_deploy import __version__

REPO, VALIDATION, cli = c.REPO, c.VALIDATION, c.cli
MODES = ("none", "yx", "zyx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tta"))
    parser.add_argument("--models", nargs="+", default=list(VALIDATION), choices=list(VALIDATION))
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks/results/tta.json")
    args = parser.parse_args()
    earlier = json.loads(args.output.read_text()) if args.output.exists() else {}
    results = {"version": __version__, "cpus": os.cpu_count(), "models": earlier.get("models", {})}
    for model in args.models:
        stem, roi = VALIDATION[model]
        out = args.work / model
        raw, gt = c.validation_region(args.data, out, model)
        rows = {}
        for mode in MODES:
            seg = out / f"{mode}.zarr"
            start = time.perf_counter()
            cli("infer", str(raw), "-o", str(seg), "--model", model, "--tta", mode,
                "--overwrite", "--no-progress", "--no-preview")  # fmt: skip
            seconds = time.perf_counter() - start
            report = json.loads(cli("evaluate", f"{seg}/segmentation", str(gt), "--json"))
            rows[mode] = {
                "seconds": round(seconds, 1),
                **{k: report[k] for k in ("voi_split", "voi_merge", "voi", "arand")},
            }
            rows[mode] |= c.threshold_sweep(f"{seg}/affinities", gt, out, mode)
            print(model, mode, json.dumps(rows[mode]), flush=True)
        for mode in MODES[1:]:
            rows[mode]["time_ratio"] = round(rows[mode]["seconds"] / rows["none"]["seconds"], 2)
            rows[mode]["voi_change"] = round(rows[mode]["voi"] - rows["none"]["voi"], 4)
            rows[mode]["best_voi_change"] = round(
                rows[mode]["best_voi"] - rows["none"]["best_voi"], 4
            )
        results["models"][model] = {"dataset": stem, "validation_region": roi, **rows}
    results["load_average"] = os.getloadavg()
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
