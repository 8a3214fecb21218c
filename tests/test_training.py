"""Augmentation alignment, config validation, test-region exclusion, exact resume, learning."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from ssn_deploy.cli import main
from ssn_deploy.errors import ConfigError, OutputExistsError
from ssn_deploy.training import data as data_module
from ssn_deploy.training.augment import Augmenter, Geometry
from ssn_deploy.training.config import (
    AugmentConfig,
    ThickSections,
    config_from_dict,
    load_config,
)
from ssn_deploy.training.trainer import Trainer, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GEOMETRIC_ONLY = AugmentConfig(
    flip=0.5, transpose=0.5, intensity=0, noise=0, blur=0, missing_section=0, misalignment=0,
    elastic=0,
)  # fmt: skip


def tiny_config(path: Path, **training):
    raw = yaml.safe_load((CONFIGS / "fib_tiny_train.yaml").read_text())
    raw["data"]["raw"] = f"{path}:volumes/raw"
    raw["data"]["labels"] = f"{path}:volumes/labels/neuron_ids"
    raw["training"] |= training
    return config_from_dict(raw)


def blocks(shape=(12, 16, 16)) -> np.ndarray:
    """Piecewise-constant labels 1..8 (octants): raw = labels / 10 can be checked after warps."""
    z, y, x = np.indices(shape)
    return (1 + (z >= shape[0] // 2) * 4 + (y >= shape[1] // 2) * 2 + (x >= shape[2] // 2)).astype(
        np.uint64
    )


@pytest.mark.parametrize("isotropic", [True, False])
def test_geometric_augmentations_keep_raw_and_labels_aligned(isotropic) -> None:
    aug = Augmenter(GEOMETRIC_ONLY, isotropic, np.random.default_rng(1))
    rng = np.random.default_rng(2)
    perms = set()
    for _ in range(20):
        crop = (8, 8, 8) if isotropic else (4, 8, 8)
        g = aug.geometry(crop, (16, 16, 16))
        perms.add(g.perm)
        src = g.source_shape(crop)
        labels = rng.integers(1, 10, size=src).astype(np.uint64)
        raw, lab, known = aug(labels / np.float32(10), labels, np.ones(src, bool), g)
        assert raw.shape == lab.shape == crop and known.all()
        assert np.array_equal(np.rint(raw * 10).astype(np.uint64), lab)
    assert (len(perms) > 2) == isotropic
    assert all(p[0] == 0 for p in perms) or isotropic


def test_transposed_crop_is_read_in_the_source_shape() -> None:
    g = Geometry(perm=(2, 0, 1))
    src = g.source_shape((4, 6, 8))
    assert g.apply(np.zeros(src)).shape == (4, 6, 8)


def test_misalignment_moves_raw_and_labels_together() -> None:
    aug = Augmenter(AugmentConfig(max_shift=3), True, np.random.default_rng(0))
    labels = np.random.default_rng(3).integers(1, 10, size=(6, 16, 16)).astype(np.uint64)
    moved = 0
    for _ in range(5):
        raw, lab, known = aug.misalign(
            labels / np.float32(10), labels.copy(), np.ones_like(labels, bool)
        )
        assert np.array_equal(np.rint(raw * 10).astype(np.uint64), lab)
        moved += int((lab != labels).any())
        assert (~known).any() == (lab != labels).any()
    assert moved > 0


def test_elastic_warps_raw_and_labels_together() -> None:
    aug = Augmenter(AugmentConfig(elastic_sigma=3.0), True, np.random.default_rng(0))
    labels = blocks()
    raw, lab, known = aug.elastic(labels / np.float32(10), labels, np.ones(labels.shape, bool))
    assert not np.array_equal(lab, labels) and known.all()
    # Raw is interpolated linearly, labels by nearest neighbour: they agree off the seams.
    assert np.mean(np.abs(raw * 10 - lab.astype(np.float32)) < 0.5) > 0.9


def test_intensity_augmentations_leave_labels_alone() -> None:
    aug = Augmenter(AugmentConfig(flip=0, transpose=0, intensity=1, noise=1, blur=1,
                                  missing_section=1, misalignment=0, elastic=0),
                    True, np.random.default_rng(0))  # fmt: skip
    labels = blocks()
    raw, lab, _ = aug(labels / np.float32(10), labels, np.ones(labels.shape, bool), Geometry())
    assert np.array_equal(lab, labels) and raw.dtype == np.float32
    assert 0.0 <= raw.min() and raw.max() <= 1.0


@pytest.mark.parametrize(
    ("section", "change", "message"),
    [
        ("data", {"test_z": [45, 50]}, "data.val_z.*test region"),
        ("data", {"train_z": [0, 30], "val_z": [20, 40]}, "data.val_z.*overlaps data.train_z"),
        ("data", {"mask_channels": [3]}, "data.mask_channels"),
        ("training", {"crop": [16, 48, 50]}, "training.crop.*granularity"),
        ("training", {"amp": "fp16"}, "training.amp"),
        ("training", {"learning_rate": 0.1}, "training.learning_rate"),
        ("model", {"skip": "sum"}, "model.skip"),
        ("validation", {"thresholds": [1.5]}, "validation.thresholds"),
        (
            "data",
            {"thick_sections": {"raw": "x.h5:r", "labels": "x.h5:l", "factor": 2, "z": [0, 80]}},
            "thick_sections.z.*train_z",
        ),
        (
            "data",
            {
                "thick_sections": {
                    "raw": "x.h5:r",
                    "labels": "x.h5:l",
                    "factor": 2,
                    "z": [0, 8],
                    "phases": [2],
                }
            },
            "thick_sections.phases",
        ),
        (
            "data",
            {"thick_sections": {"raw": "x.h5:r", "factor": 2, "z": [0, 8]}},
            "thick_sections.labels",
        ),
    ],
)
def test_config_errors_name_the_bad_key(tiny_train, section, change, message) -> None:
    raw = yaml.safe_load((CONFIGS / "fib_tiny_train.yaml").read_text())
    raw[section] = raw.get(section, {}) | change
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


@pytest.mark.parametrize(
    "name",
    [
        "fib_medulla_250", "fib_medulla_250_aniso5", "fib_medulla_250_aniso5_thick",
        "fib_medulla_250_extra", "fib_medulla_250_stage3", "vnc_sstem_2dlabels", "fib_tiny_train",
        "fib_medulla_250_lsd", "fib_medulla_250_aniso5_lsd",
        "gpu/fib_medulla_250_paper", "gpu/fib_medulla_250_aniso5_paper",
    ],
)  # fmt: skip
def test_shipped_configs_validate(name) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    if name.startswith("gpu/"):  # same split as the CPU recipes, data found from configs/gpu
        assert cfg.data.test_z == (125, 250) or cfg.data.test_z == (25, 50)
        assert Path(cfg.data.raw.split(":")[0]).is_file() and cfg.training.loader_workers > 0
    if name == "fib_medulla_250_aniso5_thick":  # more cuts of the training tissue only
        thick = cfg.data.thick_sections
        assert thick.z[1] <= cfg.data.train_z[1] * thick.factor <= cfg.data.val_z[0] * 5
    if name.startswith("fib_medulla_250_aniso5"):
        assert cfg.data.test_z == (25, 50) and cfg.data.val_z[1] <= 25
        assert not cfg.data.isotropic and all(p[0] == 1 for p in cfg.model.poolings)
    if name == "fib_medulla_250_extra":  # the gala fixtures, never fib_medulla_250's test region
        assert {Path(e.raw.split(":")[0]).name for e in cfg.data.extra} == {
            "fib_tiny_train.hdf", "fib_tiny_test.hdf"}  # fmt: skip
    if name.startswith("fib_medulla_250") and not name.startswith("fib_medulla_250_aniso5"):
        assert cfg.data.test_z == (125, 250) and cfg.data.train_z[1] <= 125
    if name == "fib_medulla_250":
        assert cfg.data.test_z == (125, 250) and cfg.data.train_z[1] <= 125
        assert cfg.data.val_z[1] <= 125
    if name.endswith("_lsd"):  # descriptors on a grid that keeps anisotropic sections whole
        factors = cfg.training.lsd_downsample
        assert cfg.training.lsd_sigma == 80.0
        assert factors == 2 if cfg.data.isotropic else factors == (1, 2, 2)
    if name == "vnc_sstem_2dlabels":
        assert cfg.data.mask_channels == (0,) and cfg.model.poolings[0] == (1, 2, 2)


def test_trainer_never_reads_the_test_region(tiny_train, monkeypatch, tmp_path) -> None:
    read = []
    original = data_module._open

    class Spy:
        def __init__(self, vol):
            self.vol = vol
            self.shape, self.dtype, self.voxel_size = vol.shape, vol.dtype, vol.voxel_size

        def __getitem__(self, box):
            read.append(box[0])
            return self.vol[box]

    monkeypatch.setattr(data_module, "_open", lambda spec: Spy(original(spec)))
    cfg = tiny_config(tiny_train)
    cfg = config_from_dict(cfg.to_dict() | {"data": cfg.to_dict()["data"] | {
        "train_z": [0, 24], "val_z": [24, 34], "test_z": [34, 50]}})  # fmt: skip
    Trainer(cfg, tmp_path)
    assert read and all(s.stop <= 34 for s in read)


def test_thick_sections_at_phase_zero_are_the_anisotropic_volume(data_dir) -> None:
    """``fib_medulla_250_aniso5`` is ``fib_medulla_250`` thickened 5× at phase 0: the same cut
    of the same training tissue must come out bit for bit, and the other phases of z [0, 90)
    stay inside it (the validation tissue starts at 90)."""
    import h5py

    iso, aniso = data_dir / "fib_medulla_250.hdf", data_dir / "fib_medulla_250_aniso5.hdf"
    thick = ThickSections(
        f"{iso}:volumes/raw", f"{iso}:volumes/labels/neuron_ids", 5, (0, 90), (0, 1, 4)
    )
    slabs = data_module.read_thick_sections(thick)
    with h5py.File(aniso, "r") as f:
        np.testing.assert_array_equal(slabs[0].raw, f["volumes/raw"][:18])
        np.testing.assert_array_equal(slabs[0].labels, f["volumes/labels/neuron_ids"][:18])
    assert [s.raw.shape[0] for s in slabs] == [18, 17, 17]
    assert [s.z_range for s in slabs] == [(0, 90), (1, 86), (4, 89)]
    assert all(s.voxel_size == (50.0, 10.0, 10.0) and s.known.all() for s in slabs)
    with h5py.File(iso, "r") as f:  # phase 4, section 3: the mean of z [19, 24), middle z 21
        runs = f["volumes/raw"][19:24].astype(np.float64)
        np.testing.assert_array_equal(slabs[2].raw[3], np.round(runs.mean(0)).astype(np.uint8))
        np.testing.assert_array_equal(slabs[2].labels[3], f["volumes/labels/neuron_ids"][21])


def test_trainer_samples_the_thick_sections_too(tiny_train, tmp_path) -> None:
    cfg = tiny_config(tiny_train)
    data = cfg.to_dict()["data"] | {"train_z": [0, 24], "val_z": [24, 34], "test_z": [34, 50]}
    thick = {"raw": data["raw"], "labels": data["labels"], "factor": 2, "z": [0, 50]}
    with pytest.raises(ConfigError, match=r"thick_sections.z.*\[0, 48\]"):
        config_from_dict(cfg.to_dict() | {"data": data | {"thick_sections": thick}})
    thick["z"] = [0, 44]
    cfg = config_from_dict(cfg.to_dict() | {"data": data | {"thick_sections": thick}})
    assert config_from_dict(cfg.to_dict()) == cfg  # as the run directory records it
    trainer = Trainer(cfg, tmp_path)
    assert [s.raw.shape[0] for s in trainer.train_slabs] == [24, 22, 21]
    chosen = {id(trainer.source.sampler.choose((8, 48, 48))) for _ in range(30)}
    assert len(chosen) == 3  # every slab is drawn
    assert len(trainer.val_slabs) == 1


def test_fill_boundary_gives_membrane_voxels_the_nearest_body() -> None:
    labels = np.zeros((1, 3, 7), np.uint64)
    labels[..., :3], labels[..., 5:] = 4, 9  # membrane (0) at x = 3, 4
    before = labels.copy()
    filled = data_module.fill_boundary(labels, 0)
    np.testing.assert_array_equal(filled[0, 0], [4, 4, 4, 4, 9, 9, 9])
    np.testing.assert_array_equal(labels, before)  # the input is left as it is
    assert data_module.fill_boundary(np.zeros((2, 2, 2), np.uint64), 0).max() == 0


def test_trainer_samples_extra_volumes_by_their_share(tiny_train, tiny_test, tmp_path) -> None:
    """``data.extra``: a whole second labelled volume (the other gala fixture, real data) with
    its membrane label filled, drawn for its share of the crops; data.raw's own file is refused
    (read whole, it would read the validation and test regions)."""
    cfg = tiny_config(tiny_train)
    data = cfg.to_dict()["data"] | {"train_z": [0, 24], "val_z": [24, 34], "test_z": [34, 50]}
    same = {"raw": data["raw"], "labels": data["labels"], "share": 0.2}
    with pytest.raises(ConfigError, match=r"data.extra\[0\].*data.raw's file"):
        config_from_dict(cfg.to_dict() | {"data": data | {"extra": [same]}})
    extra = {"raw": f"{tiny_test}:volumes/raw", "labels": f"{tiny_test}:volumes/labels/neuron_ids",
             "share": 1.0, "fill_label": 0}  # fmt: skip
    with pytest.raises(ConfigError, match=r"data\.extra\.share"):
        config_from_dict(cfg.to_dict() | {"data": data | {"extra": [extra]}})
    extra |= {"share": 0.3, "match_intensity": True}
    cfg = config_from_dict(cfg.to_dict() | {"data": data | {"extra": [extra]}})
    assert config_from_dict(cfg.to_dict()) == cfg  # as the run directory records it
    assert str(tiny_test) in " ".join(cfg.inputs())
    trainer = Trainer(cfg, tmp_path)
    main_slab, extra_slab = trainer.train_slabs
    assert extra_slab.raw.shape == (50, 100, 200) and extra_slab.share == 0.3
    assert (extra_slab.labels != 0).all()  # the 9 % membrane voxels took a body's id
    for stat in (np.mean, np.std):  # its contrast is now data.raw's training slab's
        assert stat(extra_slab.raw) == pytest.approx(stat(main_slab.raw), abs=1.0)
    draws = [trainer.source.sampler.choose((8, 48, 48)) is extra_slab for _ in range(2000)]
    assert np.mean(draws) == pytest.approx(0.3, abs=0.04)
    assert main_slab.z_range == (0, 24)
    aniso = tiny_test.parent / "fib_medulla_250_aniso5.hdf"  # 50 nm sections: refused
    extra = {"raw": f"{aniso}:volumes/raw", "labels": f"{aniso}:volumes/labels/neuron_ids"}
    cfg = config_from_dict(cfg.to_dict() | {"data": data | {"extra": [extra | {"share": 0.3}]}})
    with pytest.raises(ConfigError, match=r"voxels of \[50.0, 10.0, 10.0\] nm"):
        Trainer(cfg, tmp_path / "aniso")


def test_validation_over_thick_cuts_ranks_by_the_mean_voi(tiny_train, tmp_path) -> None:
    """``thick_sections.val_z`` adds the validation tissue's other cuts: the loss is pooled,
    and one threshold is chosen for all cuts by their mean VOI. (The tiny volume stands in for
    both the thick volume and its isotropic source: only the mechanics are tested here.)"""
    cfg = tiny_config(tiny_train)
    data = cfg.to_dict()["data"] | {"train_z": [0, 16], "val_z": [16, 24], "test_z": [24, 50]}
    thick = {"raw": data["raw"], "labels": data["labels"], "factor": 2, "z": [0, 30],
             "val_z": [30, 48]}  # fmt: skip
    with pytest.raises(ConfigError, match=r"thick_sections.val_z.*\[32, 48\]"):
        config_from_dict(cfg.to_dict() | {"data": data | {"thick_sections": thick}})
    thick["val_z"] = [32, 48]
    cfg = config_from_dict(cfg.to_dict() | {"data": data | {"thick_sections": thick}})
    trainer = Trainer(cfg, tmp_path, segmenter=lambda affs: [np.ones(affs.shape[1:], np.uint64)])
    assert [s.raw.shape[0] for s in trainer.val_slabs] == [8, 8, 7]
    assert [s.z_range for s in trainer.val_slabs[1:]] == [(32, 48), (33, 47)]
    metrics = trainer.validate()
    assert np.isfinite(metrics["loss"]) and metrics["voi_split"] == 0  # one segment: no split
    assert metrics["voi_merge"] > 0 and metrics["threshold"] == cfg.validation.thresholds[0]


def test_best_mean_chooses_one_threshold_for_every_region() -> None:
    from ssn_deploy.training.validation import best_mean

    def rows(vois):
        return [{"voi": v, "voi_split": v, "voi_merge": 0.0, "arand": 0.1, "cremi_score": 0.0,
                 "threshold": t} for t, v in zip((0.3, 0.5, 0.7), vois, strict=True)]  # fmt: skip

    # region a is best at 0.3 and region b at 0.7, but 0.5 is best on average
    best = best_mean([rows([1.0, 1.2, 2.0]), rows([2.0, 1.2, 1.0])])
    assert best["threshold"] == 0.5 and best["voi"] == pytest.approx(1.2)
    assert best_mean([rows([1.0, 1.2, 2.0])])["threshold"] == 0.3


def losses(run_dir: Path) -> list[str]:
    with open(run_dir / "log.csv", newline="") as f:
        return [r["loss"] for r in csv.DictReader(f)]


def test_resume_reproduces_the_uninterrupted_run_exactly(tiny_train, tmp_path) -> None:
    cfg = tiny_config(tiny_train, iterations=6, checkpoint_every=3, val_every=100, log_every=1)
    train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", iterations=3, progress=False)
    train(cfg, tmp_path / "b", resume=True, progress=False)
    assert len(losses(tmp_path / "a")) == 6
    assert losses(tmp_path / "b") == losses(tmp_path / "a")


def test_existing_run_dir_is_refused_without_resume_or_overwrite(tiny_train, tmp_path) -> None:
    (tmp_path / "log.csv").write_text("x")
    with pytest.raises(OutputExistsError, match="--resume"):
        train(tiny_config(tiny_train), tmp_path, progress=False)
    result = CliRunner().invoke(main, ["train", str(CONFIGS / "fib_tiny_train.yaml"), "-o",
                                       str(tmp_path)])  # fmt: skip
    assert result.exit_code == 1 and "exists" in result.output


def test_fifty_iterations_lower_the_loss(tiny_train, tmp_path) -> None:
    cfg = tiny_config(tiny_train, iterations=50, val_every=50, checkpoint_every=50)
    best = train(cfg, tmp_path, progress=False)
    values = [float(v) for v in losses(tmp_path)]
    assert len(values) == 50
    assert np.mean(values[-10:]) < 0.9 * np.mean(values[:10])
    assert best.name == "best.ckpt" and (tmp_path / "last.ckpt").exists()
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "environment.jsonl").exists()


def test_non_finite_batch_skips_the_update_and_keeps_batchnorm_stats(tiny_train, tmp_path) -> None:
    trainer = Trainer(tiny_config(tiny_train), tmp_path)
    batch = trainer.next_batch()
    batch.raw[...] = np.nan
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.step(batch).get("skipped") == 1.0 and trainer.skipped == 1
    after = trainer.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_training_reports_validation_and_best_checkpoint(tiny_train, tmp_path) -> None:
    raw = yaml.safe_load((CONFIGS / "fib_tiny_train.yaml").read_text())
    raw["data"] |= {"raw": f"{tiny_train}:volumes/raw",
                    "labels": f"{tiny_train}:volumes/labels/neuron_ids"}  # fmt: skip
    raw["training"] |= {"iterations": 2, "val_every": 1, "checkpoint_every": 2}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["train", str(config), "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "iteration 1: validation loss" in result.output
    assert "VOI" in result.output and "ARAND" in result.output and "threshold" in result.output
    assert "best.ckpt is now iteration 1" in result.output


def test_every_config_key_is_documented() -> None:
    import dataclasses

    from ssn_deploy.training.schema import KEY_DOCS, SECTIONS, config_reference

    keys = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert keys == set(KEY_DOCS)
    text = config_reference()
    assert all(key.split(".")[1] in text for key in keys)
    result = CliRunner().invoke(main, ["train", "--config-keys"])
    assert result.exit_code == 0 and "validation:" in result.output and "test_z" in result.output


def test_poly_schedule_holds_then_decays_to_lr_end(tiny_train) -> None:
    cfg = tiny_config(tiny_train, iterations=100, lr=1e-3, lr_schedule="poly",
                      lr_decay_start=40, lr_end=1e-5).training  # fmt: skip
    assert cfg.lr_at(0) == cfg.lr_at(39) == 1e-3
    values = [cfg.lr_at(i) for i in range(40, 101)]
    assert all(a > b for a, b in itertools.pairwise(values))
    assert values[-1] == pytest.approx(1e-5)
    with pytest.raises(ConfigError, match="lr_decay_start"):
        tiny_config(tiny_train, iterations=10, lr_schedule="poly", lr_decay_start=10)


def test_worker_batches_do_not_depend_on_worker_count_and_resume_exactly(
    tiny_train, tmp_path
) -> None:
    """loader_workers: batches keyed by (seed, iteration, index) — the same with 1 or 2
    workers, and a run resumed from its checkpoint logs the uninterrupted run's losses."""
    batches = {}
    for workers in (1, 2):
        trainer = Trainer(tiny_config(tiny_train, loader_workers=workers, batch_size=2), tmp_path)
        try:
            batches[workers] = [trainer.next_batch() for _ in range(3)]
        finally:
            trainer.close_loader()
    for a, b in zip(batches[1], batches[2], strict=True):
        assert a.raw.shape[0] == 2 and np.array_equal(a.raw, b.raw)
        assert np.array_equal(a.affs, b.affs) and np.array_equal(a.weights, b.weights)
    assert not np.array_equal(batches[1][0].raw, batches[1][1].raw)

    cfg = tiny_config(
        tiny_train, iterations=6, checkpoint_every=3, val_every=100, log_every=1, loader_workers=2
    )
    train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", iterations=3, progress=False)
    train(cfg, tmp_path / "b", resume=True, progress=False)
    assert len(losses(tmp_path / "a")) == 6
    assert losses(tmp_path / "b") == losses(tmp_path / "a")


