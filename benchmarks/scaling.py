"""Scaling with volume size (issue 13): ``ssn-deploy infer`` on 128³, 256³ and 512³ crops.

Centre crops of fib_medulla_520_raw (520³ uint8, 10 nm isotropic), written once into
``--work`` by ``ssn-deploy convert --roi``, are each segmented by ``ssn-deploy infer CROP -o OUT
--json --no-progress`` (otherwise every default: the packaged model, the default backend, the
preview) in a subprocess, one at a time, smallest first. Reported per size:

- wall seconds of the process, and of each stage from infer's own ``stage_seconds`` (setup incl.
  model load, affinities, their pyramid, fragments, their pyramid, edge statistics,
  agglomeration, relabel, the segmentation's pyramid, preview, other = dask cluster start-up
  and output creation; "startup" = process wall − their sum: imports and interpreter exit);
- MVox/s and µs per voxel, whole and per stage;
- peak memory two ways: ``peak_rss_mib``, the kernel's exact high-water RSS of the infer process
  (``ru_maxrss`` from ``os.wait4`` on it: the largest single process; infer's dask cluster runs
  as threads in that process), and ``peak_tree_rss_mib``, the RSS summed over the process and
  its children, sampled with psutil every 0.2 s (may miss a shorter spike).

Then the ratios largest/smallest size of time per voxel and of peak RSS (``ru_maxrss``) — the
issue's acceptance at 512³/128³: ≤ 1.3 and ≤ 1.5 — and 1 vs 2 dask workers (``--workers 2``,
intra-op threads per model then cores/2) at ``--workers-size`` (the 1-worker row is the size
series' run), and once more at that size with ``SSN_DEPLOY_MALLOC_TRIM=0`` (glibc's own trim
and mmap thresholds instead of the ones the CLI fixes, ``ssn_deploy/memory.py``): the peak RSS
with and without (``--malloc-only`` adds just that comparison to an existing JSON). Writes
benchmarks/results/scaling.json (``--quick``: scaling_quick.json) and a
plot beside it (same stem, .png).

    python benchmarks/scaling.py [--sizes 128 256 512] [--workers-size 256] [--repeat 1]
    python benchmarks/scaling.py --quick   # sizes 64 128, workers at 128: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as c
import psutil
from end_to_end import revision

from ssn_deploy.pipeline import INFER_STAGES

SIZES = (128, 256, 512)
QUICK_SIZES = (64, 128)
SAMPLE_S = 0.2
RAW_SHAPE = 520
ACCEPTANCE = {"time_per_voxel": 1.3, "peak_rss": 1.5}  # 512³ over 128³
STAGES = (*INFER_STAGES, "startup")  # startup: imports and exit, outside infer()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", help=f"crop edges (default {SIZES})")
    parser.add_argument("--workers-size", type=int, help="edge of the 1 vs 2 workers runs "
                        "(default 256; --quick: the largest size)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1, help="runs per size, best kept")
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}: a smoke run")
    parser.add_argument("--malloc-only", action="store_true", help="only the malloc comparison, "
                        "added to the existing --output JSON")  # fmt: skip
    parser.add_argument("--data", type=Path, default=c.DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=c.REPO / "runs" / "scaling")
    parser.add_argument("--output", type=Path, help="JSON to write (the plot goes beside it)")
    args = parser.parse_args()
    args.output = args.output or c.RESULTS / ("scaling_quick.json" if args.quick else
                                              "scaling.json")  # fmt: skip
    args.sizes = sorted(set(args.sizes or (QUICK_SIZES if args.quick else SIZES)))
    if args.workers_size is None:
        args.workers_size = args.sizes[-1] if args.quick else 256
    if any(not 0 < n <= RAW_SHAPE for n in [*args.sizes, args.workers_size]):
        parser.error(f"sizes must lie in 1..{RAW_SHAPE}")
    return args


def exe() -> str:
    return str(Path(sys.executable).parent / "ssn-deploy")


def crop(args: argparse.Namespace, size: int) -> Path:
    """The centre ``size``³ of the 520³ volume as zarr (written once, reused)."""
    path = args.work / f"raw_{size}.zarr"
    if path.exists():
        return path
    begin = (RAW_SHAPE - size) // 2
    roi = ",".join([f"{begin}:{begin + size}"] * 3)
    partial = args.work / f"partial_raw_{size}.zarr"
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run([exe(), "convert", f"{args.data / c.RAW_520}:volumes/raw", str(partial),
                    "--roi", roi, "--no-progress", "-q"], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    partial.rename(path)
    return path


def tree_rss(root: psutil.Process) -> tuple[int, int]:
    """Bytes resident in ``root`` and its descendants, and how many processes that is."""
    total, count = 0, 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
            count += 1
        except psutil.Error:  # exited between listing and reading
            pass
    return total, count


def run_infer(
    raw: Path, out: Path, workers: int, log: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """One ``ssn-deploy infer`` subprocess: wall seconds, its JSON report, peak memory."""
    command = [exe(), "infer", str(raw), "-o", str(out), "--json", "--no-progress"]
    if workers != 1:
        command += ["--workers", str(workers)]
    load = os.getloadavg()[0]
    with open(log.with_suffix(".out"), "w") as stdout, open(log.with_suffix(".err"), "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            command, stdout=stdout, stderr=err, env={**os.environ, **(env or {})}
        )
        root = psutil.Process(proc.pid)
        peak_tree, most_procs = 0, 0
        while True:  # sample, then reap it ourselves: wait4 gives this child's own ru_maxrss
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss, count = tree_rss(root)
            peak_tree, most_procs = max(peak_tree, rss), max(most_procs, count)
            time.sleep(SAMPLE_S)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = log.with_suffix(".err").read_text()[-3000:]
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}\n{tail}")
    report = json.loads(log.with_suffix(".out").read_text().strip().splitlines()[-1])
    stages = dict(report["stage_seconds"])
    stages["startup"] = seconds - sum(stages.values())
    return {
        "command": " ".join([*(f"{k}={v}" for k, v in (env or {}).items()), *command]),
        "workers": workers,
        "seconds": seconds,
        "stage_seconds": stages,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux: KiB
        "peak_tree_rss_mib": peak_tree / 2**20,
        "processes_max": most_procs,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "load_average_1min_before": load,
        "voxels": report["voxels"],
        "model": report["model"],
        "geometry": report["geometry"],
    }


def measure(
    args: argparse.Namespace, size: int, workers: int, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Best of ``--repeat`` runs (by wall time); every run's seconds kept."""
    raw = crop(args, size)
    runs = []
    for i in range(args.repeat):
        out = args.work / f"out_{size}_w{workers}.zarr"
        log = args.work / f"infer_{size}_w{workers}{'_env' if env else ''}_{i}"
        runs.append(run_infer(raw, out, workers, log, env))
        shutil.rmtree(out, ignore_errors=True)  # 512³ writes ~1 GB of outputs
        Path(str(out).removesuffix(".zarr") + ".preview.png").unlink(missing_ok=True)
        r = runs[-1]
        print(f"{size}³ workers={workers}: {r['seconds']:.1f} s, peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB (load {r['load_average_1min_before']:.2f})",
              flush=True)  # fmt: skip
    best = dict(min(runs, key=lambda r: r["seconds"]))
    voxels = best["voxels"]
    best |= {
        "size": size,
        "all_seconds": [r["seconds"] for r in runs],
        "mvox_per_s": voxels / best["seconds"] / 1e6,
        "us_per_voxel": best["seconds"] / voxels * 1e6,
        "stage_us_per_voxel": {k: v / voxels * 1e6 for k, v in best["stage_seconds"].items()},
    }
    return best


