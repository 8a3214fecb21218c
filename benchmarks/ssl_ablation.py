"""Semi-supervised ablation (issue 11): does mixing (IIC) help, and does selection (CGS) help?

One command, resumable, on two real datasets with labels only inside a few annotated boxes
(≤ 8 % of the labelled part), everything through the command line a lab would use:

1. ``ssn-deploy select`` (CGS, the packaged encoder) picks the boxes on the training sections
   (validation and test excluded); the random arms draw boxes of the same shape and number,
   a new draw per seed, from the same sections.
2. ``ssn-deploy train`` runs each arm for the same number of updates:

   - ``supervised-random`` / ``supervised-cgs``: labels of the boxes only;
   - ``iic-random`` / ``iic-cgs``: the supervised arm's weights after ``--warmup`` updates,
     then IIC (mixed views of labelled and unlabelled crops) for the remaining updates;
   - ``mean-teacher-cgs``: the same warm-up, then a mean teacher (no mixing);
   - ``full``: every label of the training sections (the upper bound).

   Checkpoints and the agglomeration threshold are chosen on the validation sections.
3. ``ssn-deploy infer`` (the best checkpoint, its validation threshold) and ``ssn-deploy
   evaluate`` on the test region, never read before.

Datasets: ``iso`` = fib_medulla_250 (train z [0, 93), validation [93, 125), test [125, 250);
1 box of 64×96×96 = 7.5 % of z < 125; unlabelled pool fib_medulla_520_raw + the training sections)
and ``aniso`` = fib_medulla_250_aniso5 (train [0, 18), validation [18, 25), test [25, 50);
1 box of 18×80×80 = 7.4 % of [0, 25); unlabelled pool the training sections + the raw of
vnc_sstem_2dlabels). A box holds several encoder patches (64³ and 18×64×64 at a stride of 16
in-plane), so CGS ranks boxes by the diversity they cover: a one-patch box covers exactly k
neighbours wherever it lies, which makes every choice tie. The CPU scale is small on purpose
(a [12, 16, 24, 32] U-Net, 3 levels, ``--iterations`` updates of batch 1); the JSON records it.

Resumable: each finished run's metrics are kept in ``benchmarks/results/ssl_ablation/`` (small,
committed) and skipped; an interrupted training resumes from its ``last.ckpt`` in ``--work``; a
missing warm-up checkpoint is recomputed. ``benchmarks/results/ssl_ablation.json`` and the PNG
are rewritten after every run, so partial results are always readable.

    python benchmarks/ssl_ablation.py [--datasets iso aniso] [--seeds 0 1 2]
        [--iterations 600] [--warmup 300] [--work runs/ssl_ablation] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as c
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ARMS = (
    "supervised-cgs",
    "iic-cgs",
    "mean-teacher-cgs",
    "supervised-random",
    "iic-random",
    "full",
)
METHOD = {"iic": "iic", "mean-teacher": "mean_teacher"}
Box = list[list[int]]


@dataclass(frozen=True)
class Dataset:
    file: str
    train_z: tuple[int, int]
    val_z: tuple[int, int]
    test_z: tuple[int, int]
    window: tuple[int, int, int]
    budget: int
    crop: tuple[int, int, int]
    isotropic: bool
    unlabelled: tuple[tuple[str, tuple[int, int] | None], ...]
    thresholds: tuple[float, ...]

    @property
    def label_zone(self) -> tuple[int, int]:
        """The sections whose labels a lab could have: training + validation."""
        return (self.train_z[0], self.val_z[1])


DATASETS = {
    "iso": Dataset(
        file="fib_medulla_250.hdf",
        train_z=(0, 93),
        val_z=(93, 125),
        test_z=(125, 250),
        window=(64, 96, 96),
        budget=1,
        crop=(40, 56, 56),
        isotropic=True,
        unlabelled=(("fib_medulla_520_raw.hdf", None), ("fib_medulla_250.hdf", (0, 93))),
        thresholds=(0.3, 0.4, 0.5, 0.6, 0.7),
    ),
    "aniso": Dataset(
        file="fib_medulla_250_aniso5.hdf",
        train_z=(0, 18),
        val_z=(18, 25),
        test_z=(25, 50),
        window=(18, 80, 80),
        budget=1,
        crop=(12, 64, 64),
        isotropic=False,
        unlabelled=(("fib_medulla_250_aniso5.hdf", (0, 18)), ("vnc_sstem_2dlabels.hdf", None)),
        thresholds=(0.3, 0.4, 0.5, 0.6, 0.7),
    ),
}
FILTERS = [12, 16, 24, 32]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["iso", "aniso"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--iterations", type=int, default=600, help="updates per arm")
    parser.add_argument("--warmup", type=int, default=300, help="supervised updates before IIC/MT")
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "ssl_ablation")
    parser.add_argument(
        "--results", type=Path, default=RESULTS / "ssl_ablation", help="per-run metrics folder"
    )
    parser.add_argument("--quick", action="store_true", help="a few updates, to test the script")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the JSON and PNG from the finished runs in --results, train nothing",
    )
    args = parser.parse_args()
    if not 0 < args.warmup < args.iterations:
        parser.error("--warmup must lie in (0, --iterations)")
    if args.iterations % args.val_every or args.warmup % args.val_every:
        parser.error("--iterations and --warmup must be multiples of --val-every")
    return args


# --- running the command line --------------------------------------------------------------


def cli(*args: str | Path, log: Path) -> None:
    """One ``ssn-deploy`` command, its output appended to ``log``; a failure stops the run."""
    command = [str(Path(sys.executable).parent / "ssn-deploy"), *map(str, args)]
    with open(log, "a") as f:
        f.write(f"$ {' '.join(command)}\n")
        f.flush()
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        tail = log.read_text().splitlines()[-5:]
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n" + "\n".join(tail))


# --- label boxes ---------------------------------------------------------------------------


def cgs_boxes(ds: Dataset, data: Path, work: Path, log: Path) -> list[Box]:
    """CGS boxes from ``ssn-deploy select`` on the training sections (deterministic)."""
    out = work / "select_cgs"
    if not (out / "rois.json").exists():
        shape = volume_shape(data / ds.file)
        exclude = f"{ds.train_z[1]}:{shape[0]},0:{shape[1]},0:{shape[2]}"
        cli("select", f"{data / ds.file}:volumes/raw", "-o", out, "--budget", ds.budget,
            "--window", ",".join(map(str, ds.window)), "--exclude", exclude,
            "--no-progress", "--overwrite", log=log)  # fmt: skip
    rois = json.loads((out / "rois.json").read_text())["rois"]
    return [
        [[b, b + s] for b, s in zip(r["offset_voxels"], r["shape_voxels"], strict=True)]
        for r in rois
    ]


def random_boxes(ds: Dataset, shape: tuple[int, ...], seed: int) -> list[Box]:
    """``budget`` non-overlapping boxes of the window's shape, uniformly placed in train_z."""
    rng = np.random.default_rng(1000 + seed)
    zone = (ds.train_z[1] - ds.train_z[0], *shape[1:])
    boxes: list[Box] = []
    while len(boxes) < ds.budget:
        lo = [int(rng.integers(0, n - w + 1)) for n, w in zip(zone, ds.window, strict=True)]
        box = [[a + (ds.train_z[0] if i == 0 else 0), 0] for i, a in enumerate(lo)]
        for b, w in zip(box, ds.window, strict=True):
            b[1] = b[0] + w
        if all(any(b[0] >= o[1] or o[0] >= b[1] for b, o in zip(box, other, strict=True))
               for other in boxes):  # fmt: skip
            boxes.append(box)
    return boxes