def test_a_killed_loader_worker_raises_instead_of_hanging(tiny_train, tmp_path) -> None:
    """A worker lost (e.g. to the OOM killer) is an error, not a wait for a task that will
    never finish (multiprocessing.Pool's behaviour)."""
    import os
    import signal
    from concurrent.futures import wait
    from concurrent.futures.process import BrokenProcessPool

    trainer = Trainer(tiny_config(tiny_train, loader_workers=2, batch_size=2), tmp_path)
    try:
        trainer.next_batch()
        # Killed between tasks: a worker killed while writing its result leaves half a message
        # in the result pipe, and CPython 3.11's executor then blocks reading it for ever (seen
        # once in CI here). That case is CPython's to fix; this test is about a lost worker.
        wait(trainer.loader.pending)
        for pid in list(trainer.loader.pool._processes):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(BrokenProcessPool):
            for _ in range(20):  # prefetched samples may still arrive first
                trainer.next_batch()
    finally:
        trainer.close_loader()


def test_loader_workers_are_refused_for_semi_supervised_training(tiny_train) -> None:
    raw = tiny_config(tiny_train, loader_workers=2).to_dict()
    raw["semi"] = {"method": "mean_teacher", "unlabeled": [{"raw": raw["data"]["raw"]}]}
    with pytest.raises(ConfigError, match="loader_workers"):
        config_from_dict(raw)