def ratios(rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Largest over smallest size: time per voxel (whole and per stage) and peak memory."""
    small, large = rows[min(rows)], rows[max(rows)]
    out: dict[str, Any] = {
        "sizes": f"{large['size']}^3 / {small['size']}^3",
        "time_per_voxel": large["us_per_voxel"] / small["us_per_voxel"],
        "peak_rss": large["peak_rss_mib"] / small["peak_rss_mib"],
        "peak_tree_rss": large["peak_tree_rss_mib"] / small["peak_tree_rss_mib"],
        "stage_time_per_voxel": {
            k: large["stage_us_per_voxel"][k] / v
            for k, v in small["stage_us_per_voxel"].items()
            if v > 0 and k in large["stage_us_per_voxel"]
        },
    }
    if (small["size"], large["size"]) == (128, 512):
        out["acceptance"] = {
            key: {"limit": limit, "met": out[key] <= limit} for key, limit in ACCEPTANCE.items()
        }
    else:
        out["acceptance"] = "defined for 512^3 / 128^3 only (run with --sizes 128 ... 512)"
    return out


def print_report(rows: dict[int, dict[str, Any]], report: dict[str, Any]) -> None:
    header = ["size", "MVox", "wall s", "MVox/s", "µs/vox", "peak RSS MiB", "tree RSS MiB"]
    c.print_table(header, [
        [f"{n}³", c.fmt(r["voxels"] / 1e6), c.fmt(r["seconds"], ".1f"),
         c.fmt(r["mvox_per_s"]), c.fmt(r["us_per_voxel"]), c.fmt(r["peak_rss_mib"], ".0f"),
         c.fmt(r["peak_tree_rss_mib"], ".0f")]
        for n, r in rows.items()
    ])  # fmt: skip
    print()
    c.print_table(["stage (s)", *(f"{n}³" for n in rows)], [
        [stage, *(c.fmt(r["stage_seconds"].get(stage), ".2f") for r in rows.values())]
        for stage in STAGES
    ])  # fmt: skip
    ratio = report["ratios"]
    if isinstance(ratio, dict):
        print(f"\n{ratio['sizes']}: time per voxel {ratio['time_per_voxel']:.2f}, peak RSS "
              f"{ratio['peak_rss']:.2f} (tree, sampled: {ratio['peak_tree_rss']:.2f})")  # fmt: skip
        if isinstance(ratio["acceptance"], dict):
            for key, verdict in ratio["acceptance"].items():
                print(f"  {key} <= {verdict['limit']}: {'met' if verdict['met'] else 'NOT met'}")
        else:
            print(f"  acceptance: {ratio['acceptance']}")
    w = report["workers"]
    print(f"workers at {w['size']}³: 1 worker {w['1']['seconds']:.1f} s "
          f"({w['1']['peak_rss_mib']:.0f} MiB), 2 workers {w['2']['seconds']:.1f} s "
          f"({w['2']['peak_rss_mib']:.0f} MiB): speed-up {w['speedup_2_over_1']:.2f}")  # fmt: skip


def plot(rows: dict[int, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=(1.25, 1))
    left.plot(sizes, [r["us_per_voxel"] for r in rows.values()], "k-o", lw=2, label="whole run")
    colours = plt.get_cmap("tab20").colors
    for i, stage in enumerate(STAGES):
        values = [r["stage_us_per_voxel"].get(stage, 0.0) for r in rows.values()]
        if max(values) > 0:
            left.plot(sizes, values, "-o", ms=3, color=colours[i], label=stage)
    left.set(xscale="log", yscale="log", xlabel="crop edge (voxels)", ylabel="µs per voxel",
             title="time per voxel (wall), by stage")  # fmt: skip
    right.plot(sizes, [r["peak_rss_mib"] for r in rows.values()], "-o",
               label="infer process (ru_maxrss, exact)")  # fmt: skip
    right.plot(sizes, [r["peak_tree_rss_mib"] for r in rows.values()], "--s",
               label=f"process tree (psutil, every {SAMPLE_S} s)")  # fmt: skip
    right.set(xscale="log", xlabel="crop edge (voxels)", ylabel="MiB", title="peak RSS",
              ylim=(0, None))  # fmt: skip
    for ax in (left, right):
        ax.set_xticks(sizes, [f"{n}³" for n in sizes])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    left.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    right.legend(fontsize=8)
    fig.suptitle("ssn-deploy infer (defaults) on centre crops of fib_medulla_520_raw")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path.relative_to(c.REPO) if path.is_relative_to(c.REPO) else path}")


def malloc_comparison(args: argparse.Namespace, trimmed: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS at ``--workers-size`` with the CLI's fixed malloc thresholds and with glibc's."""
    untrimmed = measure(args, args.workers_size, 1, env={"SSN_DEPLOY_MALLOC_TRIM": "0"})
    result = {
        "size": args.workers_size,
        "fixed_thresholds": {k: trimmed[k] for k in ("peak_rss_mib", "seconds", "command")},
        "glibc_default": {k: untrimmed[k] for k in ("peak_rss_mib", "seconds", "command")},
    }
    result["peak_rss_ratio_trim_over_default"] = trimmed["peak_rss_mib"] / untrimmed["peak_rss_mib"]
    print(f"malloc at {args.workers_size}³: fixed thresholds {trimmed['peak_rss_mib']:.0f} MiB, "
          f"glibc default {untrimmed['peak_rss_mib']:.0f} MiB")  # fmt: skip
    return result


def main() -> None:
    args = parse_args()
    if not (args.data / c.RAW_520).is_file():
        raise SystemExit(f"{args.data / c.RAW_520} not found; pass --data FOLDER")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.malloc_only:
        report = json.loads(args.output.read_text())
        report["malloc"] = malloc_comparison(args, report["workers"]["1"])
        report["malloc"]["revision"] = revision()
        c.write_json(args.output, report)
        return
    machine = c.machine_info(os.cpu_count() or 1, "cpu")
    started = time.perf_counter()
    rows = {n: measure(args, n, workers=1) for n in args.sizes}
    one = rows.get(args.workers_size) or measure(args, args.workers_size, workers=1)
    two = measure(args, args.workers_size, workers=2)
    report = {
        "benchmark": "scaling",
        "command": " ".join(["python", *sys.argv]),
        "revision": revision(),
        "ssn_deploy": c.package_version("ssn-deploy"),
        "machine": machine | {"load_average_end": os.getloadavg()},
        "settings": "ssn-deploy infer CROP -o OUT --json --no-progress (every other option at "
        "its default); crops: centre of fib_medulla_520_raw:volumes/raw, 10 nm isotropic",
        "memory": "peak_rss_mib: ru_maxrss of the infer process (os.wait4; exact, largest "
        f"single process); peak_tree_rss_mib: RSS summed over its process tree, sampled every "
        f"{SAMPLE_S} s with psutil; the ratio uses peak_rss_mib",
        "benchmark_seconds": time.perf_counter() - started,
        "sizes": {str(n): r for n, r in rows.items()},
        "workers": {
            "size": args.workers_size,
            "1": one,
            "2": two,
            "speedup_2_over_1": one["seconds"] / two["seconds"],
        },
    }
    report["malloc"] = malloc_comparison(args, one)
    report["ratios"] = ratios(rows) if len(rows) > 1 else "one size: no ratio"
    print()
    print_report(rows, report)
    c.write_json(args.output, report)
    plot(rows, args.output.with_suffix(".png"))


if __name__ == "__main__":
    main()
