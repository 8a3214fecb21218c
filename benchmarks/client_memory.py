"""The client's memory in ``segment``, global region graph vs super-blocks (issue 13, item 3).

Centre crops of fib_medulla_520_raw at 128³, 256³ and 512³ (``benchmarks/scaling.py``'s, in
``--work``), affinities from the no-network baseline (``infer --model intensity``: real EM, no
model time), then ``ssn-deploy segment AFFS --scheduler ADDR`` against a dask cluster of worker
*processes* started here, once with ``--agglomeration global`` and once with ``superblocks``.
The segment process is then the client alone: its peak RSS (VmHWM, read by the process
itself as it exits) is the client's memory, the workers' is theirs. Reported per size and
mode (``--repeat`` runs, alternating, the largest peak kept): client peak RSS and wall
seconds; the 512³/128³ ratio of client memory per mode; VOI between the two segmentations.
Writes ``benchmarks/results/client_memory.json``.

    python benchmarks/client_memory.py [--sizes 128 256 512] [--work runs/scaling]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as c
import numpy as np
from evaluate import CHILD
from scaling import crop

from ssn_deploy.metrics import evaluate
from ssn_deploy.volumes import open_volume

MODES = ("global", "superblocks")


def run_measured(args: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and stdout of one ssn-deploy process. The peak is the
    process's own VmHWM: ``ru_maxrss`` from ``os.wait4`` counted the pages of this process,
    which the child is spawned from (vfork), and grew with the arrays held here."""
    start = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if child.returncode:
        raise RuntimeError(f"ssn-deploy {' '.join(args)}: {child.stderr[-2000:]}")
    return seconds, float(child.stderr.split()[-1]) / 1024, child.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=c.DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=c.REPO / "runs" / "scaling")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--repeat", type=int, default=2, help="runs per size and mode")
    parser.add_argument("--output", type=Path, default=c.RESULTS / "client_memory.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from distributed import LocalCluster

    rows: dict[str, Any] = {}
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster:  # fmt: skip
        for size in args.sizes:
            raw = crop(args, size).resolve()
            affs = (args.work / f"intensity_{size}.zarr").resolve()
            if not (affs / "affinities").exists():
                run_measured(["infer", str(raw), "-o", str(affs), "--model", "intensity",
                              "--no-progress", "--no-preview", "--overwrite", "-q"])  # fmt: skip
            row: dict[str, Any] = {}
            segmentations = {}
            for _, mode in itertools.product(range(args.repeat), MODES):
                out = (args.work / f"client_{mode}_{size}.zarr").resolve()
                shutil.rmtree(out, ignore_errors=True)
                seconds, rss, text = run_measured([
                    "segment", str(affs / "affinities"), "-o", str(out), "--scheduler",
                    cluster.scheduler_address, "--agglomeration", mode, "--no-progress",
                ])  # fmt: skip
                segmentations[mode] = np.asarray(open_volume(f"{out}/labels/segmentation")[:])
                runs = row.setdefault(mode, {"client_peak_rss_mib_runs": [], "seconds_runs": []})
                runs["client_peak_rss_mib_runs"].append(rss)
                runs["seconds_runs"].append(seconds)
                runs["client_peak_rss_mib"] = max(runs["client_peak_rss_mib_runs"])
                runs["output"] = text.strip().splitlines()[-1]
                print(f"{size}³ {mode}: client peak {rss:.0f} MiB, {seconds:.1f} s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            row["voi_between"] = evaluate(segmentations["superblocks"], segmentations["global"])[
                "voi"
            ]
            print(f"{size}³: VOI between the modes {row['voi_between']:.4f}", flush=True)
            rows[str(size)] = row
    small, large = str(min(args.sizes)), str(max(args.sizes))
    report = {
        "benchmark": "client_memory",
        "command": " ".join(["python", *sys.argv]),
        "machine": c.machine_info(2, "cpu"),
        "affinities": "no-network baseline (infer --model intensity) on fib_medulla_520_raw crops",
        "workers": "1 dask worker process, 2 threads (LocalCluster, processes=True)",
        "sizes": rows,
        "client_peak_ratio_largest_over_smallest": {
            mode: rows[large][mode]["client_peak_rss_mib"]
            / rows[small][mode]["client_peak_rss_mib"]
            for mode in MODES
        },
    }
    c.write_json(args.output, report)


if __name__ == "__main__":
    main()
