"""Run directories: refuse to clobber, and record config, versions and git revision."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import yaml

from ssn_deploy import __version__
from ssn_deploy.errors import OutputExistsError
from ssn_deploy.training.config import Config
from ssn_deploy.volumes import refuse_overlap


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool,
                    reads: Iterable[str | None] = ()) -> None:  # fmt: skip
    """An existing, non-empty run dir is an error unless resuming or overwriting it; it is
    never deleted while it holds (or is inside) something the run ``reads``."""
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if not overwrite:
            raise OutputExistsError(
                f"run directory {run_dir} exists; pass --resume to continue it or --overwrite"
            )
        refuse_overlap(run_dir, reads, "run directory")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def git_revision() -> str:
    """``HEAD`` of the source tree this package runs from (+ "-dirty"), or "unknown"."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{rev}-dirty" if dirty else rev


def record_run(run_dir: Path, config: Config) -> None:
    """Write ``config.yaml`` (resolved) and append this start to ``environment.jsonl``."""
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    env = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "ssn_deploy": __version__,
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    with open(run_dir / "environment.jsonl", "a") as f:
        f.write(json.dumps(env) + "\n")
