"""Semi-supervised trainers: IIC (intra- and inter-mixing consistency) and a mean teacher.

Both reuse :class:`~ssn_deploy.training.trainer.Trainer` (logging, validation, checkpoints,
exact resume) and replace only :meth:`compute_loss`. Per update, IIC draws two labelled crops
L₁, L₂ and two unlabelled crops U₁, U₂ and three axial-through masks (:mod:`.mixing`):

- intra-labelled: weighted BCE of f(mix(L₁, L₂)) against the mixed targets (edges across the
  mask border carry no weight);
- intra-unlabelled (``semi.weight_intra_unlabeled``): MSE between f(perturb(mix(U₁, U₂))) and
  the stop-gradient target f̄(mix(U₁, U₂)) — a perturbation that keeps voxels in place;
- inter (``semi.weight_inter``): x = mix(L₁, U₁): BCE to L₁'s targets inside the mask, MSE to
  the stop-gradient f̄(U₁) outside it.

f̄ is the same network under ``no_grad`` (Siamese, ``semi.target: siamese``) or an EMA of it
(``ema``). The mean teacher baseline: BCE on L₁ plus ``semi.weight_consistency`` × MSE between
f(perturb(U₁)) and an EMA teacher's f̄(U₁), no mixing.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssn_deploy.models.checkpoint import load_checkpoint
from ssn_deploy.training.augment import ALIGNED_PERTURBATIONS, Augmenter, perturb
from ssn_deploy.training.config import AugmentConfig, Config
from ssn_deploy.training.data import UnlabelledSampler
from ssn_deploy.training.losses import weighted_bce
from ssn_deploy.training.mixing import edge_weights, mix, random_mask
from ssn_deploy.training.trainer import Trainer
from ssn_deploy.training.validation import Segmenter, autocast


class SemiSupervisedTrainer(Trainer):
    """Shared parts: the unlabelled sampler, perturbations, the target network, checkpoints."""

    def __init__(
        self, config: Config, run_dir: str | Path, *, segmenter: Segmenter | None = None
    ) -> None:
        super().__init__(config, run_dir, segmenter=segmenter)
        semi = config.semi
        seeds = np.random.SeedSequence(config.training.seed).spawn(4)
        self.generators["unlabelled"] = np.random.default_rng(seeds[2])
        self.generators["mixing"] = np.random.default_rng(seeds[3])
        self.unlabelled = UnlabelledSampler(
            semi.unlabeled, config.training.crop, self.generators["unlabelled"]
        )
        self.perturber = Augmenter(
            AugmentConfig(), config.data.isotropic, self.generators["mixing"]
        )
        self.teacher: torch.nn.Module | None = None
        if semi.method == "mean_teacher" or semi.target == "ema":
            self.teacher = copy.deepcopy(self.model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    # -- pieces ------------------------------------------------------------------------------

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(array, dtype=np.float32, order="C")).to(self.device)

    def unlabelled_batch(self) -> np.ndarray:
        """float32 ``[N, 1, Z, Y, X]``, normalised like the labelled crops."""
        n = self.config.training.batch_size
        return np.stack(
            [self.normalization.from_unit(self.unlabelled.crop_once()) for _ in range(n)]
        )[:, None]

    def perturbed(self, x: np.ndarray) -> np.ndarray:
        """One voxel-preserving perturbation per sample (undoing and redoing normalisation)."""
        out = []
        for sample in x[:, 0]:
            unit = np.clip(self.normalization.to_unit(sample), 0.0, 1.0)
            kind = ALIGNED_PERTURBATIONS[
                int(self.generators["mixing"].integers(len(ALIGNED_PERTURBATIONS)))
            ]
            out.append(self.normalization.from_unit(perturb(unit, kind, self.perturber)))
        return np.stack(out)[:, None].astype(np.float32)

    def logits(self, x: np.ndarray) -> torch.Tensor:
        with autocast(self.device, self.config.training.amp):
            return self.model.forward_logits(self.tensor(x)).float()

    @torch.no_grad()
    def target(self, x: np.ndarray) -> torch.Tensor:
        """Stop-gradient prediction: the EMA teacher's, or the student's own (Siamese)."""
        net = self.teacher if self.teacher is not None else self.model
        with autocast(self.device, self.config.training.amp):
            return torch.sigmoid(net.forward_logits(self.tensor(x)).float())

    def mask(self) -> np.ndarray:
        return random_mask(
            self.config.training.crop, self.generators["mixing"], self.config.semi.box_fraction
        )

    def after_update(self) -> None:
        if self.teacher is None:
            return
        decay = self.config.semi.ema_decay
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.model.parameters(), strict=True):
                t.mul_(decay).add_(s.detach(), alpha=1 - decay)
            for t, s in zip(self.teacher.buffers(), self.model.buffers(), strict=True):
                t.copy_(s)

    def save(self, path: Path, *, training_state: bool = True, extra: dict | None = None) -> Path:
        more = dict(extra or {})
        if self.teacher is not None and training_state:
            more["teacher"] = {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}
        return super().save(path, training_state=training_state, extra=more)

    def resume(self, path: Path) -> None:
        super().resume(path)
        if self.teacher is not None:
            state = load_checkpoint(path).extra.get("teacher")
            if state is not None:
                self.teacher.load_state_dict(state)


def mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean squared error of probabilities (weights 0 exclude voxels)."""
    return ((pred - target) ** 2 * weights).sum() / weights.sum().clamp_min(1e-6)


