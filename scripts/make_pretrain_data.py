"""Unlabelled pretraining volumes for the packaged selection encoders (recipe step 1).

The encoders may only see CC BY data outside every test region:
- isotropic (10 nm): ``fib_medulla_520_raw`` and ``fib_medulla_250`` z < 125;
- anisotropic (50×10×10 nm): ``fib_medulla_250_aniso5`` sections [0, 25) and
  ``fib_medulla_520_raw`` made anisotropic the way ``fib_medulla_250_aniso5`` was (each 50 nm
  section the mean of 5 consecutive 10 nm sections).
Writes zarr volumes under OUT (default runs/encoder_data); inputs are only read.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ssn_deploy.volumes import create_volume, open_volume


def copy_sections(spec: str, z1: int, out: str) -> None:
    src = open_volume(spec)
    data = np.asarray(src[:z1])
    dst = create_volume(out, data.shape, np.uint8, voxel_size=src.voxel_size, overwrite=True)
    dst[...] = data


def anisotropic(spec: str, factor: int, out: str) -> None:
    src = open_volume(spec)
    n = src.shape[0] // factor
    data = np.asarray(src[: n * factor], np.float32)
    mean = data.reshape(n, factor, *data.shape[1:]).mean(axis=1)
    voxel = (src.voxel_size[0] * factor, *src.voxel_size[1:])
    dst = create_volume(out, mean.shape, np.uint8, voxel_size=voxel, overwrite=True)
    dst[...] = np.rint(mean).astype(np.uint8)


def main(data: str = "../shared/data", out: str = "runs/encoder_data") -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    raw = "volumes/raw"
    copy_sections(f"{data}/fib_medulla_250.hdf:{raw}", 125, f"{out}/fib_medulla_250_train.zarr")
    copy_sections(f"{data}/fib_medulla_250_aniso5.hdf:{raw}", 25, f"{out}/aniso5_train.zarr")
    anisotropic(f"{data}/fib_medulla_520_raw.hdf:{raw}", 5, f"{out}/fib_medulla_520_aniso5.zarr")
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
