"""Benchmark ``ssn-deploy evaluate`` on the whole fib_medulla_250 labels against scikit-image.

The segmentation is the ground truth with large bodies merged in pairs and others cut in two by
a plane, written to a temporary HDF5 file. Ours runs through the CLI's code path (open_volume +
metrics.evaluate, I/O included) and as the CLI itself in a child process (for its peak memory);
scikit-image's variation_of_information + adapted_rand_error run on the same arrays in memory,
in the same run. Writes benchmarks/results/evaluate.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from subprocess import DEVNULL, PIPE
from typing import Any, TypeVar

import h5py
import numpy as np
import skimage
from skimage.metrics import adapted_rand_error, variation_of_information

from ssn_deploy import __version__
from ssn_deploy.metrics import evaluate
from ssn_deploy.volumes import open_volume

REPO = Path(__file__).resolve().parents[1]
LABELS = "volumes/labels/neuron_ids"
T = TypeVar("T")


def perturb(gt: np.ndarray, n_merge_pairs: int, n_split: int) -> np.ndarray:
    """Merge the 2·n_merge_pairs largest bodies in pairs; cut the next n_split by x = middle.

    New ids stay just above the largest gt id, so scikit-image (whose tables are sized by the
    largest id) can run on the same arrays.
    """
    ids, sizes = np.unique(gt[gt != 0], return_counts=True)
    big = ids[np.argsort(sizes)[::-1][: 2 * n_merge_pairs + n_split]]
    seg = gt.copy()
    pairs = big[: 2 * n_merge_pairs].reshape(-1, 2)
    for keep, gone in pairs:
        seg[gt == gone] = keep
    x = np.arange(gt.shape[2])[None, None, :]
    for i, body in enumerate(big[2 * n_merge_pairs :]):
        inside = gt == body
        middle = np.flatnonzero(inside.any(axis=(0, 1))).mean()
        seg[inside & (x > middle)] = gt.max() + 1 + i
    return seg


def write_labels(path: Path, labels: np.ndarray, resolution: np.ndarray) -> str:
    with h5py.File(path, "w") as f:
        f.create_dataset(LABELS, data=labels, chunks=(32, 128, 128), compression="gzip")
        f[LABELS].attrs["resolution"] = resolution
    return f"{path}:{LABELS}"


def read(spec: str) -> np.ndarray:
    with open_volume(spec) as volume:
        return volume.read()


def write_perturbed(gt_spec: str, path: Path) -> str:
    """Write the perturbed copy of the gt labels as an HDF5 volume; return its spec."""
    with open_volume(gt_spec) as volume:
        gt = volume.read()
        resolution = np.asarray(volume.voxel_size)
    return write_labels(path, perturb(gt, n_merge_pairs=10, n_split=10), resolution)


# The CLI in a fresh interpreter that reports its own peak resident memory (Linux VmHWM): a
# child's ru_maxrss would include the parent's pages it was forked from.
CHILD = """import sys
from ssn_deploy.cli import main
try:
    main(sys.argv[1:])
finally:
    peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM")]
    print(peak[0].split()[1] if peak else "nan", file=sys.stderr)
"""


def run_cli(seg_spec: str, gt_spec: str) -> float:
    """Run ``ssn-deploy evaluate`` as its own process; return its peak RSS in MiB."""
    args = [sys.executable, "-c", CHILD, "evaluate", seg_spec, gt_spec, "--json"]
    child = subprocess.run(args, check=True, stdout=DEVNULL, stderr=PIPE, text=True)
    return float(child.stderr.split()[-1]) / 1024


def cli_path(seg_spec: str, gt_spec: str) -> dict:
    """What ``ssn-deploy evaluate`` runs: open both volumes, evaluate them block by block."""
    with open_volume(seg_spec) as seg, open_volume(gt_spec) as gt:
        return evaluate(seg, gt)


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[float, T]:
    """Wall seconds of one call, and its result."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def best_of(repeat: int, fn: Callable[..., T], *args: Any) -> tuple[float, T]:
    """The fastest of ``repeat`` calls (the machine is shared), and its result."""
    return min((timed(fn, *args) for _ in range(repeat)), key=lambda run: run[0])