class IICTrainer(SemiSupervisedTrainer):
    """Intra- and inter-mixing consistency (see the module docstring)."""

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        semi, offsets = self.config.semi, self.config.model.offsets
        second = self.next_batch()
        u1, u2 = self.unlabelled_batch(), self.unlabelled_batch()
        m1, m2, m3 = self.mask(), self.mask(), self.mask()
        # intra-labelled: mixed images, mixed targets, no weight on edges across the border
        x = mix(batch.raw, second.raw, m1)
        t = mix(batch.affs, second.affs, m1)
        w = mix(batch.weights, second.weights, m1) * edge_weights(m1, offsets)
        intra_l = weighted_bce(self.logits(x), self.tensor(t), self.tensor(w))
        # intra-unlabelled: perturbed mixed view vs the stop-gradient clean mixed view
        xu = mix(u1, u2, m2)
        clean = self.target(xu)
        pred = torch.sigmoid(self.logits(self.perturbed(xu)))
        intra_u = mse(pred, clean, torch.ones_like(clean))
        # inter: labelled inside the mask, unlabelled outside
        xi = mix(batch.raw, u1, m3)
        logits = self.logits(xi)
        inside = self.tensor(batch.weights * edge_weights(m3, offsets, side=1.0))
        outside = self.tensor(np.broadcast_to(edge_weights(m3, offsets, side=0.0), logits.shape))
        inter = weighted_bce(logits, self.tensor(batch.affs), inside) + mse(
            torch.sigmoid(logits), self.target(u1), outside
        )
        loss = intra_l + semi.weight_intra_unlabeled * intra_u + semi.weight_inter * inter
        terms = {
            "intra_labelled": float(intra_l.detach()),
            "intra_unlabelled": float(intra_u.detach()),
            "inter": float(inter.detach()),
        }
        return loss, terms


class MeanTeacherTrainer(SemiSupervisedTrainer):
    """Supervised BCE plus consistency to an EMA teacher on perturbed unlabelled crops."""

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        supervised, _ = super().compute_loss(batch)
        u = self.unlabelled_batch()
        teacher = self.target(u)
        student = torch.sigmoid(self.logits(self.perturbed(u)))
        consistency = mse(student, teacher, torch.ones_like(teacher))
        loss = supervised + self.config.semi.weight_consistency * consistency
        terms = {
            "supervised": float(supervised.detach()),
            "consistency": float(consistency.detach()),
        }
        return loss, terms


TRAINERS: dict[str, type[Trainer]] = {
    "supervised": Trainer,
    "iic": IICTrainer,
    "mean_teacher": MeanTeacherTrainer,
}
