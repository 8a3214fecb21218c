"""Set the agglomeration threshold a checkpoint carries, and say where it was chosen.

The trainer stores the threshold that scored best on its own validation slab
(``extra["best"]["threshold"]``); ``ssn-deploy export`` writes it into the ONNX metadata and
``infer`` uses it unless told ``--threshold``. When a larger validation set ranks thresholds
differently (``benchmarks/checkpoint_validation.py --region aniso_cuts``), this writes a copy
of the checkpoint carrying that threshold, keeping the trainer's choice beside it:

    python scripts/set_threshold.py runs/x/best.ckpt /tmp/x_t06.ckpt --threshold 0.6 \\
        --chosen-on "benchmarks/results/default_model/aniso_cuts.json"
    ssn-deploy export /tmp/x_t06.ckpt -o export/

The input is never modified.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssn_deploy.models import load_checkpoint, save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--threshold", type=float, required=True)
    parser.add_argument("--chosen-on", required=True, help="the evidence (e.g. a results JSON)")
    args = parser.parse_args()
    if not 0 < args.threshold < 1:
        parser.error(f"--threshold must lie in (0, 1), got {args.threshold}")
    if args.output.resolve() == args.checkpoint.resolve():
        parser.error("the output must be another file: the input is never modified")
    loaded = load_checkpoint(args.checkpoint)
    best = dict(loaded.extra.get("best", {}))
    trainer_choice = best.get("trainer_threshold", best.get("threshold"))
    best |= {
        "threshold": args.threshold,
        "trainer_threshold": trainer_choice,
        "threshold_chosen_on": args.chosen_on,
    }
    save_checkpoint(
        args.output,
        loaded.model,
        normalization=loaded.normalization,
        voxel_size=loaded.voxel_size,
        iteration=loaded.iteration,
        extra=loaded.extra | {"best": best},
    )
    print(f"wrote {args.output}: threshold {args.threshold} (the trainer's: {trainer_choice})")


if __name__ == "__main__":
    main()
