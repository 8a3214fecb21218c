"""Give a trained affinity model other output offsets (``ssn_deploy.models.heads``).

Add long-range offsets before training on (issue 16), or cut a model back to the 3 nearest to
ship it (the kept channels keep their weights):

    python scripts/change_offsets.py IN.ckpt OUT.ckpt --offsets "-1,0,0 0,-1,0 0,0,-1 -3,0,0 ..."
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssn_deploy.models import load_checkpoint, save_checkpoint
from ssn_deploy.models.heads import with_offsets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--offsets", required=True, help="space-separated dz,dy,dx triples")
    args = parser.parse_args()
    offsets = [[int(v) for v in o.split(",")] for o in args.offsets.split()]
    loaded = load_checkpoint(args.source)
    model, rows = with_offsets(loaded.model, offsets)
    save_checkpoint(
        args.target,
        model,
        normalization=loaded.normalization,
        voxel_size=loaded.voxel_size,
        iteration=loaded.iteration,
        extra={**loaded.extra, "offsets_from": str(args.source), "head_rows_from": rows},
    )
    print(f"wrote {args.target}: offsets {model.config.offsets}, head rows {rows}")


if __name__ == "__main__":
    main()
