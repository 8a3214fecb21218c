"""SimSiam pretraining of the U-Net encoder on unlabelled volumes (DESIGN §2, "Selection").

Two views of one random crop, each with *one* random EM perturbation (intensity, noise, blur,
cutout, misalignment, elastic, flips), go through the encoder (the U-Net's contracting path +
global average pool), a projector (→ 512 → 128) and a predictor (128 → 512 → 128); the loss is
the symmetric negative cosine ``2 − 2·cos(p₁, sg(z₂))`` averaged with its mirror (Chen & He
2021: the stop-gradient is what prevents collapse). Adam with the paper's poly schedule
(lr 1e-2 → 1e-4, power 1.5). Checkpoints are ordinary ssn-deploy checkpoints of the whole U-Net
(whose encoder is what selection uses) with the heads, the crop (the patch the encoder was
trained on) and the training state in ``extra``, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ssn_deploy.errors import ConfigError, InputNotFoundError, InvalidInputError
from ssn_deploy.models.checkpoint import load_checkpoint, restore_rng, save_checkpoint
from ssn_deploy.models.normalization import Normalization
from ssn_deploy.models.registry import build_model
from ssn_deploy.models.unet import ModelConfig
from ssn_deploy.training.augment import PERTURBATIONS, Augmenter, perturb
from ssn_deploy.training.config import AugmentConfig, UnlabelledSource
from ssn_deploy.training.data import UnlabelledSampler
from ssn_deploy.training.run import prepare_run_dir
from ssn_deploy.volumes import Volume, open_volume

log = logging.getLogger(__name__)

PROJECTION, HIDDEN = 128, 512


@dataclass(frozen=True)
class PretrainConfig:
    """SimSiam settings; defaults are the paper's except the iteration count and batch."""

    crop: tuple[int, int, int] = (18, 160, 160)
    iterations: int = 2000
    batch_size: int = 2
    lr: float = 1e-2
    lr_end: float = 1e-4
    power: float = 1.5
    seed: int = 0
    threads: int | None = None
    checkpoint_every: int = 250
    log_every: int = 20
    isotropic: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop", tuple(int(c) for c in self.crop))
        if len(self.crop) != 3 or min(self.crop) < 1:
            raise ConfigError(f"crop: expected three positive sizes, got {self.crop}")
        if any(c % g for c, g in zip(self.crop, self.model.granularity, strict=True)):
            raise ConfigError(
                f"crop {self.crop} must be a multiple of the encoder's granularity "
                f"{self.model.granularity}"
            )
        for key in ("iterations", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.batch_size < 2:
            raise ConfigError("batch_size: SimSiam's BatchNorm heads need at least 2 crops")
        if not self.lr > self.lr_end > 0:
            raise ConfigError(f"lr: expected lr > lr_end > 0, got {self.lr}, {self.lr_end}")

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "model"}
        return d | {"crop": list(self.crop), "model": self.model.to_dict()}


FIELD_OF_VIEW_NM = 640.0
"""The paper's patch: 18 sections × 160 px at CREMI's 4 nm = 640 nm in-plane."""
SECTIONS = 18


def default_crop(voxel_size: Sequence[float] | None, isotropic: bool) -> tuple[int, int, int]:
    """The paper's field of view at this voxel size: 640 nm in-plane (160 px at 4 nm, 64 at
    10 nm), rounded to 16 px; 18 sections for serial sections, a cube for isotropic data."""
    pixel = float(np.mean(voxel_size[1:])) if voxel_size is not None else 4.0
    side = max(16, round(FIELD_OF_VIEW_NM / pixel / 16) * 16)
    return (side, side, side) if isotropic else (SECTIONS, side, side)


def poly_lr(config: PretrainConfig, iteration: int) -> float:
    """``lr_end + (lr − lr_end)·(1 − t)^power`` with t the fraction of iterations done."""
    t = min(iteration / config.iterations, 1.0)
    return config.lr_end + (config.lr - config.lr_end) * (1 - t) ** config.power


