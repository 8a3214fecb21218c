"""Exported artefacts through ``ssn-deploy infer`` on the test region (issue 5 acceptance).

Exports a checkpoint (default: the packaged model) with ``ssn-deploy export --fp16``, then
segments the ``fib_medulla_250`` test region (z ∈ [125, 250), 7.8 MVox) with ``ssn-deploy
infer`` three times, changing only ``--model``: the checkpoint (torch fp32, the reference),
``model.onnx`` and ``model.fp16.onnx`` (onnxruntime). Affinities are stored as float32 so
differences are the models', not the storage's. Reports, per artefact: max and mean
|affinity − torch|, its VOI and ARAND against the ground truth and the difference of that VOI
to torch's (the gated figure, with max |Δ|), the VOI between its segmentation and torch's
(reported), and the wall time of each command (one shared 2-core machine: times are
indicative; backends.py measures speed properly).

    python benchmarks/export_parity.py [--checkpoint PATH] [--data DIR] [--work DIR]

Writes benchmarks/results/export_parity.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CHECKPOINT = REPO / "ssn_deploy" / "assets" / "models" / "default.ckpt"
DATA = REPO.parent / "shared" / "data"
TEST_ROI = "125:250,:,:"


def ssn_deploy(*args: str) -> float:
    """Run one CLI command (the installed entry point beside this interpreter); wall seconds."""
    command = [str(Path(sys.executable).parent / "ssn-deploy"), *args]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, help="keep the volumes here (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=RESULTS / "export_parity.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = run(args.checkpoint, args.data, work)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    print(f"wrote {args.output}")


def run(checkpoint: Path, data: Path, work: Path) -> dict[str, Any]:
    from ssn_deploy.inference.engine import encode_affinities
    from ssn_deploy.metrics import evaluate
    from ssn_deploy.parity import TOLERANCES
    from ssn_deploy.volumes import open_volume

    source = data / "fib_medulla_250.hdf"
    raw, gt = work / "test_raw.zarr", work / "test_gt.zarr"
    for dataset, dst in (("volumes/raw", raw), ("volumes/labels/neuron_ids", gt)):
        ssn_deploy("convert", f"{source}:{dataset}", str(dst), "--roi", TEST_ROI, "--overwrite")
    export_s = ssn_deploy(
        "export", str(checkpoint), "-o", str(work / "export"), "--fp16", "--overwrite"
    )
    models = {
        "torch fp32": checkpoint,
        "onnxruntime fp32": work / "export" / "model.onnx",
        "onnxruntime fp16": work / "export" / "model.fp16.onnx",
    }
    outputs, rows = {}, {}
    for name, model in models.items():
        out = work / (name.replace(" ", "_") + ".zarr")
        seconds = ssn_deploy(
            *("infer", str(raw), "-o", str(out), "--model", str(model)),
            *("--affinity-dtype", "float32", "--no-preview", "--no-progress", "--overwrite"),
        )
        outputs[name] = out
        rows[name] = {"model": str(model), "infer_seconds": seconds}
    truth = open_volume(str(gt))
    reference = open_volume(f"{outputs['torch fp32']}/segmentation")[...]
    reference_affs = open_volume(f"{outputs['torch fp32']}/affinities")[...]
    for name, out in outputs.items():
        seg = open_volume(f"{out}/segmentation")[...]
        scores = evaluate(seg, truth)
        rows[name]["to_ground_truth"] = {k: scores[k] for k in ("voi_split", "voi_merge", "voi")}
        rows[name]["to_ground_truth"]["arand"] = scores["arand"]
        if name == "torch fp32":
            continue
        affs = open_volume(f"{out}/affinities")[...]
        diff = np.abs(affs - reference_affs)
        between = evaluate(seg, reference)
        tolerance = TOLERANCES[name.split()[-1]]  # the same limits as ssn-deploy export's
        rows[name] |= {
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "uint8_changed_fraction": float(
                np.mean(
                    encode_affinities(affs, "uint8") != encode_affinities(reference_affs, "uint8")
                )
            ),
            "segmentation_vs_torch": {k: between[k] for k in ("voi_split", "voi_merge", "voi")},
            "voi_to_ground_truth_difference": abs(
                rows[name]["to_ground_truth"]["voi"] - rows["torch fp32"]["to_ground_truth"]["voi"]
            ),
            "tolerance": {
                "max_abs_diff": tolerance.max_abs_diff,
                "voi_difference": tolerance.voi_difference,
            },
        }
        rows[name]["ok"] = (
            rows[name]["max_abs_diff"] <= tolerance.max_abs_diff
            and rows[name]["voi_to_ground_truth_difference"] <= tolerance.voi_difference
        )
    return {
        "what": "ssn-deploy infer on fib_medulla_250 z in [125, 250) with each exported artefact",
        "voxels": int(np.prod(truth.shape)),
        "checkpoint": str(
            checkpoint.relative_to(REPO) if checkpoint.is_relative_to(REPO) else checkpoint
        ),
        "export_seconds": export_s,
        "export_parity": json.loads((work / "export" / "parity.json").read_text()),
        "backends": rows,
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or None},
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"{report['what']} ({report['voxels']:,} voxels)")
    header = f"{'artefact':<18} {'max|Δ|':>9} {'VOI to GT':>10} {'|ΔVOI|':>8} {'VOI between':>12}"
    print(header + f" {'infer s':>8}  ok")
    for name, row in report["backends"].items():
        measured = "ok" in row
        diff = f"{row['max_abs_diff']:.2e}" if measured else "-"
        delta = f"{row['voi_to_ground_truth_difference']:.4f}" if measured else "-"
        between = f"{row['segmentation_vs_torch']['voi']:.4f}" if measured else "-"
        voi = row["to_ground_truth"]["voi"]
        verdict = ("yes" if row["ok"] else "NO") if measured else "reference"
        print(
            f"{name:<18} {diff:>9} {voi:>10.4f} {delta:>8} {between:>12} "
            f"{row['infer_seconds']:>8.1f}  {verdict}"
        )


if __name__ == "__main__":
    main()
