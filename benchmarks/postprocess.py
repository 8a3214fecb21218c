"""Post-processing per core (issue 13): affinities → segmentation, ours against waterz.

On the test region of fib_medulla_250 (z ∈ [125, 250), 7.8 MVox), affinities predicted once by
``ssn-deploy infer`` with the packaged model (cached in ``--work``), then, in this process and
on one core, rows run interleaved (best of ``--repeat``):

- ``ssn-deploy segment`` (``segment_blockwise``: fragments on the tile lattice with their
  context, edge statistics, agglomeration, relabel, pyramids, zarr in and out) as now (the
  seeded watershed of ``flood.py``, one fragment tile per 128×256×256 block) and as before
  (skimage's watershed, 64×128×128 tiles);
- ``waterz.agglomerate`` end to end: its own fragments (zwatershed) and ``aff50_his256``;
- a stage breakdown of ours in memory (seeds, flood, edge statistics, merging, relabel).

The segment rows also report the seconds of each stage of their best run: fragments, edges,
agglomeration and relabel are the post-processing that issue 13's per-core goal counts
(pyramids for viewers and the in-process cluster's start come on top).

Each segmentation is scored against the ground truth (VOI split/merge, ARAND) at threshold 0.5.
Reported: seconds, MVox/s per core, and ratios. Writes benchmarks/results/postprocess.json.

    python benchmarks/postprocess.py [--repeat 2] [--work runs/postprocess] [--data DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _common as c
import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")

from ssn_deploy.agglomeration import agglomerate, edge_statistics, relabel
from ssn_deploy.agglomeration import fragments as fragment_module
from ssn_deploy.agglomeration.blockwise import segment_blockwise
from ssn_deploy.agglomeration.flood import seeded_watershed
from ssn_deploy.agglomeration.waterz_backend import AFF50_HIS256, _quiet_stdout
from ssn_deploy.inference.scheduling import recording_stages
from ssn_deploy.metrics import evaluate
from ssn_deploy.volumes import open_volume

THRESHOLD = 0.5
OURS = "ssn-deploy segment (bucket flood, 128x256x256 tiles)"
BEFORE = "ssn-deploy segment before (skimage flood, 64x128x128 tiles)"
TEST_ROI = "125:250,:,:"
POST_PROCESSING = ("fragments", "edges", "agglomeration", "relabel")
"""The stages issue 13's per-core goal names; pyramids (for viewers) are reported beside them."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=c.DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=c.REPO / "runs" / "postprocess")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--output", type=Path, default=c.RESULTS / "postprocess.json")
    return parser.parse_args()