def volume_shape(path: Path) -> tuple[int, ...]:
    from ssn_deploy.volumes import open_volume

    return tuple(open_volume(f"{path}:volumes/raw").shape)


# --- configs -------------------------------------------------------------------------------


def arm_config(
    ds: Dataset, arm: str, boxes: list[Box] | None, seed: int, args: argparse.Namespace,
    init_from: Path | None,
) -> dict[str, Any]:  # fmt: skip
    data = args.data
    pool = (1, 2, 2) if not ds.isotropic else (2, 2, 2)
    method = METHOD.get(arm.rsplit("-", 1)[0], "supervised")
    iterations = args.iterations - (args.warmup if method != "supervised" else 0)
    config: dict[str, Any] = {
        "model": {
            "name": "unet3d",
            "filters": FILTERS,
            "poolings": [list(pool)] * (len(FILTERS) - 1),
            "offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]],
            "embed_kernel": [3, 5, 5] if ds.isotropic else [1, 5, 5],
            "skip": "concat",
            "norm": "batch",
        },
        "data": {
            "raw": f"{data / ds.file}:volumes/raw",
            "labels": f"{data / ds.file}:volumes/labels/neuron_ids",
            "train_z": list(ds.train_z),
            "val_z": list(ds.val_z),
            "test_z": list(ds.test_z),
            "isotropic": ds.isotropic,
            "rois": boxes,
        },
        "training": {
            "iterations": iterations,
            "crop": list(ds.crop),
            "lr": 1.0e-3,
            "amp": "bf16" if bf16_native() else "none",
            "threads": args.threads,
            "seed": seed,
            "log_every": 20,
            "checkpoint_every": args.warmup if method == "supervised" else args.val_every,
            "val_every": args.val_every,
            "init_from": str(init_from) if init_from else None,
        },
        "validation": {"thresholds": list(ds.thresholds)},
    }
    if method != "supervised":
        config["semi"] = {
            "method": method,
            "unlabeled": [
                {"raw": f"{data / f}:volumes/raw", **({"z": list(z)} if z else {})}
                for f, z in ds.unlabelled
            ],
        }
    return config