def test_time_budget_fits_the_schedule_and_records_it(tiny_train, tmp_path) -> None:
    """--time-budget: 50 timed updates, then iterations (and the poly decay start, in
    proportion) set so the run ends in time; config.yaml records the schedule."""
    import time

    cfg = tiny_config(
        tiny_train, iterations=1000, lr_schedule="poly", lr_decay_start=600, val_every=1000,
        checkpoint_every=1000, log_every=1,
    )  # fmt: skip
    start = time.perf_counter()
    train(cfg, tmp_path / "run", progress=False, time_budget_s=20)
    elapsed = time.perf_counter() - start
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["training"]
    assert 50 < recorded["iterations"] < 1000
    assert recorded["lr_decay_start"] == round(600 * recorded["iterations"] / 1000)
    assert len(losses(tmp_path / "run")) == recorded["iterations"]
    assert elapsed < 20 * 1.3  # data reading and the model build come on top of the budget
    result = CliRunner().invoke(
        main, ["train", str(CONFIGS / "fib_tiny_train.yaml"), "-o", str(tmp_path / "run"),
               "--resume", "--time-budget", "1"],
    )  # fmt: skip
    assert result.exit_code == 1 and "config.yaml" in result.output


def test_shape_descriptor_head_trains_beside_the_model_and_stays_out_of_it(
    tiny_train, tmp_path
) -> None:
    """training.lsd_sigma: batches carry the 10 descriptors, a training-only head learns them
    (its state in the checkpoint's training state, resumed exactly), the saved model is the
    plain U-Net, and semi-supervised configs refuse it."""
    from ssn_deploy.models.checkpoint import load_checkpoint
    from ssn_deploy.models.registry import build_model

    cfg = tiny_config(
        tiny_train, iterations=4, checkpoint_every=2, val_every=100, log_every=1, lsd_sigma=40.0
    )
    fresh = Trainer(cfg, tmp_path / "probe")
    batch = fresh.next_batch()
    assert batch.lsds.shape == (1, 10, 16, 48, 48) and batch.lsd_weights.shape == (1, 1, 16, 48, 48)
    assert 0 <= batch.lsds.min() and batch.lsds.max() <= 1 and batch.lsd_weights.mean() > 0.5
    assert not batch.lsds[np.broadcast_to(batch.lsd_weights == 0, batch.lsds.shape)].any()

    train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", iterations=2, progress=False)
    train(cfg, tmp_path / "b", resume=True, progress=False)
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    with open(tmp_path / "a" / "log.csv", newline="") as f:
        lsd_losses = [float(r["lsd_loss"]) for r in csv.DictReader(f)]
    assert len(lsd_losses) == 4 and all(0 < v < 1 for v in lsd_losses)

    ckpt = load_checkpoint(tmp_path / "a" / "last.ckpt")
    head = ckpt.extra["lsd_head"]
    assert head["weight"].shape[:2] == (10, cfg.model.filters[0])
    assert not torch.equal(head["weight"], fresh.lsd_head.state_dict()["weight"])  # it learned
    plain = build_model(cfg.model).state_dict()
    assert ckpt.model.state_dict().keys() == plain.keys()
    for name in ("best.ckpt", "last.ckpt"):
        assert load_checkpoint(tmp_path / "a" / name).model.config == cfg.model
    assert "lsd_head" not in load_checkpoint(tmp_path / "a" / "best.ckpt").extra  # weights only

    raw = cfg.to_dict()
    raw["semi"] = {"method": "mean_teacher", "unlabeled": [{"raw": raw["data"]["raw"]}]}
    with pytest.raises(ConfigError, match="lsd_sigma"):
        config_from_dict(raw)
