"""Agglomeration by super-blocks against one global agglomeration (issue 13, item 3).

On the test region of fib_medulla_250 (z ∈ [125, 250), 7.8 MVox), with the packaged model's
affinities (``benchmarks/postprocess.py`` infers them once into ``--work``): fragments on a
32×64×64 tile lattice (4×4×4 = 64 tiles) by ``segment_blockwise``, the region graph of the
whole region, then

- ``agglomerate`` once over the whole graph (what ``segment`` does today), and
- ``agglomerate_by_groups``: 64 tiles → 8 super-blocks of 2×2×2 tiles → 1, finalising at each
  level what no other super-block can change (:mod:`ssn_deploy.agglomeration.superblocks`);
- for scale, ``agglomerate`` once more with the edges listed in another order: equal scores
  are merged first come, first served, so the tie order alone moves the result this much;
- end to end, ``segment_blockwise`` with the global reduction and with ``superblocks=True``
  (edges kept in files beside the fragments, one dask task per group and level, tile-face
  stitches included): VOI between the two and the seconds of each stage.

Reported per threshold: VOI between the two segmentations (split/merge), each one's VOI to
the ground truth, segments, seconds, and per level the groups, the edges merged inside groups,
the merges made and the edges sent up.
Writes ``benchmarks/results/hierarchical_agglomeration.json``.

    python benchmarks/hierarchical_agglomeration.py [--work runs/postprocess] [--data DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import numpy as np
from postprocess import prepare

from ssn_deploy.agglomeration.blockwise import read_affinities, segment_blockwise
from ssn_deploy.agglomeration.hierarchical import agglomerate, relabel
from ssn_deploy.agglomeration.region_graph import EdgeStats, edge_statistics
from ssn_deploy.agglomeration.superblocks import agglomerate_by_groups, levels_for, tile_groups
from ssn_deploy.geometry import Box
from ssn_deploy.inference.scheduling import recording_stages
from ssn_deploy.metrics import evaluate
from ssn_deploy.volumes import open_volume

TILE = (32, 64, 64)
BLOCK = (64, 128, 128)
THRESHOLDS = (0.3, 0.5, 0.7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=c.DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=c.REPO / "runs" / "postprocess")
    parser.add_argument(
        "--output", type=Path, default=c.RESULTS / "hierarchical_agglomeration.json"
    )
    args = parser.parse_args()
    affinities, gt_path = prepare(args)
    stored = open_volume(str(affinities))
    gt = np.asarray(open_volume(str(gt_path))[:])
    with tempfile.TemporaryDirectory(prefix="ssn-bench-hier-") as tmp:
        segment_blockwise(stored, f"{tmp}/o.zarr/fragments", f"{tmp}/o.zarr/segmentation",
                          block_shape=BLOCK, fragment_tile=TILE, progress=False)  # fmt: skip
        fragments = np.asarray(open_volume(f"{tmp}/o.zarr/fragments")[:])
    stats = edge_statistics(read_affinities(stored, Box.from_shape(stored.shape)), fragments)
    grid = tuple(-(-n // t) for n, t in zip(fragments.shape, TILE, strict=True))
    levels = levels_for(grid)
    rows = {}
    for threshold in THRESHOLDS:
        t = time.perf_counter()
        single = agglomerate(stats, stop=threshold).lookup(threshold)
        single_s = time.perf_counter() - t
        t = time.perf_counter()
        grouped, reports = agglomerate_by_groups(stats, tile_groups(TILE, grid), levels, threshold)
        grouped_s = time.perf_counter() - t
        one, many = relabel(fragments, single), relabel(fragments, grouped)
        between = evaluate(many, one)
        # the tie order's own effect: one global run with the edges listed in another order
        # (equal scores are taken first come, first served, as in waterz)
        order = np.random.default_rng(0).permutation(len(stats))
        shuffled = EdgeStats(*(getattr(stats, f.name)[order] for f in dataclasses.fields(stats)))
        other = relabel(fragments, agglomerate(shuffled, stop=threshold).lookup(threshold))
        ties = evaluate(other, one)
        rows[str(threshold)] = {
            "voi_between": between["voi"],
            "voi_split_between": between["voi_split"],
            "voi_merge_between": between["voi_merge"],
            "voi_between_tie_orders_single": ties["voi"],
            "voi_to_gt_single": evaluate(one, gt)["voi"],
            "voi_to_gt_superblocks": evaluate(many, gt)["voi"],
            "segments_single": len(set(single.values())),
            "segments_superblocks": len(set(grouped.values())),
            "seconds_single": single_s,
            "seconds_superblocks": grouped_s,
            "levels": [dataclasses.asdict(r) for r in reports],
        }
        r = rows[str(threshold)]
        print(f"threshold {threshold}: VOI between {r['voi_between']:.4f} "
              f"(split {r['voi_split_between']:.4f} / merge {r['voi_merge_between']:.4f}; "
              f"one graph in another edge order: {r['voi_between_tie_orders_single']:.4f}); "
              f"to GT {r['voi_to_gt_single']:.4f} one graph vs {r['voi_to_gt_superblocks']:.4f} "
              f"super-blocks; segments {r['segments_single']} vs {r['segments_superblocks']}; "
              f"{single_s:.2f} s vs {grouped_s:.2f} s")  # fmt: skip
        for level in reports:
            print(f"  level {level.level}: {level.groups} groups, {level.edges} edges inside, "
                  f"{level.merges} merges, {level.edges_up} edges up")  # fmt: skip
    end_to_end = {}
    with tempfile.TemporaryDirectory(prefix="ssn-bench-hier-") as tmp:
        segmentations = {}
        for mode in ("global", "superblocks"):
            with recording_stages({}) as stages:
                t = time.perf_counter()
                seg, _ = segment_blockwise(
                    stored, f"{tmp}/{mode}.zarr/fragments", f"{tmp}/{mode}.zarr/segmentation",
                    threshold=0.5, block_shape=BLOCK, fragment_tile=TILE, progress=False,
                    superblocks=mode == "superblocks",
                )  # fmt: skip
                seconds = time.perf_counter() - t
            segmentations[mode] = np.asarray(seg[:])
            if mode == "superblocks":  # what a block's edge file costs on disk, per edge
                blocks = Path(f"{tmp}/{mode}.zarr/fragments_edges/blocks")
                files = sorted(blocks.glob("*.npz"))
                stored = sum(len(np.load(f)["u"]) for f in files)
                size = sum(f.stat().st_size for f in files)
                end_to_end["edge_file_bytes_per_edge"] = size / max(stored, 1)
                end_to_end["dense_histogram_bytes_per_edge"] = stats.histogram[0].nbytes
            end_to_end[mode] = {"seconds": seconds, "stage_seconds": dict(stages),
                                "voi_to_gt": evaluate(segmentations[mode], gt)["voi"]}  # fmt: skip
        between = evaluate(segmentations["superblocks"], segmentations["global"])
        end_to_end["voi_between"] = between["voi"]
        print(f"segment_blockwise at 0.5: VOI between global and super-blocks "
              f"{between['voi']:.4f}; agglomeration stage "
              f"{end_to_end['global']['stage_seconds']['agglomeration']:.2f} s global vs "
              f"{end_to_end['superblocks']['stage_seconds']['agglomeration']:.2f} s "
              "super-blocks (routing and every level's tasks); block edge files "
              f"{end_to_end['edge_file_bytes_per_edge']:.0f} bytes per edge (a dense histogram "
              f"alone: {end_to_end['dense_histogram_bytes_per_edge']} bytes)")  # fmt: skip
    report = {
        "benchmark": "hierarchical_agglomeration",
        "command": " ".join(["python", *sys.argv]),
        "machine": c.machine_info(1, "cpu"),
        "region": "fib_medulla_250 125:250,:,:",
        "fragment_tile": list(TILE),
        "tile_grid": list(grid),
        "levels": levels + 1,
        "fragments": len(np.union1d(stats.u, stats.v)),
        "edges": len(stats),
        "thresholds": rows,
        "segment_blockwise_at_0.5": end_to_end,
        "notes": "the same fragments and region graph (no tile stitching) for both; "
        "super-blocks in one process here: each group of a level is independent of the others",
    }
    c.write_json(args.output, report)


if __name__ == "__main__":
    main()