def cli(*args: Any) -> None:
    exe = Path(sys.executable).parent / "ssn-deploy"
    subprocess.run([str(exe), *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    """The test region's raw, ground truth and affinities (infer once, reused)."""
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    src = args.data / c.RAW_250
    for name, dataset in (("raw", "volumes/raw"), ("gt", "volumes/labels/neuron_ids")):
        if not (work / f"{name}.zarr").exists():
            cli("convert", f"{src}:{dataset}", work / f"{name}.zarr", "--roi", TEST_ROI,
                "--no-progress")  # fmt: skip
    out = work / "infer.zarr"
    if not (out / "affinities").exists():
        cli("infer", work / "raw.zarr", "-o", out, "--no-progress", "--no-preview", "--overwrite")
    return out / "affinities", work / "gt.zarr"


@contextlib.contextmanager
def flood_with(name: str) -> Iterator[None]:
    """Run the fragment stage with another seeded watershed (``skimage``: the previous one)."""
    saved = fragment_module.FLOODS["bucket"]
    fragment_module.FLOODS["bucket"] = fragment_module.FLOODS[name]
    try:
        yield
    finally:
        fragment_module.FLOODS["bucket"] = saved


def segment_row(
    affinities: Path, flood: str, tile: tuple[int, int, int], tmp: Path, stages: list[dict]
) -> Callable[[], np.ndarray]:
    """``segment_blockwise`` on the stored affinities; each run's stage seconds go to ``stages``."""

    def run() -> np.ndarray:
        out = tmp / f"seg_{flood}.zarr"
        with flood_with(flood), recording_stages({}) as seconds:
            seg, _ = segment_blockwise(
                str(affinities),
                f"{out}/fragments",
                f"{out}/segmentation",
                threshold=THRESHOLD,
                block_shape=(128, 256, 256),
                fragment_tile=tile,
                workers=1,
                overwrite=True,
                progress=False,
            )
        stages.append(seconds)
        return np.asarray(seg[:])

    return run


def waterz_row(affs: np.ndarray) -> Callable[[], np.ndarray]:
    def run() -> np.ndarray:
        import waterz

        with _quiet_stdout():
            segs = [
                s.copy()
                for s in waterz.agglomerate(
                    affs, thresholds=[THRESHOLD], scoring_function=AFF50_HIS256,
                    discretize_queue=256,
                )
            ]  # fmt: skip
        return segs[0]

    return run


def stage_breakdown(affs: np.ndarray) -> dict[str, float]:
    """Our stages in memory on the whole region (no tiles, no I/O), seconds on one core."""
    from ssn_deploy.affinities import boundary_map

    out: dict[str, float] = {}
    t = time.perf_counter()
    boundary = boundary_map(affs)
    interior = boundary < fragment_module.BOUNDARY_THRESHOLD
    seeds = fragment_module._seeds(interior, 3, (1.0, 1.0, 1.0))
    out["seeds_s"] = time.perf_counter() - t
    t = time.perf_counter()
    frags = seeded_watershed(boundary, seeds).astype(np.uint64)
    out["flood_s"] = time.perf_counter() - t
    t = time.perf_counter()
    fragment_module.FLOODS["skimage"](boundary, seeds)
    out["flood_skimage_s"] = time.perf_counter() - t
    t = time.perf_counter()
    stats = edge_statistics(affs, frags)
    out["edge_statistics_s"] = time.perf_counter() - t
    t = time.perf_counter()
    history = agglomerate(stats, stop=THRESHOLD)
    out["agglomerate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    relabel(frags, history.lookup(THRESHOLD))
    out["relabel_s"] = time.perf_counter() - t
    return out


def compression(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Blosc-zstd levels on a 64×128×128 piece of each output, one thread: MB/s and ratio."""
    import numcodecs

    numcodecs.blosc.set_nthreads(1)
    out: dict[str, Any] = {}
    for name, array in arrays.items():
        piece = np.ascontiguousarray(array[..., :64, :128, :128])
        shuffle = numcodecs.Blosc.BITSHUFFLE if piece.itemsize == 1 else numcodecs.Blosc.SHUFFLE
        for level in (1, 3, 5):
            codec = numcodecs.Blosc(cname="zstd", clevel=level, shuffle=shuffle)
            encode, decode = [], []
            for _ in range(5):
                t = time.perf_counter()
                packed = codec.encode(piece)
                encode.append(time.perf_counter() - t)
                t = time.perf_counter()
                codec.decode(packed)
                decode.append(time.perf_counter() - t)
            out[f"{name} zstd {level}"] = {
                "encode_mb_per_s": piece.nbytes / min(encode) / 1e6,
                "decode_mb_per_s": piece.nbytes / min(decode) / 1e6,
                "ratio": piece.nbytes / len(packed),
            }
    return out


def score(seg: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    s = evaluate(seg, gt)
    return {k: s[k] for k in ("voi", "voi_split", "voi_merge", "arand")}


def main() -> None:
    args = parse_args()
    machine = c.machine_info(1, "cpu")
    affinities, gt_path = prepare(args)
    stored = open_volume(str(affinities))
    affs = np.asarray(stored[:], dtype=np.float32)
    if stored.dtype == np.uint8:
        affs /= 255.0
    gt = np.asarray(open_volume(str(gt_path))[:])
    voxels = int(np.prod(affs.shape[1:]))
    seeded_watershed(affs[0, :2, :8, :8], np.ones((2, 8, 8), np.int32))  # compile outside timing
    with tempfile.TemporaryDirectory(prefix="ssn-bench-post-") as tmp:
        stages: dict[str, list[dict]] = {OURS: [], BEFORE: []}
        rows = {
            OURS: segment_row(affinities, "bucket", (128, 256, 256), Path(tmp), stages[OURS]),
            BEFORE: segment_row(affinities, "skimage", (64, 128, 128), Path(tmp), stages[BEFORE]),
            "waterz.agglomerate (own fragments)": waterz_row(affs),
        }
        seconds: dict[str, list[float]] = {name: [] for name in rows}
        results: dict[str, np.ndarray] = {}
        for _, (name, run) in itertools.product(range(args.repeat), rows.items()):
            t = time.perf_counter()
            results[name] = run()
            seconds[name].append(time.perf_counter() - t)
            print(f"{name}: {seconds[name][-1]:.2f} s", flush=True)
        breakdown = stage_breakdown(affs)
        frags = np.asarray(open_volume(f"{tmp}/seg_bucket.zarr/fragments")[:])
        codecs = compression(
            {"segmentation": results[OURS], "fragments": frags, "affinities": stored[:]}
        )
    report_rows = {}
    for name, times in seconds.items():
        best = min(times)
        report_rows[name] = {
            "seconds": best,
            "all_seconds": times,
            "mvox_per_s_per_core": voxels / best / 1e6,
            **score(results[name], gt),
        }
    for name, runs in stages.items():
        best = runs[int(np.argmin(seconds[name]))]
        post = sum(best[k] for k in POST_PROCESSING)
        report_rows[name] |= {
            "stage_seconds": best,
            "post_processing_seconds": post,  # without pyramids and the cluster's start
            "post_processing_mvox_per_s_per_core": voxels / post / 1e6,
        }
    ours = report_rows[OURS]
    for row in report_rows.values():
        row["speed_vs_ours"] = ours["seconds"] / row["seconds"]
    report = {
        "benchmark": "postprocess",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine | {"load_average_end": os.getloadavg()},
        "region": f"fib_medulla_250 {TEST_ROI}",
        "voxels": voxels,
        "threshold": THRESHOLD,
        "affinity_dtype": str(stored.dtype),
        "rows": report_rows,
        "stages_in_memory_s": breakdown,
        "compression": codecs,
        "speedup_vs_before": report_rows[BEFORE]["seconds"] / ours["seconds"],
        "speedup_vs_waterz": report_rows["waterz.agglomerate (own fragments)"]["seconds"]
        / ours["seconds"],
        "post_processing_speedup_vs_waterz": report_rows["waterz.agglomerate (own fragments)"][
            "seconds"
        ]
        / ours["post_processing_seconds"],
        "voi_change_vs_before": ours["voi"] - report_rows[BEFORE]["voi"],
        "notes": "one core (1 dask worker thread, OMP_NUM_THREADS=1); seconds: best of "
        "--repeat, rows interleaved; segment rows include zarr reads/writes and the tile "
        "lattice with 32 voxels of flooded context around each fragment tile; "
        "post_processing_* = the fragments, edges, agglomeration and relabel stages of the "
        "best run (stage_seconds), without the pyramids and the in-process cluster's start",
    }
    print(json.dumps({k: v for k, v in report.items() if k not in ("machine", "rows")}, indent=1))
    for name, row in report_rows.items():
        post = (
            f"; post-processing stages {row['post_processing_seconds']:.2f} s = "
            f"{row['post_processing_mvox_per_s_per_core']:.2f} MVox/s"
            if "post_processing_seconds" in row
            else ""
        )
        print(f"{name}: {row['seconds']:.2f} s, {row['mvox_per_s_per_core']:.2f} MVox/s{post}, "
              f"VOI {row['voi']:.4f} ({row['voi_split']:.3f}/{row['voi_merge']:.3f}), ARAND "
              f"{row['arand']:.4f}")  # fmt: skip
    c.write_json(args.output, report)


if __name__ == "__main__":
    main()
