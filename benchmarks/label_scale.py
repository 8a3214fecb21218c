"""How large are the bodies of labelled volumes, per 2D section? (issue 16: extra training data)

A model learns membranes at the scale of its training data. This measures, for each volume,
the voxel-weighted median area of a body's profile in a z-section (what a random voxel's body
looks like in-plane) and its equivalent diameter, after giving boundary-labelled voxels
(``--fill-label``) the nearest body's id. Every 5th section of each volume's z-range is used.

    python benchmarks/label_scale.py fib_medulla_250:0:93 fib_tiny_train fib_tiny_test

Writes benchmarks/results/default_model/label_scale.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _common as c
import fastremap
import numpy as np

from ssn_deploy.training.data import fill_boundary
from ssn_deploy.volumes import open_volume


def profile_scale(labels: np.ndarray, step: int = 5) -> dict[str, float]:
    """Voxel-weighted median profile area (px) of the bodies in every ``step``-th section."""
    areas = np.concatenate(
        [fastremap.unique(labels[z], return_counts=True)[1] for z in range(0, len(labels), step)]
    )
    areas = np.sort(areas)
    median = float(areas[np.searchsorted(np.cumsum(areas) / areas.sum(), 0.5)])
    return {"voxel_weighted_median_area_px": median,
            "equivalent_diameter_px": round(float(2 * np.sqrt(median / np.pi)), 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("volumes", nargs="+", help="NAME or NAME:Z0:Z1 of ../shared/data/NAME.hdf")
    parser.add_argument("--fill-label", type=int, default=0)
    parser.add_argument("--data", type=Path, default=c.DEFAULT_DATA)
    parser.add_argument(
        "--output", type=Path, default=c.RESULTS / "default_model" / "label_scale.json"
    )
    args = parser.parse_args()
    rows = {}
    for spec in args.volumes:
        name, *z = spec.split(":")
        vol = open_volume(f"{args.data / name}.hdf:volumes/labels/neuron_ids")
        z0, z1 = (int(z[0]), int(z[1])) if z else (0, vol.shape[0])
        labels = fill_boundary(np.asarray(vol[z0:z1]), args.fill_label)
        rows[spec] = {"voxel_size_nm": list(vol.voxel_size), **profile_scale(labels)}
        print(spec, rows[spec])
    c.write_json(args.output, {"benchmark": "label_scale", "fill_label": args.fill_label,
                               "volumes": rows})  # fmt: skip


if __name__ == "__main__":
    main()
