"""Give a trained affinity model other output offsets, keeping everything but the head's rows.

Two uses (issue 16's long-range auxiliary affinities):

* add long-range offsets to a trained model before training on (``--offsets`` a superset): an
  offset the model already has keeps its row of the 1×1×1 head; a new one starts from the row
  of the existing offset along the same axis, so the new outputs begin as the short-range
  affinity along their direction rather than noise;
* drop them again to ship (``--offsets`` the 3 nearest): the kept rows are copied, so the
  shipped model's affinities equal the trained model's first channels exactly.

    python scripts/change_offsets.py IN.ckpt OUT.ckpt --offsets "-1,0,0 0,-1,0 0,0,-1 -3,0,0 ..."
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from ssn_deploy.affinities import validate_offsets
from ssn_deploy.models import UNet3d, load_checkpoint, save_checkpoint

Offset = tuple[int, int, int]


def _axis(offset: Offset) -> int:
    nonzero = [i for i, v in enumerate(offset) if v]
    if len(nonzero) != 1:
        raise SystemExit(f"offset {offset}: only axis-aligned offsets can borrow a head row")
    return nonzero[0]


def source_row(offset: Offset, old: tuple[Offset, ...]) -> int:
    """The old head row a new offset starts from: its own, else the nearest along its axis."""
    if offset in old:
        return old.index(offset)
    same_axis = [i for i, o in enumerate(old) if _axis(o) == _axis(offset)]
    if not same_axis:
        raise SystemExit(f"offset {offset}: the model has no offset along that axis")
    return min(same_axis, key=lambda i: abs(sum(old[i])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--offsets", required=True, help="space-separated dz,dy,dx triples")
    args = parser.parse_args()
    offsets = validate_offsets([[int(v) for v in o.split(",")] for o in args.offsets.split()])
    loaded = load_checkpoint(args.source)
    old = tuple(tuple(o) for o in loaded.config.offsets)
    model = UNet3d(replace(loaded.config, offsets=offsets))
    state = loaded.model.state_dict()
    rows = [source_row(tuple(o), old) for o in offsets]
    state["head.weight"] = state["head.weight"][rows].clone()
    state["head.bias"] = state["head.bias"][rows].clone()
    model.load_state_dict(state)
    with torch.no_grad():
        model.eval()
    save_checkpoint(
        args.target,
        model,
        normalization=loaded.normalization,
        voxel_size=loaded.voxel_size,
        iteration=loaded.iteration,
        extra={**loaded.extra, "offsets_from": str(args.source), "head_rows_from": rows},
    )
    print(f"wrote {args.target}: offsets {offsets}, head rows from {rows} of {old}")


if __name__ == "__main__":
    main()
