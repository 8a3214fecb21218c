"""What a z margin below the model's z context costs: the anisotropic model on serial sections.

Patches drop ``margin`` voxels at each face, where outputs saw the patch's zero padding. The
anisotropic model's z context is 18 sections, but the default geometry drops 4 (see
``pipeline.MIN_MARGIN``): this script measures what that trades. On sections [0, 25) of
``fib_medulla_250_aniso5`` (training and validation sections; the test sections are never
read), affinities are predicted with the same core (24 sections × the default in-plane core) and
z margins 1, 2, 4, 8 and 18 (the full context, the reference); for each: max and mean |Δ| to the
reference, the fraction of stored uint8 affinities that change, the model voxels computed per
output voxel, and the VOI of the segmentation against the labels. Writes
``benchmarks/results/margins.json``.

    python benchmarks/margins.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ssn_deploy import __version__
from ssn_deploy.agglomeration import segment_affinities
from ssn_deploy.inference.engine import cached_predictor, predict_affinities
from ssn_deploy.inference.loader import load_predictor
from ssn_deploy.metrics import evaluate
from ssn_deploy.pipeline import default_geometry, model_threshold
from ssn_deploy.volumes import create_volume, open_volume

REPO = Path(__file__).resolve().parents[1]
SECTIONS = (0, 25)
CORE_Z = 24
MARGINS = (1, 2, 4, 8, 18)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--model", default="aniso")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks/results/margins.json")
    args = parser.parse_args()
    source = open_volume(f"{args.data / 'fib_medulla_250_aniso5.hdf'}:volumes/raw")
    labels = open_volume(f"{args.data / 'fib_medulla_250_aniso5.hdf'}:volumes/labels/neuron_ids")
    box = (slice(*SECTIONS), slice(None), slice(None))
    raw, gt = np.asarray(source[box]), np.asarray(labels[box])
    factory = functools.partial(load_predictor, args.model, "torch", threads=os.cpu_count())
    predictor = cached_predictor(factory)
    threshold = model_threshold(predictor)
    geometry = default_geometry(predictor, source.voxel_size)
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        vol = create_volume(f"{tmp}/raw.zarr", raw.shape, np.uint8, voxel_size=source.voxel_size)
        vol[...] = raw
        for margin in sorted(MARGINS, reverse=True):  # the reference (full context) first
            patch = (CORE_Z + 2 * margin, *geometry.patch_shape[1:])
            margins = (margin, *geometry.margin[1:])
            start = time.perf_counter()
            out = predict_affinities(
                vol,
                f"{tmp}/affs_{margin}.zarr",
                factory,
                block_shape=(CORE_Z * 2, *raw.shape[1:]),
                patch_shape=patch,
                margin=margins,
                out_dtype="float32",
                progress=False,
            )
            seconds = time.perf_counter() - start
            affs = np.asarray(out[...])
            if reference is None:
                reference = affs
            seg = segment_affinities(affs, threshold, offsets=predictor.offsets, anisotropic=True)
            diff = np.abs(affs - reference)
            core_yx = [p - 2 * m for p, m in zip(patch[1:], margins[1:], strict=True)]
            core_voxels = CORE_Z * float(np.prod(core_yx))
            steps = np.rint(affs * 255) != np.rint(reference * 255)
            row = {
                "z_margin": margin,
                "patch_shape": list(patch),
                "model_voxels_per_output_voxel": round(float(np.prod(patch)) / core_voxels, 3),
                "seconds": round(seconds, 1),
                "max_abs_diff": float(diff.max()),
                "mean_abs_diff": float(diff.mean()),
                "uint8_changed_fraction": float(steps.mean()),
                "voi": float(evaluate(seg, gt)["voi"]),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "version": __version__,
        "model": args.model,
        "context": list(predictor.context),
        "default_margin": list(geometry.margin),
        "sections": list(SECTIONS),
        "threshold": threshold,
        "load_average": os.getloadavg(),
        "rows": sorted(rows, key=lambda r: r["z_margin"]),
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
