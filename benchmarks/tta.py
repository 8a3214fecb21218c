"""What test-time augmentation (``infer --tta``) buys and costs, measured on validation data.

For each packaged model, its validation region (never the test region: a setting chosen here
may become a default) goes through ``ssn-deploy infer`` with ``--tta none``, ``yx`` and ``zyx``
at the model's threshold, and ``ssn-deploy evaluate`` scores each against the labels. Time is
the whole ``infer`` call (model + fragments + agglomeration), so the ratio is what a user pays.
TTA averages affinities towards the middle, so each mode's stored affinities are also segmented
(``ssn-deploy segment --threshold``) at every threshold of :data:`SWEEP`: a mode could win at a
threshold of its own, which would then have to ship with it.
Writes ``benchmarks/results/tta.json``.

    python benchmarks/tta.py [--data ../shared/data] [--work /tmp/tta]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ssn_deploy import __version__

REPO = Path(__file__).resolve().parents[1]
VALIDATION = {  # model → (dataset, validation region of its training config)
    "iso": ("fib_medulla_250", "93:125,:,:"),
    "aniso": ("fib_medulla_250_aniso5", "18:25,:,:"),
}
MODES = ("none", "yx", "zyx")
SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7)


def cli(*args: str) -> str:
    exe = Path(sys.executable).with_name("ssn-deploy")
    return subprocess.run([str(exe), *args], check=True, capture_output=True, text=True).stdout


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
        out.mkdir(parents=True, exist_ok=True)
        raw, gt = out / "raw.zarr", out / "gt.zarr"
        if not raw.exists():
            cli("convert", f"{args.data / stem}.hdf:volumes/raw", str(raw), "--roi", roi,
                "--no-progress")  # fmt: skip
        if not gt.exists():
            cli("convert", f"{args.data / stem}.hdf:volumes/labels/neuron_ids", str(gt), "--roi",
                roi, "--no-progress")  # fmt: skip
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
            sweep = {}
            for threshold in SWEEP:
                swept = out / f"{mode}_t{threshold}.zarr"
                cli("segment", f"{seg}/affinities", "-o", str(swept), "--threshold",
                    str(threshold), "--overwrite", "--no-progress")  # fmt: skip
                scores = json.loads(cli("evaluate", f"{swept}/segmentation", str(gt), "--json"))
                sweep[str(threshold)] = round(scores["voi"], 4)
            best = min(sweep, key=sweep.get)
            rows[mode] |= {"voi_by_threshold": sweep, "best_threshold": float(best),
                           "best_voi": sweep[best]}  # fmt: skip
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
