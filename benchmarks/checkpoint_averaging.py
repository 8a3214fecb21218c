"""Checkpoint weight averaging (SWA-style) for the default model, measured on validation.

Averages the weights of a run's last checkpoints (the stage-2 run of the isotropic default
model, ``configs/fib_medulla_250_long.yaml``, whose validation VOI jumped between 1.40 and 1.70
from one checkpoint to the next), re-estimates the BatchNorm statistics on training crops (an
average of weights is not an average of activations), and scores the trainer's whole-slab
validation (never the test region) beside the single best checkpoint, with and without the same
BatchNorm re-estimation. Writes ``benchmarks/results/default_model/checkpoint_averaging.json``.

    python benchmarks/checkpoint_averaging.py [--run runs/fib_long] [--last 5] [--batches 300]
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import replace
from pathlib import Path

import _common as c
import torch

from ssn_deploy.agglomeration import segment_affinities
from ssn_deploy.models.checkpoint import load_checkpoint
from ssn_deploy.training.config import load_config
from ssn_deploy.training.trainer import Trainer
from ssn_deploy.training.validation import autocast

THRESHOLDS = [0.3, 0.4, 0.5, 0.6, 0.7]


def load_average(trainer: Trainer, paths: list[Path]) -> None:
    """The mean of the checkpoints' float tensors (integer buffers from the last one)."""
    states = [load_checkpoint(p).model.state_dict() for p in paths]
    average = {
        k: sum(s[k] for s in states) / len(states) if v.dtype.is_floating_point else states[-1][k]
        for k, v in states[0].items()
    }
    trainer.model.load_state_dict(average)
    trainer.normalization = load_checkpoint(paths[0]).normalization
    trainer.source.normalize = trainer.normalization.from_unit


@torch.no_grad()
def reestimate_batchnorm(trainer: Trainer, batches: int) -> None:
    """BatchNorm running statistics as a plain mean over ``batches`` training crops."""
    norms = [
        m for m in trainer.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    trainer.model.train()
    for _ in range(batches):
        raw = torch.from_numpy(trainer.source.batch(1).raw)
        with autocast(trainer.device, trainer.config.training.amp):
            trainer.model.forward_logits(raw)
    for m in norms:
        m.momentum = 0.1
    trainer.model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=c.REPO / "configs/fib_medulla_250_long.yaml")
    parser.add_argument("--run", type=Path, default=c.REPO / "runs/fib_long")
    parser.add_argument("--best", type=int, default=750, help="iteration of the shipped checkpoint")
    parser.add_argument("--last", type=int, default=5, help="checkpoints averaged (the last ones)")
    parser.add_argument("--batches", type=int, default=300, help="crops for the BatchNorm pass")
    parser.add_argument(
        "--output", type=Path, default=c.RESULTS / "default_model" / "checkpoint_averaging.json"
    )
    args = parser.parse_args()
    config = load_config(args.config)
    config = replace(config, validation=replace(config.validation, thresholds=THRESHOLDS))
    segmenter = functools.partial(
        segment_affinities, threshold=THRESHOLDS, offsets=config.model.offsets, anisotropic=False
    )
    trainer = Trainer(config, args.run / "averaging", segmenter=segmenter)
    checkpoints = sorted((args.run / "checkpoints").glob("iter_*.ckpt"))
    averaged = checkpoints[-args.last :]
    rows = {}

    def validate(name: str) -> None:
        start = time.perf_counter()
        metrics = trainer.validate()
        rows[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
        rows[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(name, json.dumps(rows[name]), flush=True)

    best = args.run / "checkpoints" / f"iter_{args.best:07d}.ckpt"
    load_average(trainer, [best])
    validate(f"iteration {args.best} (shipped)")
    reestimate_batchnorm(trainer, args.batches)
    validate(f"iteration {args.best}, BatchNorm re-estimated")
    load_average(trainer, averaged)
    validate("average, BatchNorm as averaged")
    reestimate_batchnorm(trainer, args.batches)
    validate("average, BatchNorm re-estimated")
    report = {
        "benchmark": "checkpoint_averaging",
        "command": "python benchmarks/checkpoint_averaging.py",
        "machine": c.machine_info(1, "cpu"),
        "run": str(args.run.relative_to(c.REPO) if args.run.is_relative_to(c.REPO) else args.run),
        "averaged": [p.name for p in averaged],
        "batchnorm_batches": args.batches,
        "validation": f"trainer whole-slab prediction of z {config.data.val_z}, best of "
        f"thresholds {THRESHOLDS}",
        "rows": rows,
        "validation_voi_of_every_checkpoint": json.loads(
            (c.RESULTS / "default_model" / "stage2_long.json").read_text()
        )["validation"],
    }
    c.write_json(args.output, report)


if __name__ == "__main__":
    main()
