"""Recipe step 2: ship the pretrained selection encoders with their card.

    python scripts/package_encoders.py [RUNS] [DATA]

Copies ``RUNS/encoder_{iso,aniso}/encoder.ckpt`` (weights only; local paths reduced to file
names) to ``ssn_deploy/assets/encoders/{iso,aniso}.ckpt`` and writes ``ENCODERS.md`` from what
the runs recorded: data, settings, the loss curve's end, and a collapse check (the spread of
L2-normalised embeddings of random crops; a collapsed SimSiam encoder gives ~0, a healthy one
≈ 1/√d).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import torch

from ssn_deploy.selection.embed import Encoder
from ssn_deploy.volumes import open_volume

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "ssn_deploy" / "assets" / "encoders"
CHECK_CROPS = 64


def collapse_check(encoder: Encoder, volume: str, seed: int = 0) -> float:
    """Mean per-dimension std of L2-normalised embeddings of random crops of ``volume``."""
    raw = open_volume(volume)
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(CHECK_CROPS):
        lo = [
            int(rng.integers(0, n - p + 1)) for n, p in zip(raw.shape, encoder.patch, strict=True)
        ]
        box = tuple(slice(a, a + p) for a, p in zip(lo, encoder.patch, strict=True))
        crops.append(encoder.normalization(np.asarray(raw[box])))
    emb = torch.from_numpy(encoder(np.stack(crops).astype(np.float32)))
    return float(torch.nn.functional.normalize(emb, dim=1).std(dim=0).mean())


def final_loss(log: Path, rows: int = 5) -> float:
    with open(log) as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    return float(np.mean(losses[-rows:]))


def main(runs: str = "runs", data: str = "../shared/data") -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Packaged selection encoders",
        "",
        "SimSiam-pretrained U-Net encoders that `ssn-deploy select` uses when no `--encoder` is",
        "given, chosen by the volume's voxel size like the packaged segmentation models. They",
        "embed patches for coverage-based selection only; they segment nothing.",
        "",
        "Recipe (one command, resumable): `scripts/pretrain_encoders.sh` then",
        "`python scripts/package_encoders.py`. Pretraining data: CC BY FIB-SEM volumes only, no",
        "test region, no labels (`scripts/make_pretrain_data.py`).",
        "",
        "| encoder | voxel (nm) | data | crop = patch | iterations × batch | final loss "
        "| embedding spread (1/√d = healthy, 0 = collapsed) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("iso", "aniso"):
        run = Path(runs) / f"encoder_{name}"
        ckpt = torch.load(run / "encoder.ckpt", map_location="cpu", weights_only=True)
        ckpt["extra"]["volumes"] = [Path(v.split(":")[0]).name for v in ckpt["extra"]["volumes"]]
        target = ASSETS / f"{name}.ckpt"
        torch.save(ckpt, target)
        encoder = Encoder(target)
        pre = ckpt["extra"]["pretrain"]
        check_volume = f"{runs}/encoder_data/" + (
            "fib_medulla_250_train.zarr" if name == "iso" else "aniso5_train.zarr"
        )
        spread = collapse_check(encoder, check_volume)
        lines.append(
            f"| `{name}` | {'×'.join(f'{v:g}' for v in encoder.voxel_size)} "
            f"| {', '.join(ckpt['extra']['volumes'])} | {'×'.join(map(str, encoder.patch))} "
            f"| {pre['iterations']} × {pre['batch_size']} | {final_loss(run / 'log.csv'):.3f} "
            f"| {spread:.3f} (1/√{encoder.dim} = {1 / np.sqrt(encoder.dim):.3f}) |"
        )
        print(f"{target}: {target.stat().st_size / 2**20:.1f} MiB, spread {spread:.3f}")
    lines += [
        "",
        "`fib_medulla_520_aniso5` is `fib_medulla_520_raw` made anisotropic the way",
        "`fib_medulla_250_aniso5` was (each 50 nm section the mean of 5 consecutive 10 nm ones);",
        "`aniso5_train` is sections [0, 25) of `fib_medulla_250_aniso5`, `fib_medulla_250_train`",
        "is z < 125 of `fib_medulla_250`. What CGS reaches with them, and how long selection takes:",  # noqa: E501
        '`benchmarks/results/selection.json` and the README\'s "Choosing what to annotate".',
        "Licence of the data: CC BY 3.0, Janelia FlyEM / NeuroProof (Parag et al., PLoS ONE 2015).",
        "",
    ]
    (ASSETS / "ENCODERS.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:])