def skimage_scores(seg: np.ndarray, gt: np.ndarray) -> dict:
    split, merge = variation_of_information(gt, seg, ignore_labels=[0])
    are, recall, precision = adapted_rand_error(gt, seg, ignore_labels=[0])  # swapped, #6485
    return {"voi_split": split, "voi_merge": merge, "arand": are, "rand_precision": precision,
            "rand_recall": recall}  # fmt: skip


def git_revision() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return result.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each (best kept)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks/results/evaluate.json")
    args = parser.parse_args()

    gt_spec = f"{args.data / 'fib_medulla_250.hdf'}:{LABELS}"
    with tempfile.TemporaryDirectory() as tmp:
        seg_spec = write_perturbed(gt_spec, Path(tmp) / "perturbed.hdf")
        cli_s, cli_peak_mib = timed(run_cli, seg_spec, gt_spec)
        ours_s, ours = best_of(args.repeat, cli_path, seg_spec, gt_spec)
        tracemalloc.start()
        cli_path(seg_spec, gt_spec)
        traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        seg, gt = read(seg_spec), read(gt_spec)

    ours_mem_s, _ = best_of(args.repeat, evaluate, seg, gt)
    skimage_s, reference = best_of(args.repeat, skimage_scores, seg, gt)
    max_diff = max(abs(ours[key] - value) for key, value in reference.items())

    result = {
        "benchmark": "evaluate",
        "data": "fib_medulla_250 labels vs 10 merged pairs + 10 plane-split bodies",
        "n_voxels": int(gt.size),
        "ours_seconds_with_io": ours_s,
        "ours_voxels_per_second": gt.size / ours_s,
        "ours_seconds_in_memory": ours_mem_s,
        "cli_subprocess_seconds": cli_s,
        "cli_peak_rss_mib": cli_peak_mib,
        "ours_traced_peak_mib": traced_peak / 2**20,
        "skimage_seconds_in_memory": skimage_s,
        "speedup_vs_skimage_in_memory": skimage_s / ours_mem_s,
        "speedup_vs_skimage_ours_with_io": skimage_s / ours_s,
        "max_abs_diff_vs_skimage": max_diff,
        "metrics": ours,
        "versions": {"ssn_deploy": __version__, "numpy": np.__version__,
                     "skimage": skimage.__version__, "python": platform.python_version()},
        "git_revision": git_revision(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")

    print(f"voxels                         {gt.size:,}")
    print(
        f"ours (open_volume + evaluate)  {ours_s:.3f} s  ({gt.size / ours_s / 1e6:.1f} M voxels/s)"
    )
    print(f"ours, arrays in memory         {ours_mem_s:.3f} s")
    print(f"ssn-deploy evaluate (process)  {cli_s:.3f} s, peak RSS {cli_peak_mib:.0f} MiB")
    print(f"ours, traced numpy peak        {traced_peak / 2**20:.0f} MiB")
    print(f"skimage VOI + ARAND in memory  {skimage_s:.3f} s")
    print(f"speed-up vs skimage            {skimage_s / ours_mem_s:.1f}x in memory, "
          f"{skimage_s / ours_s:.1f}x counting our I/O")  # fmt: skip
    print(f"max |ours - skimage|           {max_diff:.2e}")
    print(f"VOI split/merge {ours['voi_split']:.4f}/{ours['voi_merge']:.4f}, "
          f"ARAND {ours['arand']:.4f}, CREMI {ours['cremi_score']:.4f}, "
          f"split {ours['n_split_bodies']}, merged {ours['n_merged_segments']}")  # fmt: skip
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