def bf16_native() -> bool:
    """bf16 autocast only where the CPU has it natively (emulated bf16 is slower than fp32)."""
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# --- one run -------------------------------------------------------------------------------


def run_arm(
    ds_name: str, arm: str, seed: int, args: argparse.Namespace, boxes: list[Box] | None
) -> dict[str, Any]:
    """Train one arm (resuming), then infer + evaluate its best checkpoint on the test region."""
    work = args.work / ds_name / f"seed{seed}"
    init = None
    if arm != "full" and not arm.startswith("supervised"):
        parent = f"supervised-{arm.rsplit('-', 1)[-1]}"
        init = work / parent / "train" / "checkpoints" / f"iter_{args.warmup:07d}.ckpt"
        if not init.exists():  # recompute the warm-up (e.g. on a fresh machine)
            train_to(ds_name, parent, seed, args, boxes, None, args.warmup)
    start = time.perf_counter()
    config = train_to(ds_name, arm, seed, args, None if arm == "full" else boxes, init, None)
    train_s = time.perf_counter() - start
    run = work / arm
    test = args.work / ds_name / "test"
    start = time.perf_counter()
    cli("infer", test / "raw.zarr", "-o", run / "test.zarr", "--model", run / "train" / "best.ckpt",
        "--threads", args.threads, "--workers", 1, "--no-progress", "--no-preview",
        "--overwrite", log=run / "commands.log")  # fmt: skip
    cli("evaluate", run / "test.zarr" / "segmentation", test / "gt.zarr", "--json",
        "--output", run / "test.json", "--overwrite", log=run / "commands.log")  # fmt: skip
    test_s = time.perf_counter() - start
    metrics = json.loads((run / "test.json").read_text())
    shutil.rmtree(run / "test.zarr")
    history = c.validation_history(run / "train" / "log.csv")
    best = min(history, key=lambda r: r["voi"])
    return {
        "dataset": ds_name,
        "arm": arm,
        "seed": seed,
        "voi": metrics["voi"],
        "voi_split": metrics["voi_split"],
        "voi_merge": metrics["voi_merge"],
        "arand": metrics["arand"],
        "threshold": best["threshold"],
        "best_iteration": best["iteration"] + (args.warmup if init else 0),
        "val_voi": best["voi"],
        "validation": history,
        "label_boxes": None if arm == "full" else boxes,
        "updates": args.iterations,
        "train_s": round(train_s, 1),
        "test_s": round(test_s, 1),
        "config": config,
    }


def train_to(
    ds_name: str, arm: str, seed: int, args: argparse.Namespace, boxes: list[Box] | None,
    init: Path | None, stop: int | None,
) -> dict[str, Any]:  # fmt: skip
    """``ssn-deploy train`` for ``arm`` (to ``stop`` updates if given), resuming its run."""
    run = args.work / ds_name / f"seed{seed}" / arm
    run.mkdir(parents=True, exist_ok=True)
    config = arm_config(DATASETS[ds_name], arm, boxes, seed, args, init)
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    resume = ["--resume"] if (run / "train" / "last.ckpt").exists() else ["--overwrite"]
    extra = ["--iterations", stop] if stop else []
    cli("train", path, "-o", run / "train", *resume, *extra, log=run / "commands.log")
    return config


