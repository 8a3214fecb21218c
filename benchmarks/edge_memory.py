"""Region-graph memory per edge (issue 13's petascale plan): dense histograms vs sparse ones.

On the test region's stored affinities (uint8, as ``infer`` writes them; made by
``python benchmarks/postprocess.py``, which leaves them in runs/postprocess/infer.zarr), the
fragments and edge statistics of the in-memory path are computed, and the bytes per edge are
counted for today's table (u, v, count, total and a dense 256-bin int64 histogram) and for a
sparse one that keeps only the non-empty bins (CSR: one uint8 bin and one int32 count per
non-empty bin, one int64 row offset per edge). Edges per MVox size the global graph.

    python benchmarks/edge_memory.py [--affinities runs/postprocess/infer.zarr/affinities]

Writes benchmarks/results/edge_memory.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ssn_deploy.agglomeration import edge_statistics, watershed_fragments
from ssn_deploy.volumes import open_volume

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--affinities", default=str(REPO / "runs" / "postprocess" / "infer.zarr" / "affinities")
    )
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks/results/edge_memory.json")
    args = parser.parse_args()
    affs = np.asarray(open_volume(args.affinities)[:]).astype(np.float32) / np.float32(255)
    frags = watershed_fragments(affs)
    stats = edge_statistics(affs, frags)
    edges = len(stats)
    nonzero = (stats.histogram > 0).sum(axis=1)
    columns = stats.u.itemsize + stats.v.itemsize + stats.count.itemsize + stats.total.itemsize
    dense = stats.histogram.nbytes / edges + columns
    sparse = nonzero.sum() * (1 + 4) / edges + 8 + columns
    result = {
        "benchmark": "edge_memory",
        "command": "python benchmarks/edge_memory.py",
        "affinities": args.affinities,
        "voxels": int(frags.size),
        "fragments": int(frags.max()),
        "edges": edges,
        "edges_per_mvox": round(edges / frags.size * 1e6, 1),
        "voxel_edges_per_edge": {
            "median": float(np.median(stats.count)),
            "mean": round(float(stats.count.mean()), 1),
        },
        "nonempty_bins_per_edge": {
            "median": float(np.median(nonzero)),
            "mean": round(float(nonzero.mean()), 2),
        },
        "bytes_per_edge_dense": round(dense, 1),
        "bytes_per_edge_sparse_csr": round(sparse, 1),
        "ratio": round(dense / sparse, 2),
    }
    print(json.dumps(result, indent=1))
    args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
