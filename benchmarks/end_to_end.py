"""End to end at default settings (issue 13): ``ssn-deploy infer`` now vs an earlier revision.

Two volumes a new user meets: the bundled demo (``ssn-deploy sample``, 80×160×160) and the
fib_medulla_250 test region (z ∈ [125, 250), 125×250×250). Each is segmented by
``ssn-deploy infer VOLUME -o OUT`` with no other option (the packaged model, every default)
by this tree and by ``--baseline`` (a git revision, extracted with ``git archive`` and run
from the same environment), runs interleaved, best of ``--repeat``; then scored against its
ground truth with this tree's ``ssn-deploy evaluate``. Reported per volume: wall seconds,
MVox/s and peak RSS of each, the speed-up, and both VOIs (goal: ≥ 2× at the same VOI ± 0.01).
Writes benchmarks/results/end_to_end.json.

    python benchmarks/end_to_end.py [--baseline 494cec9] [--repeat 2] [--work runs/end_to_end]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c
import numpy as np

BASELINE = "494cec9"  # main before the fitted patch lattice and the compiled watershed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare with")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--data", type=Path, default=c.DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=c.REPO / "runs" / "end_to_end")
    parser.add_argument("--output", type=Path, default=c.RESULTS / "end_to_end.json")
    return parser.parse_args()


def baseline_launcher(revision: str, root: Path) -> Path:
    """An ``ssn-deploy`` that imports the package of ``revision`` and every dependency from
    this environment: the revision's tree first on ``sys.path`` of a dependency-less venv."""
    tree = root / "tree"
    tree.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(c.REPO), "archive", revision, "ssn_deploy"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "00-baseline.pth").write_text(f"{tree}\n{sysconfig.get_paths()['purelib']}\n")
    launcher = venv / "bin" / "ssn-deploy"
    launcher.write_text(
        f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom ssn_deploy.cli import main\n"
        "sys.exit(main())\n"
    )
    launcher.chmod(0o755)
    return launcher


def timed(command: list[str]) -> dict[str, Any]:
    """Wall seconds and peak RSS (GNU time) of one command."""
    start = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-f", "maxrss_kb=%M", *command],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    rss = re.search(r"maxrss_kb=(\d+)", done.stderr)
    return {"seconds": seconds, "peak_rss_mib": int(rss.group(1)) / 1024 if rss else None}


def voi(seg: Path, gt: Path) -> dict[str, float]:
    exe = Path(sys.executable).parent / "ssn-deploy"
    out = subprocess.run(
        [str(exe), "evaluate", str(seg), str(gt), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    d = json.loads(out)
    return {k: d[k] for k in ("voi", "voi_split", "voi_merge", "arand")}


def volumes(args: argparse.Namespace) -> dict[str, tuple[Path, Path]]:
    """Raw and ground truth of each case, written once into ``--work``."""
    exe = Path(sys.executable).parent / "ssn-deploy"
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "demo" / "raw.zarr").exists():
        subprocess.run([str(exe), "sample", str(work / "demo"), "--overwrite"], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    test = work / "test_region"
    for name, dataset in (("raw", "volumes/raw"), ("gt", "volumes/labels/neuron_ids")):
        if not (test / f"{name}.zarr").exists():
            subprocess.run([str(exe), "convert", f"{args.data / c.RAW_250}:{dataset}",
                            str(test / f"{name}.zarr"), "--roi", "125:250,:,:",
                            "--no-progress"], check=True)  # fmt: skip
    return {
        "demo (bundled sample, 80x160x160)": (work / "demo" / "raw.zarr",
                                               work / "demo" / "labels.zarr"),
        "test region (fib_medulla_250 z>=125, 125x250x250)": (test / "raw.zarr",
                                                               test / "gt.zarr"),
    }  # fmt: skip


def main() -> None:
    args = parse_args()
    machine = c.machine_info(c.all_cores(), "cpu")
    cases = volumes(args)
    current = Path(sys.executable).parent / "ssn-deploy"
    report_cases: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ssn-bench-e2e-") as tmp:
        launchers = {"now": current, "baseline": baseline_launcher(args.baseline, Path(tmp))}
        for case, (raw, gt) in cases.items():
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in launchers}
            scores = {}
            for _ in range(args.repeat):
                for name, exe in launchers.items():
                    out = Path(tmp) / f"{name}.zarr"
                    command = [str(exe), "infer", str(raw), "-o", str(out), "--overwrite",
                               "--no-progress", "--no-preview"]  # fmt: skip
                    runs[name].append(timed(command))
                    print(f"{case} {name}: {runs[name][-1]['seconds']:.1f} s", flush=True)
                    scores[name] = voi(out / "segmentation", gt)
                    shutil.rmtree(out)
            report_cases[case] = summarise(runs, scores, raw)
    report = {
        "benchmark": "end_to_end",
        "command": " ".join(["python", *sys.argv]),
        "baseline_revision": args.baseline,
        "now_revision": revision(),
        "machine": machine | {"load_average_end": os.getloadavg()},
        "settings": "ssn-deploy infer VOLUME -o OUT (defaults; --no-progress --no-preview)",
        "cases": report_cases,
        "goal": "now >= 2x faster than the baseline, VOI within 0.01",
    }
    print(json.dumps(report["cases"], indent=1))
    c.write_json(args.output, report)


def revision() -> str:
    """HEAD of this tree, with ``-dirty`` when tracked files differ from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(c.REPO), *args], capture_output=True, text=True)
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")


def summarise(
    runs: dict[str, list[dict[str, Any]]], scores: dict[str, Any], raw: Path
) -> dict[str, Any]:
    from ssn_deploy.volumes import open_volume

    voxels = int(np.prod(open_volume(str(raw)).shape))
    rows = {}
    for name, timings in runs.items():
        best = min(timings, key=lambda t: t["seconds"])
        rows[name] = {
            "seconds": best["seconds"],
            "all_seconds": [t["seconds"] for t in timings],
            "mvox_per_s": voxels / best["seconds"] / 1e6,
            "peak_rss_mib": best["peak_rss_mib"],
            **scores[name],
        }
    return {
        "voxels": voxels,
        "rows": rows,
        "speedup": rows["baseline"]["seconds"] / rows["now"]["seconds"],
        "voi_change": rows["now"]["voi"] - rows["baseline"]["voi"],
    }


if __name__ == "__main__":
    main()
