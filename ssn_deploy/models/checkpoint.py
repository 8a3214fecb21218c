"""Checkpoint I/O: everything needed to rebuild, use or resume a model, loadable with
``torch.load(..., weights_only=True)`` (only tensors, numbers, strings, lists and dicts).

Format (``format == "ssn-deploy/checkpoint-v1"``)::

    model:          ModelConfig.to_dict() (name, filters, poolings, offsets, ...)
    state_dict:     model weights and BatchNorm statistics
    offsets:        [[dz, dy, dx], ...] one per output channel
    normalization:  {"kind": "scale"|"meanstd", "mean": m, "std": s}; input = (raw/255 − m)/s
    voxel_size:     [z, y, x] nm of the training data
    context, granularity: [z, y, x] (from the model config; for inference engines)
    iteration:      training iterations done
    optimizer:      optimizer.state_dict() (absent in a weights-only "shipping" checkpoint)
    rng:            {"torch": uint8 tensor, "numpy": {name: bit-generator state}}
    extra:          free-form primitives (metrics, config, versions)
"""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssn_deploy.errors import InputNotFoundError, InvalidInputError
from ssn_deploy.models.normalization import Normalization
from ssn_deploy.models.registry import build_model
from ssn_deploy.models.unet import ModelConfig, UNet3d

FORMAT = "ssn-deploy/checkpoint-v1"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model plus what inference and resume need."""

    model: UNet3d
    normalization: Normalization
    voxel_size: tuple[float, float, float]
    iteration: int = 0
    optimizer: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def generator_state(gen: np.random.Generator) -> dict[str, Any]:
    """A numpy Generator's state as plain dicts/ints (safe for ``weights_only`` loading)."""
    return gen.bit_generator.state


def set_generator_state(gen: np.random.Generator, state: dict[str, Any]) -> None:
    gen.bit_generator.state = state


def save_checkpoint(
    path: str | Path,
    model: UNet3d,
    *,
    normalization: Normalization,
    voxel_size: tuple[float, float, float],
    iteration: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    generators: dict[str, np.random.Generator] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a truncated checkpoint."""
    path = Path(path)
    cfg = model.config
    payload: dict[str, Any] = {
        "format": FORMAT,
        "model": cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "offsets": [list(o) for o in cfg.offsets],
        "normalization": normalization.to_dict(),
        "voxel_size": [float(v) for v in voxel_size],
        "context": list(cfg.context),
        "granularity": list(cfg.granularity),
        "iteration": int(iteration),
        "extra": dict(extra or {}),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if generators is not None:
        payload["rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": {name: generator_state(g) for name, g in generators.items()},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            payload["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load with ``weights_only=True`` and rebuild the model (in eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols first
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused it: damaged, or not data
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        marker = next((i for i, ln in enumerate(lines) if "WeightsUnpickler error" in ln), None)
        detail = lines[marker + 1] if marker is not None and marker + 1 < len(lines) else ""
        raise InvalidInputError(
            f"{path}: not a checkpoint that loads as plain data ({detail or 'unpickling failed'});"
            " files that would run code are refused (weights_only=True)"
        ) from None
    except Exception as exc:  # torch raises several types for foreign or damaged files
        detail = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        raise InvalidInputError(f"{path}: not a readable checkpoint ({detail})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InvalidInputError(f"{path}: not an ssn-deploy checkpoint (format {FORMAT})")
    model = build_model(payload["model"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return Checkpoint(
        model=model,
        normalization=Normalization.from_dict(payload["normalization"]),
        voxel_size=tuple(payload["voxel_size"]),  # type: ignore[arg-type]
        iteration=int(payload["iteration"]),
        optimizer=payload.get("optimizer"),
        rng=payload.get("rng"),
        extra=payload.get("extra", {}),
    )


def restore_rng(rng: dict[str, Any], generators: dict[str, np.random.Generator]) -> None:
    """Put torch's and every named numpy Generator's stream back where the checkpoint left it."""
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    for name, gen in generators.items():
        set_generator_state(gen, rng["numpy"][name])