# --- summary -------------------------------------------------------------------------------


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Mean ± std per dataset and arm, and the two effects the ablation asks about."""
    out: dict[str, Any] = {}
    for ds in args.datasets:
        arms: dict[str, Any] = {}
        for arm in ARMS:
            rows = [r for r in runs if r["dataset"] == ds and r["arm"] == arm]
            if not rows:
                continue
            arms[arm] = {"seeds": [r["seed"] for r in rows]} | {
                key: stats([r[key] for r in rows])
                for key in ("voi", "voi_split", "voi_merge", "arand")
            }
        effects = {}
        for name, a, b in (
            ("mixing (iic-cgs vs supervised-cgs)", "iic-cgs", "supervised-cgs"),
            ("mixing (iic-random vs supervised-random)", "iic-random", "supervised-random"),
            ("selection (supervised-cgs vs supervised-random)", "supervised-cgs",
             "supervised-random"),
            ("selection (iic-cgs vs iic-random)", "iic-cgs", "iic-random"),
            ("mixing vs mean teacher (iic-cgs vs mean-teacher-cgs)", "iic-cgs",
             "mean-teacher-cgs"),
        ):  # fmt: skip
            if a in arms and b in arms:
                effects[name] = effect(arms[a]["voi"], arms[b]["voi"])
        out[ds] = {"arms": arms, "effects_on_voi": effects}
    return out


def stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "values": values,
    }


def effect(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Difference of means (negative: ``a`` segments better) in units of the seed noise."""
    diff = a["mean"] - b["mean"]
    spreads = [s for s in (a["std"], b["std"]) if s is not None]
    # seed noise only when both arms have it (≥ 2 seeds each)
    pooled = math.sqrt(sum(s * s for s in spreads) / 2) if len(spreads) == 2 else None
    return {
        "voi_difference": diff,
        "pooled_seed_std": pooled,
        "in_seed_std": diff / pooled if pooled else None,
    }


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(6 * len(summary), 4), squeeze=False)
    for ax, (ds, block) in zip(axes[0], summary.items(), strict=True):
        names = list(block["arms"])
        means = [block["arms"][n]["voi"]["mean"] for n in names]
        stds = [block["arms"][n]["voi"]["std"] or 0 for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="#4c72b0")
        for i, n in enumerate(names):
            ax.scatter([i] * len(block["arms"][n]["voi"]["values"]),
                       block["arms"][n]["voi"]["values"], color="k", s=8, zorder=3)  # fmt: skip
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("test VOI (lower is better)")
        ax.set_title(f"{ds}: {DATASETS[ds].file}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------


def prepare_test(ds_name: str, args: argparse.Namespace) -> None:
    ds = DATASETS[ds_name]
    test = args.work / ds_name / "test"
    test.mkdir(parents=True, exist_ok=True)
    roi = f"{ds.test_z[0]}:{ds.test_z[1]},:,:"
    for name, dataset in (("raw", "volumes/raw"), ("gt", "volumes/labels/neuron_ids")):
        if not (test / f"{name}.zarr").exists():
            cli("convert", f"{args.data / ds.file}:{dataset}", test / f"{name}.zarr", "--roi", roi,
                "--no-progress", log=test / "commands.log")  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.quick:
        args.iterations, args.warmup, args.val_every, args.seeds = 20, 10, 10, args.seeds[:1]
        args.results = args.results.with_name(args.results.name + "_quick")
    args.work = args.work.resolve()
    args.results.mkdir(parents=True, exist_ok=True)
    name = args.results.name
    report_path = args.results.parent / f"{name}.json"
    png_path = args.results.parent / f"{name}.png"
    if args.report_only:
        write_report(args, report_path, png_path)
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    for ds_name in args.datasets:
        ds = DATASETS[ds_name]
        prepare_test(ds_name, args)
        shape = volume_shape(args.data / ds.file)
        cgs = cgs_boxes(ds, args.data, args.work / ds_name, args.work / ds_name / "select.log")
        for seed in args.seeds:
            for arm in args.arms:
                done = args.results / ds_name / f"seed{seed}_{arm}.json"
                if done.exists():
                    continue
                boxes = cgs if arm.endswith("cgs") else random_boxes(ds, shape, seed)
                print(f"{ds_name} seed {seed} {arm} ...", flush=True)
                row = run_arm(ds_name, arm, seed, args, boxes)
                done.parent.mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps(row, indent=1) + "\n")
                print(f"  test VOI {row['voi']:.3f} (split {row['voi_split']:.3f} / merge "
                      f"{row['voi_merge']:.3f}), ARAND {row['arand']:.3f}; train "
                      f"{row['train_s']:.0f} s", flush=True)  # fmt: skip
                write_report(args, report_path, png_path)
    write_report(args, report_path, png_path)


def write_report(args: argparse.Namespace, report_path: Path, png_path: Path) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(args.results.glob("*/seed*_*.json"))]
    runs = [r for r in runs if r["dataset"] in args.datasets]
    if not runs:
        return
    summary = summarise(runs, args)
    fractions = {}
    for ds_name in args.datasets:
        ds = DATASETS[ds_name]
        shape = volume_shape(args.data / ds.file)
        zone = (ds.label_zone[1] - ds.label_zone[0]) * shape[1] * shape[2]
        fractions[ds_name] = ds.budget * math.prod(ds.window) / zone
    report = {
        "benchmark": "ssl_ablation",
        "command": " ".join(["python", *sys.argv]),
        "quick": args.quick,
        "scale": {
            "model_filters": FILTERS,
            "updates_per_arm": args.iterations,
            "warmup_updates": args.warmup,
            "batch_size": 1,
            "crop": {d: list(DATASETS[d].crop) for d in args.datasets},
            "threads": args.threads,
            "device": "cpu",
        },
        "label_fraction": fractions,
        "datasets": {
            d: DATASETS[d].__dict__ | {"label_zone": DATASETS[d].label_zone} for d in args.datasets
        },
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "config"} for r in runs],
    }
    report_path.write_text(json.dumps(report, indent=1, default=list) + "\n")
    plot(summary, png_path)


if __name__ == "__main__":
    main()
