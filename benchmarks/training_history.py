"""A training run's validation history (and auxiliary loss) from its ``log.csv``, as JSON.

The recipe table in the README quotes the trainer's own whole-slab validation of runs that are
too long for a benchmark to repeat; this copies those rows out of each ``RUN/log.csv``
(written by ``ssn-deploy train``) so every quoted figure has a file behind it. Runs are given
as ``GROUP=RUN`` (e.g. ``iso=runs/fib_lsd``); ``--labels`` describe them.

    python benchmarks/training_history.py iso=runs/fib_lsd iso=runs/fib_stage3 \\
        aniso=runs/aniso_lsd --output benchmarks/results/default_model/lsd_training.json
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import _common as c

FIELDS = ("loss", "voi", "voi_split", "voi_merge", "arand", "threshold")


def auxiliary_loss(log_csv: Path, every: int = 100) -> list[dict[str, float]]:
    """The descriptor head's mean loss at every ``every``-th iteration (empty without one)."""
    with open(log_csv, newline="") as f:
        return [
            {"iteration": int(r["iteration"]), "lsd_loss": round(float(r["lsd_loss"]), 4)}
            for r in csv.DictReader(f)
            if r.get("lsd_loss") and int(r["iteration"]) % every == 0
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="GROUP=RUN_DIR")
    parser.add_argument("--label", action="append", default=[], help="RUN_DIR=what it is")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    labels = dict(item.split("=", 1) for item in args.label)
    groups: dict[str, dict] = {}
    for spec in args.runs:
        group, run = spec.split("=", 1)
        log_csv = Path(run) / "log.csv"
        rows = [
            {k: round(v, 4) for k, v in row.items()}
            for row in c.validation_history(log_csv, FIELDS)
        ]
        groups.setdefault(group, {})[run] = {
            "label": labels.get(run, ""),
            "validation": rows,
            "lsd_loss": auxiliary_loss(log_csv),
        }
        print(group, run, [(r["iteration"], r["voi"], r["loss"]) for r in rows])
    c.write_json(
        args.output,
        {
            "benchmark": "training_history",
            "source": "RUN/log.csv of ssn-deploy train: the trainer's whole-slab validation "
            "(val_loss is the affinity BCE only), best of validation.thresholds",
            "groups": groups,
        },
    )


if __name__ == "__main__":
    main()
