"""Supervised affinity training with periodic validation, checkpoints and exact resume.

:class:`Trainer` owns the model, optimizer and random streams; :meth:`Trainer.step` is the one
place that turns a batch into a parameter update, so the semi-supervised strategies (IIC mixing,
mean teacher) can subclass it and replace ``step`` while reusing logging, validation and
checkpointing. Exact resume: the checkpoint holds model, optimizer, iteration and the states of
torch's RNG and of the sampler's and augmenter's numpy Generators, so on CPU a resumed run
reproduces the uninterrupted run's losses bit for bit in fp32, and in bf16 with one thread
(with several threads, oneDNN's bf16 weight-gradient reduction varies in the last bits from run
to run, resumed or not).
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ssn_deploy.errors import ConfigError, InputNotFoundError, SsnDeployError
from ssn_deploy.models.checkpoint import (
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from ssn_deploy.models.normalization import Normalization
from ssn_deploy.models.registry import build_model
from ssn_deploy.training.augment import Augmenter
from ssn_deploy.training.config import Config, load_config
from ssn_deploy.training.data import (
    Batch,
    BatchSource,
    CropSampler,
    LsdTarget,
    make_targets,
    read_extra_volume,
    read_rois,
    read_slab,
    read_thick_sections,
)
from ssn_deploy.training.loader import ParallelBatches
from ssn_deploy.training.losses import LOSSES, weighted_mse
from ssn_deploy.training.lsd import CHANNELS as LSD_CHANNELS
from ssn_deploy.training.run import prepare_run_dir, record_run
from ssn_deploy.training.validation import (
    Segmenter,
    autocast,
    best_mean,
    predict_whole,
    score_by_threshold,
)

log = logging.getLogger(__name__)

CSV_FIELDS = (
    "iteration",
    "loss",
    "lr",
    "it_per_s",
    "skipped",
    "grad_norm_max",
    "lsd_loss",
    "val_loss",
    "val_voi",
    "val_voi_split",
    "val_voi_merge",
    "val_arand",
    "val_cremi_score",
    "val_threshold",
)

MAX_SKIPPED_IN_A_ROW = 20


class TrainingDivergedError(SsnDeployError):
    """Training produced non-finite losses too often to continue."""


ADAM = {"eps": 0.01, "weight_decay": 1e-6, "amsgrad": True}  # DESIGN §2 (paper's settings)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device: cuda requested but no CUDA device is available")
    return torch.device(name)


class _NoWriter:
    """Stands in for TensorBoard's writer when tensorboard is not installed."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def scalar_writer(path: Path, purge_step: int) -> Any:
    """TensorBoard event files when tensorboard is installed (``pip install ssn-deploy[train]``);
    otherwise nothing: log.csv holds the same numbers, and inference never needs tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: scalars go to log.csv only")
        return _NoWriter()
    return SummaryWriter(str(path), purge_step=purge_step)


class CsvLog:
    """``log.csv`` with one row per logged iteration; on resume, rows past the checkpoint go."""

    def __init__(self, path: Path, keep_until: int) -> None:
        self.path = path
        rows = []
        if path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= keep_until]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, CSV_FIELDS).writerow({k: row.get(k, "") for k in CSV_FIELDS})


class Trainer:
    """Holds everything a training run mutates; see the module docstring."""

    def __init__(
        self, config: Config, run_dir: str | Path, *, segmenter: Segmenter | None = None
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.segmenter = segmenter
        tc, data = config.training, config.data
        self.device = resolve_device(tc.device)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed crop shape: pick the fastest convs
        sampler_seed, augment_seed = np.random.SeedSequence(tc.seed).spawn(2)
        self.generators = {
            "sampler": np.random.default_rng(sampler_seed),
            "augmenter": np.random.default_rng(augment_seed),
        }
        torch.manual_seed(tc.seed)

        self.train_slabs = (
            read_rois(data.raw, data.labels, data.rois, data.unknown_label)
            if data.rois
            else [read_slab(data.raw, data.labels, data.train_z, data.unknown_label)]
        )
        if data.thick_sections is not None:
            self.train_slabs += read_thick_sections(data.thick_sections, data.unknown_label)
        self.train_slab = self.train_slabs[0]
        for extra in data.extra:
            slab = read_extra_volume(extra, self.train_slab.raw)
            if slab.voxel_size != self.train_slab.voxel_size:
                raise ConfigError(
                    f"data.extra: {extra.raw} has voxels of {list(slab.voxel_size)} nm, "
                    f"data.raw {list(self.train_slab.voxel_size)} nm: one model, one voxel size"
                )
            self.train_slabs.append(slab)
        self.val_slabs = (
            [read_slab(data.raw, data.labels, data.val_z, data.unknown_label)]
            if data.val_z is not None
            else []
        )
        if data.thick_sections is not None and data.thick_sections.val_z is not None:
            self.val_slabs += read_thick_sections(
                data.thick_sections, data.unknown_label, data.thick_sections.val_z
            )
        self.normalization = (
            Normalization.measure(np.concatenate([s.raw.ravel() for s in self.train_slabs]))
            if data.normalization == "meanstd"
            else Normalization()
        )
        self.model = build_model(config.model).to(self.device)
        # Local shape descriptors: a training-only 1×1×1 head beside the affinity head, on the
        # same features; it is saved with the training state, never in the shipped model.
        self.lsd_head = (
            torch.nn.Conv3d(config.model.filters[0], LSD_CHANNELS, 1).to(self.device)
            if tc.lsd_sigma is not None
            else None
        )
        self.optimizer = torch.optim.Adam(self.parameters(), lr=tc.lr, **ADAM)
        self.loss_fn = LOSSES[tc.loss]
        self.source = BatchSource(
            CropSampler(self.train_slabs, self.generators["sampler"]),
            Augmenter(config.augment, data.isotropic, self.generators["augmenter"]),
            self.normalization.from_unit,
            tc.crop,
            config.model.offsets,
            data.mask_channels,
            LsdTarget(tc.lsd_sigma, tc.lsd_downsample) if tc.lsd_sigma is not None else None,
        )
        self.loader: ParallelBatches | None = None
        self.iteration = 0
        self.skipped = 0
        self.skipped_in_a_row = 0
        self.best: dict[str, Any] = {}

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates: the model's parameters and any training-only head's."""
        extra = list(self.lsd_head.parameters()) if self.lsd_head is not None else []
        return list(self.model.parameters()) + extra

    # -- one update ------------------------------------------------------------------------

    def next_batch(self) -> Batch:
        tc = self.config.training
        if not tc.loader_workers:
            return self.source.batch(tc.batch_size)
        if self.loader is None:  # after any resume: batches are keyed by iteration
            self.loader = ParallelBatches(
                self.source,
                workers=tc.loader_workers,
                batch_size=tc.batch_size,
                seed=tc.seed,
                start=self.iteration,
            )
        return self.loader.next()

    def close_loader(self) -> None:
        if self.loader is not None:
            self.loader.close()
            self.loader = None

    def step(self, batch: Batch) -> dict[str, float]:
        """One optimizer update on ``batch``; returns the scalars to log (at least ``loss``).

        A non-finite loss or gradient skips the update and restores the BatchNorm statistics,
        and gradients are clipped to ``training.clip_grad_norm``: one bad batch cannot poison
        a long run (AMSGrad never forgets a huge squared gradient). With bf16 on CPU,
        torch 2.13's conv weight gradient at the deepest level (a few voxels) is occasionally
        non-finite or huge at random; see the crop note in configs/fib_medulla_250.yaml.
        """
        self.model.train()
        buffers = [b.detach().clone() for b in self.model.buffers()]
        loss, terms = self.compute_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.config.training.clip_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), clip or math.inf)
        finite_loss, finite_grad = bool(torch.isfinite(loss)), bool(torch.isfinite(grad_norm))
        if not (finite_loss and finite_grad):
            self.skipped += 1
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row > MAX_SKIPPED_IN_A_ROW:
                raise TrainingDivergedError(
                    f"{self.skipped_in_a_row} updates in a row skipped for non-finite loss or "
                    f"gradients (iteration {self.iteration + 1}); lower training.lr or set "
                    "training.amp: none"
                )
            log.warning(
                "iteration %d: update skipped (finite loss %s, finite gradients %s)",
                self.iteration + 1,
                finite_loss,
                finite_grad,
            )
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers, strict=True):
                    b.copy_(saved)
            return {"loss": float(loss.detach()), "skipped": 1.0}
        self.skipped_in_a_row = 0
        self.optimizer.step()
        self.after_update()
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), **terms}

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one batch (and named parts to log); semi-supervised trainers override it."""
        raw, affs, weights = (
            torch.from_numpy(a).to(self.device) for a in (batch.raw, batch.affs, batch.weights)
        )
        if self.lsd_head is None:
            with autocast(self.device, self.config.training.amp):
                logits = self.model.forward_logits(raw)
            return self.loss_fn(logits, affs, weights), {}
        lsds, lsd_weights = (
            torch.from_numpy(a).to(self.device) for a in (batch.lsds, batch.lsd_weights)
        )
        with autocast(self.device, self.config.training.amp):
            features = self.model.features(raw)
            logits, lsd_logits = self.model.head(features), self.lsd_head(features)
        # weights [N,1,...] broadcast over the 10 descriptors: the mean is per voxel-channel
        lsd_loss = weighted_mse(lsd_logits, lsds, lsd_weights.expand_as(lsds))
        loss = self.loss_fn(logits, affs, weights) + self.config.training.lsd_weight * lsd_loss
        return loss, {"lsd_loss": float(lsd_loss.detach())}

    def after_update(self) -> None:
        """Hook after each optimizer step (an EMA teacher follows the student here)."""

    # -- validation ------------------------------------------------------------------------

    def validate(self) -> dict[str, Any]:
        """Validation loss and, with a segmenter, VOI/ARAND at the best configured threshold.

        With several validation regions (``data.thick_sections.val_z``) the loss is pooled over
        all of them and the metrics are averaged at the one threshold best on average.
        """
        assert self.val_slabs
        cfg = self.config
        total, weight, per_region = 0.0, 0.0, []
        for slab in self.val_slabs:
            affs = predict_whole(
                self.model, self.normalization(slab.raw), self.device, cfg.training.amp
            )
            target, weights = make_targets(
                slab.labels, slab.known, cfg.model.offsets, cfg.data.mask_channels
            )
            p = torch.from_numpy(affs).clamp(1e-6, 1 - 1e-6)
            total += float(
                torch.nn.functional.binary_cross_entropy(
                    p, torch.from_numpy(target), torch.from_numpy(weights), reduction="sum"
                )
            )
            weight += float(weights.sum())
            if self.segmenter is not None:
                per_region.append(
                    score_by_threshold(
                        affs,
                        slab.labels,
                        self.segmenter,
                        cfg.validation.thresholds,
                        cfg.validation.ignore_ids,
                    )
                )
        metrics: dict[str, Any] = {"loss": total / max(weight, 1e-6)}
        if per_region:
            metrics |= best_mean(per_region)
        return metrics

    def _improved(self, metrics: dict[str, Any]) -> bool:
        key = "voi" if "voi" in metrics else "loss"
        return key not in self.best or metrics[key] < self.best[key]

    # -- checkpoints -----------------------------------------------------------------------

    def save(self, path: Path, *, training_state: bool = True, extra: dict | None = None) -> Path:
        return save_checkpoint(
            path,
            self.model,
            normalization=self.normalization,
            voxel_size=self.train_slab.voxel_size,
            iteration=self.iteration,
            optimizer=self.optimizer if training_state else None,
            generators=self.generators if training_state else None,
            extra={
                "best": dict(self.best),
                "skipped": self.skipped,
                "skipped_in_a_row": self.skipped_in_a_row,
                "config": self.config.to_dict(),
                **(
                    {"lsd_head": self.lsd_head.state_dict()}
                    if self.lsd_head is not None and training_state
                    else {}
                ),
                **(extra or {}),
            },
        )

    def resume(self, path: Path) -> None:
        """Restore model, optimizer, iteration, best metrics and every random stream."""
        ckpt = load_checkpoint(path, map_location=self.device)
        if ckpt.config != self.config.model:
            raise ConfigError(f"model: the config's model differs from the one in {path}")
        if ckpt.optimizer is None or ckpt.rng is None:
            raise InputNotFoundError(f"{path} holds no training state (a weights-only export)")
        self.model.load_state_dict(ckpt.model.state_dict())
        if self.lsd_head is not None:
            if "lsd_head" not in ckpt.extra:
                raise ConfigError(f"training.lsd_sigma is set but {path} has no descriptor head")
            self.lsd_head.load_state_dict(ckpt.extra["lsd_head"])
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.normalization = ckpt.normalization
        self.source.normalize = self.normalization.from_unit
        self.iteration = ckpt.iteration
        self.best = dict(ckpt.extra.get("best", {}))
        self.skipped = int(ckpt.extra.get("skipped", 0))
        self.skipped_in_a_row = int(ckpt.extra.get("skipped_in_a_row", 0))
        restore_rng(ckpt.rng, self.generators)

    def initialise_from(self, path: Path) -> None:
        """Start from another run's weights and normalisation (e.g. the supervised warm-up);
        optimizer, iteration and random streams start afresh."""
        ckpt = load_checkpoint(path, map_location=self.device)
        if ckpt.config != self.config.model:
            raise ConfigError(f"training.init_from: {path} holds a different model architecture")
        self.model.load_state_dict(ckpt.model.state_dict())
        self.normalization = ckpt.normalization
        self.source.normalize = self.normalization.from_unit
        teacher = getattr(self, "teacher", None)
        if teacher is not None:
            teacher.load_state_dict(self.model.state_dict())
        log.info("initialised from %s (iteration %d)", path, ckpt.iteration)

    # -- the loop --------------------------------------------------------------------------

    def fit(self, iterations: int, *, progress: bool = True) -> None:
        """Train until ``iterations`` updates are done in total, logging and checkpointing."""
        tc = self.config.training
        csv_log = CsvLog(self.run_dir / "log.csv", keep_until=self.iteration)
        writer = scalar_writer(self.run_dir / "tensorboard", purge_step=self.iteration + 1)
        bar = tqdm(
            total=iterations,
            initial=self.iteration,
            unit="it",
            disable=not progress,
            dynamic_ncols=True,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
        )
        window: list[float] = []
        grad_norms: list[float] = []
        lsd_losses: list[float] = []
        t_last, n_last = time.perf_counter(), self.iteration
        try:
            while self.iteration < iterations:
                for group in self.optimizer.param_groups:
                    group["lr"] = tc.lr_at(self.iteration)
                scalars = self.step(self.next_batch())
                self.iteration += 1
                if "skipped" not in scalars:
                    window.append(scalars["loss"])
                    grad_norms.append(scalars.get("grad_norm", 0.0))
                    if "lsd_loss" in scalars:
                        lsd_losses.append(scalars["lsd_loss"])
                bar.update(1)
                final = self.iteration == iterations
                row: dict[str, Any] = {}
                if self.iteration % tc.log_every == 0 or final:
                    now = time.perf_counter()
                    row = {
                        "iteration": self.iteration,
                        "loss": repr(float(np.mean(window))) if window else "nan",
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "it_per_s": round((self.iteration - n_last) / max(now - t_last, 1e-9), 4),
                        "skipped": self.skipped,
                        "grad_norm_max": max(grad_norms, default=""),
                        "lsd_loss": repr(float(np.mean(lsd_losses))) if lsd_losses else "",
                    }
                    bar.set_postfix(loss=row["loss"][:6])
                    window, grad_norms, lsd_losses = [], [], []
                    t_last, n_last = now, self.iteration
                if self.val_slabs and (self.iteration % tc.val_every == 0 or final):
                    metrics = self.validate()
                    row = row or {"iteration": self.iteration}
                    row |= {f"val_{k}": v for k, v in metrics.items()}
                    say = functools.partial(bar.write, file=sys.stderr) if progress else log.info
                    say(describe_validation(self.iteration, metrics))
                    if self._improved(metrics):
                        previous = self.best.get("iteration")
                        self.best = {"iteration": self.iteration, **metrics}
                        self.save(self.run_dir / "best.ckpt", training_state=False)
                        key = "voi" if "voi" in metrics else "loss"
                        since = f", was iteration {previous}" if previous else ""
                        say(
                            f"best.ckpt is now iteration {self.iteration} "
                            f"(validation {key.upper() if key == 'voi' else key} "
                            f"{metrics[key]:.4f}{since})"
                        )
                    t_last = time.perf_counter()
                if row:
                    csv_log.write(row)
                    for key, value in row.items():
                        if key != "iteration" and value != "":
                            writer.add_scalar(
                                key.replace("val_", "val/"), float(value), self.iteration
                            )
                if self.iteration % tc.checkpoint_every == 0 or final:
                    self.save(self.run_dir / "last.ckpt")
                    if self.iteration % tc.checkpoint_every == 0:
                        self.save(self.run_dir / "checkpoints" / f"iter_{self.iteration:07d}.ckpt")
        finally:
            self.close_loader()
            bar.close()
            writer.close()


def describe_validation(iteration: int, metrics: dict[str, Any]) -> str:
    """One line per validation: loss, and VOI split/merge + ARAND at the best threshold."""
    line = f"iteration {iteration}: validation loss {metrics['loss']:.4f}"
    if "voi" in metrics:
        line += (
            f", VOI {metrics['voi']:.4f} (split {metrics['voi_split']:.4f} / merge "
            f"{metrics['voi_merge']:.4f}), ARAND {metrics['arand']:.4f} at threshold "
            f"{metrics['threshold']:g}"
        )
    return line


def train(
    config: Config | str | Path,
    run_dir: str | Path,
    *,
    iterations: int | None = None,
    device: str | None = None,
    lr: float | None = None,
    resume: bool = False,
    overwrite: bool = False,
    segmenter: Segmenter | None = None,
    progress: bool = True,
    time_budget_s: float | None = None,
) -> Path:
    """Train (or resume) a supervised affinity model; returns the best (else last) checkpoint.

    ``segmenter`` maps affinities ``[C, Z, Y, X]`` to one segmentation per configured
    validation threshold; without it checkpoints are selected by validation loss.
    ``time_budget_s`` fits the schedule to a wall-clock budget (see :func:`fit_schedule`).
    """
    if not isinstance(config, Config):
        config = load_config(config)
    overrides = {
        k: v for k, v in {"iterations": iterations, "device": device, "lr": lr}.items() if v
    }
    if overrides:
        try:
            config = replace(config, training=replace(config.training, **overrides))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"training: {exc}") from None
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite, reads=config.inputs())
    from ssn_deploy.training.semi import TRAINERS  # semi builds on this module

    trainer = TRAINERS[config.semi.method](config, run_dir, segmenter=segmenter)
    last = run_dir / "last.ckpt"
    if resume and last.exists():
        trainer.resume(last)
        log.info("resumed %s at iteration %d", last, trainer.iteration)
    elif config.training.init_from:
        trainer.initialise_from(Path(config.training.init_from))
    if time_budget_s is not None:
        if resume:
            raise ConfigError(
                "a time budget sets a new run's iteration count; resume the run from its "
                "recorded RUN_DIR/config.yaml instead"
            )
        config = fit_schedule(trainer, time_budget_s, progress=progress)
    record_run(run_dir, config)
    trainer.fit(config.training.iterations, progress=progress)
    best = run_dir / "best.ckpt"
    return best if best.exists() else last


PROBE_WARMUP, PROBE_TIMED = 10, 40


def fit_schedule(trainer: Trainer, budget_s: float, *, progress: bool = True) -> Config:
    """Scale ``training.iterations`` (and ``lr_decay_start`` with it) so that the whole run,
    validations included, ends within ``budget_s`` seconds from now.

    Why: a lent GPU or a night on a CPU is a fixed time, and a poly schedule must reach its
    end in it. The first ``PROBE_WARMUP + PROBE_TIMED`` updates (constant lr) time an update,
    one extra validation is timed, then the schedule is set and kept in ``trainer.config``
    (and so in the run's config.yaml, which reproduces the run without a budget).
    """
    start = time.perf_counter()
    tc = trainer.config.training
    if tc.lr_schedule == "poly" and tc.lr_decay_start < PROBE_WARMUP + PROBE_TIMED:
        raise ConfigError("a time budget needs training.lr_decay_start >= 50 (the timing probe)")
    trainer.fit(PROBE_WARMUP, progress=progress)
    t0 = time.perf_counter()
    trainer.fit(PROBE_WARMUP + PROBE_TIMED, progress=progress)
    per_update = (time.perf_counter() - t0) / PROBE_TIMED
    t0 = time.perf_counter()
    if trainer.val_slabs:
        trainer.validate()
    per_validation = time.perf_counter() - t0
    left = 0.97 * budget_s - (time.perf_counter() - start)
    per_iteration = per_update + per_validation / tc.val_every
    total = trainer.iteration + max(int(left / per_iteration), 0)
    total = max(total - total % tc.log_every, trainer.iteration + 1)
    decay_start = tc.lr_decay_start
    if tc.lr_schedule == "poly":
        decay_start = min(round(tc.lr_decay_start * total / tc.iterations), total - 1)
    log.info(
        "time budget %.0f s: %.3f s per update, %.1f s per validation -> %d iterations%s",
        budget_s,
        per_update,
        per_validation,
        total,
        f" (lr decay from {decay_start})" if tc.lr_schedule == "poly" else "",
    )
    training = replace(tc, iterations=total, lr_decay_start=decay_start)
    trainer.config = replace(trainer.config, training=training)
    return trainer.config


__all__ = ["CSV_FIELDS", "Trainer", "describe_validation", "train"]