def _mlp(sizes: Sequence[int], last_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        last = i == len(sizes) - 2
        layers.append(nn.Linear(a, b, bias=not (last and last_norm) and last))
        if not last or last_norm:
            layers.append(nn.BatchNorm1d(b))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SimSiam(nn.Module):
    """Encoder + projector + predictor; :meth:`loss` is the symmetric stop-gradient loss."""

    def __init__(self, model_config: ModelConfig) -> None:
        super().__init__()
        self.unet = build_model(model_config)
        self.encoder = self.unet.encoder()
        d = self.encoder.out_features
        self.projector = _mlp((d, HIDDEN, PROJECTION), last_norm=True)
        self.predictor = _mlp((PROJECTION, HIDDEN, PROJECTION), last_norm=False)

    def loss(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.projector(self.encoder(view1)), self.projector(self.encoder(view2))
        p1, p2 = self.predictor(z1), self.predictor(z2)

        def d(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return 2 - 2 * nn.functional.cosine_similarity(p, z.detach(), dim=1).mean()

        return (d(p1, z2) + d(p2, z1)) / 2

    def heads(self) -> dict[str, Any]:
        return {"projector": self.projector.state_dict(), "predictor": self.predictor.state_dict()}


class Views:
    """Random crops of unlabelled volumes, each turned into two differently perturbed views."""

    def __init__(self, sampler: UnlabelledSampler, isotropic: bool) -> None:
        self.sampler = sampler
        self.rng = sampler.rng
        self.augmenter = Augmenter(AugmentConfig(), isotropic, sampler.rng)

    def crop_once(self) -> np.ndarray:
        return self.sampler.crop_once()

    def perturb(self, raw: np.ndarray) -> np.ndarray:
        """One perturbation drawn uniformly from :data:`PERTURBATIONS`."""
        kind = PERTURBATIONS[int(self.rng.integers(len(PERTURBATIONS)))]
        return perturb(raw, kind, self.augmenter)

    def batch(self, size: int, normalize) -> tuple[torch.Tensor, torch.Tensor]:
        crops = [self.crop_once() for _ in range(size)]
        v1 = np.stack([normalize(self.perturb(c)) for c in crops])[:, None]
        v2 = np.stack([normalize(self.perturb(c)) for c in crops])[:, None]
        return torch.from_numpy(v1), torch.from_numpy(v2)


def _voxel_size(volumes: Sequence[Volume]) -> tuple[float, float, float]:
    sizes = {tuple(v.voxel_size) for v in volumes if v.voxel_size is not None}
    if not sizes:
        raise InvalidInputError("no volume has a voxel size; convert them with --voxel-size first")
    if len(sizes) > 1:
        raise InvalidInputError(
            f"volumes differ in voxel size {sorted(sizes)}: pretrain one size at a time"
        )
    return next(iter(sizes))  # type: ignore[return-value]


def pretrain(
    volumes: Sequence[str],
    run_dir: str | Path,
    config: PretrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    until: int | None = None,
) -> Path:
    """Train (or continue) SimSiam on ``volumes``; returns ``RUN_DIR/encoder.ckpt``.

    ``until`` stops early at that iteration (checkpointed, resumable): a long schedule can run
    in pieces with the same learning-rate curve."""
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: pick one")
    opened = [open_volume(v) for v in volumes]
    for v in opened:
        if v.ndim != 3 or np.dtype(v.dtype) != np.uint8:
            raise InvalidInputError(f"{v.spec}: expected 3D uint8 raw, got {v.ndim}D {v.dtype}")
    voxel_size = _voxel_size(opened)
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite, reads=volumes)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rngs = {"views": np.random.default_rng(config.seed)}
    sampler = UnlabelledSampler(
        [UnlabelledSource(v.spec) for v in opened], config.crop, rngs["views"]
    )
    views = Views(sampler, config.isotropic)
    net = SimSiam(config.model)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    normalization = Normalization()
    iteration = 0
    last = run_dir / "last.ckpt"
    if resume and last.exists():
        ckpt = load_checkpoint(last)
        if ckpt.config != config.model:
            raise ConfigError(f"the encoder's architecture differs from the one in {last}")
        net.unet.load_state_dict(ckpt.model.state_dict())
        heads = ckpt.extra["heads"]
        net.projector.load_state_dict(heads["projector"])
        net.predictor.load_state_dict(heads["predictor"])
        if ckpt.optimizer is None or ckpt.rng is None:
            raise InputNotFoundError(f"{last} holds no training state")
        optimizer.load_state_dict(ckpt.optimizer)
        restore_rng(ckpt.rng, rngs)
        iteration = ckpt.iteration
        log.info("resumed %s at iteration %d", last, iteration)

    def save(path: Path, state: bool) -> None:
        save_checkpoint(
            path,
            net.unet,
            normalization=normalization,
            voxel_size=voxel_size,
            iteration=iteration,
            optimizer=optimizer if state else None,
            generators=rngs if state else None,
            extra={
                "kind": "simsiam-encoder",
                "patch_shape": list(config.crop),
                "pretrain": config.to_dict(),
                "volumes": [v.spec for v in opened],
                "heads": net.heads(),
            },
        )

    net.train()
    bar = tqdm(total=config.iterations, initial=iteration, unit="it", disable=not progress,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)  # fmt: skip
    losses: list[float] = []
    with open(run_dir / "log.csv", "a") as csv:
        if iteration == 0:
            csv.write("iteration,loss,lr\n")
        stop = min(config.iterations, until or config.iterations)
        while iteration < stop:
            lr = poly_lr(config, iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr
            v1, v2 = views.batch(config.batch_size, normalization.from_unit)
            loss = net.loss(v1, v2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            value = float(loss.detach())
            if math.isfinite(value):
                optimizer.step()
            iteration += 1
            losses.append(value)
            bar.update(1)
            if iteration % config.log_every == 0 or iteration == config.iterations:
                csv.write(f"{iteration},{float(np.mean(losses))!r},{lr!r}\n")
                csv.flush()
                bar.set_postfix(loss=f"{np.mean(losses):.4f}")
                losses = []
            if iteration % config.checkpoint_every == 0 or iteration == stop:
                save(last, state=True)
    bar.close()
    if iteration < config.iterations:
        return last
    net.eval()
    save(run_dir / "encoder.ckpt", state=False)
    return run_dir / "encoder.ckpt"
