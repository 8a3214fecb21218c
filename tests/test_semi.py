"""IIC mixing and the semi-supervised trainers: masks, mixed targets, losses, stop-gradients,
and short real runs on the gala FIB-SEM fixtures (unlabelled pool: the other fixture's raw)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ssn_deploy.affinities import affinities_from_labels
from ssn_deploy.errors import ConfigError
from ssn_deploy.training.config import config_from_dict
from ssn_deploy.training.losses import weighted_bce
from ssn_deploy.training.mixing import box_mask, edge_weights, mix, quadrant_mask, random_mask
from ssn_deploy.training.semi import IICTrainer, MeanTeacherTrainer, mse
from ssn_deploy.training.trainer import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OFFSETS = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))


@pytest.mark.parametrize("make", [box_mask, quadrant_mask, random_mask])
def test_masks_are_binary_and_constant_along_z(make) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = make((6, 40, 48), rng)
        assert m.shape == (6, 40, 48) and set(np.unique(m)) <= {0.0, 1.0}
        assert (m == m[:1]).all(), "axial-through: the same pattern in every section"
        assert 0 < m.mean() < 1


def test_box_and_quadrant_sizes() -> None:
    rng = np.random.default_rng(1)
    box = box_mask((1, 160, 160), rng)
    assert box.sum() in (90 * 90, 160 * 160 - 90 * 90), "the paper's 90×90 in 160×160"
    assert quadrant_mask((1, 160, 160), rng).mean() == 0.5


def test_mixed_targets_keep_each_sources_targets() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(1, 5, (4, 16, 16)).astype(np.uint64)
    b = rng.integers(5, 9, (4, 16, 16)).astype(np.uint64)
    ta, _ = affinities_from_labels(a, OFFSETS)
    tb, _ = affinities_from_labels(b, OFFSETS)
    m = quadrant_mask(a.shape, rng)
    mixed = mix(ta, tb, m)
    assert np.array_equal(mixed[:, m == 1], ta[:, m == 1])
    assert np.array_equal(mixed[:, m == 0], tb[:, m == 0])
    w = edge_weights(m, OFFSETS)
    across = np.zeros_like(w, bool)
    for c, off in enumerate(OFFSETS):  # edge v → v + offset crosses where the mask changes
        shifted = np.roll(m, shift=[-o for o in off], axis=(0, 1, 2))
        valid = np.ones(m.shape, bool)
        for axis, o in enumerate(off):
            index = [slice(None)] * 3
            if o < 0:
                index[axis] = slice(0, -o)
                valid[tuple(index)] = False
        across[c] = (shifted != m) & valid
    assert (w[across] == 0).all() and (w[~across] == 1).all()
    inside = edge_weights(m, OFFSETS, side=1.0)
    assert (inside[:, m == 0] == 0).all() and inside.sum() < w.sum()


def test_losses_vanish_when_prediction_equals_target() -> None:
    t = torch.tensor(np.random.default_rng(3).integers(0, 2, (1, 3, 2, 4, 4)), dtype=torch.float32)
    w = torch.ones_like(t)
    assert float(mse(t, t, w)) == 0.0
    assert float(weighted_bce((t * 2 - 1) * 40, t, w)) < 1e-12


def semi_config(tiny_train: Path, tiny_test: Path, method: str, **training) -> object:
    raw = yaml.safe_load((CONFIGS / "fib_tiny_train.yaml").read_text())
    raw["data"] |= {"raw": f"{tiny_train}:volumes/raw",
                    "labels": f"{tiny_train}:volumes/labels/neuron_ids"}  # fmt: skip
    raw["training"] |= {"amp": "none", "threads": 1} | training
    raw["semi"] = {
        "method": method,
        "unlabeled": [{"raw": f"{tiny_test}:volumes/raw", "z": [0, 50]}],
    }
    return config_from_dict(raw)


def test_stop_gradient_targets_carry_no_gradient(tiny_train, tiny_test, tmp_path) -> None:
    for method, cls in (("iic", IICTrainer), ("mean_teacher", MeanTeacherTrainer)):
        trainer = cls(semi_config(tiny_train, tiny_test, method), tmp_path / method)
        u = trainer.unlabelled_batch()
        target = trainer.target(u)
        assert not target.requires_grad and target.grad_fn is None
        loss, terms = trainer.compute_loss(trainer.next_batch())
        loss.backward()
        assert all(p.grad is not None for p in trainer.model.parameters() if p.requires_grad)
        if trainer.teacher is not None:
            assert all(p.grad is None for p in trainer.teacher.parameters())
        assert terms and all(np.isfinite(v) for v in terms.values())


def test_semi_config_errors(tiny_train, tiny_test) -> None:
    with pytest.raises(ConfigError, match=r"semi\.unlabeled"):
        config_from_dict(
            yaml.safe_load((CONFIGS / "fib_tiny_train.yaml").read_text())
            | {"semi": {"method": "iic"}}
        )
    with pytest.raises(ConfigError, match=r"semi\.method"):
        semi_config(tiny_train, tiny_test, "mixup")


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "log.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["iic", "mean_teacher"])
def test_a_short_run_lowers_the_loss(tiny_train, tiny_test, tmp_path, method) -> None:
    cfg = semi_config(tiny_train, tiny_test, method, iterations=40, log_every=1, val_every=40,
                      checkpoint_every=20)  # fmt: skip
    train(cfg, tmp_path, progress=False)
    values = losses(tmp_path)
    assert len(values) == 40
    assert np.mean(values[-10:]) < 0.9 * np.mean(values[:10])


def test_semi_supervised_resume_is_exact_and_init_from_loads(
    tiny_train, tiny_test, tmp_path
) -> None:
    cfg = semi_config(tiny_train, tiny_test, "mean_teacher", iterations=4, log_every=1,
                      val_every=100, checkpoint_every=2)  # fmt: skip
    train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", iterations=2, progress=False)
    train(cfg, tmp_path / "b", resume=True, progress=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    warm = tmp_path / "a" / "last.ckpt"
    tuned = semi_config(tiny_train, tiny_test, "iic", iterations=1, val_every=100,
                        init_from=str(warm))  # fmt: skip
    trainer = IICTrainer(tuned, tmp_path / "c")
    trainer.initialise_from(warm)
    from ssn_deploy.models.checkpoint import load_checkpoint

    reference = load_checkpoint(warm).model.state_dict()
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, reference[name]), name


# --- labels only inside ROIs (data.rois), the label-budget setting of the ablation ---------


def roi_config(tiny_train: Path, rois: object, **data) -> dict:
    raw = yaml.safe_load((CONFIGS / "fib_tiny_train.yaml").read_text())
    raw["data"] |= {
        "raw": f"{tiny_train}:volumes/raw",
        "labels": f"{tiny_train}:volumes/labels/neuron_ids",
        "rois": rois,
    } | data
    raw["training"] |= {"amp": "none", "threads": 1}
    return raw


def test_rois_from_boxes_or_a_selection_and_refused_outside_train_z(tiny_train, tmp_path) -> None:
    boxes = [[[0, 20], [0, 60], [0, 60]], [[10, 34], [40, 100], [100, 180]]]
    cfg = config_from_dict(roi_config(tiny_train, boxes))
    assert cfg.data.rois == (((0, 20), (0, 60), (0, 60)), ((10, 34), (40, 100), (100, 180)))
    assert cfg.to_dict()["data"]["rois"] == boxes
    selection = {
        "rois": [
            {"offset_voxels": [0, 0, 0], "shape_voxels": [20, 60, 60]},
            {"offset_voxels": [10, 40, 100], "shape_voxels": [24, 60, 80]},
        ]
    }
    (tmp_path / "rois.json").write_text(json.dumps(selection))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(roi_config(tiny_train, "rois.json")))
    from ssn_deploy.training.config import load_config

    assert load_config(config_file).data.rois == cfg.data.rois
    with pytest.raises(ConfigError, match=r"data\.rois\[1\].*outside data\.train_z"):
        config_from_dict(roi_config(tiny_train, [boxes[0], [[30, 40], [0, 60], [0, 60]]]))
    with pytest.raises(ConfigError, match=r"data\.rois\[0\]"):
        config_from_dict(roi_config(tiny_train, [[[0, 20], [0, 60]]]))
    (tmp_path / "bad.json").write_text("{}")
    config_file.write_text(yaml.safe_dump(roi_config(tiny_train, "bad.json")))
    with pytest.raises(ConfigError, match=r"data\.rois: .*not a rois\.json"):
        load_config(config_file)


def test_crops_come_only_from_inside_the_labelled_boxes(tiny_train, tmp_path) -> None:
    """Every crop the trainer draws lies inside one ROI (raw matched against the volume), both
    boxes are used, and a crop that fits only the larger box comes only from it."""
    from ssn_deploy.training.trainer import Trainer
    from ssn_deploy.volumes import open_volume

    boxes = [[[0, 20], [0, 60], [0, 60]], [[10, 34], [40, 100], [100, 180]]]
    trainer = Trainer(config_from_dict(roi_config(tiny_train, boxes)), tmp_path)
    volume = np.asarray(open_volume(f"{tiny_train}:volumes/raw")[:])
    for slab, box in zip(trainer.train_slabs, boxes, strict=True):
        np.testing.assert_array_equal(slab.raw, volume[tuple(slice(a, b) for a, b in box)])
    sampler = trainer.source.sampler
    used = set()
    for _ in range(40):
        slab = sampler.choose((16, 48, 48))
        used.add(id(slab))
        raw, _, _ = sampler.crop((16, 48, 48))
        assert raw.base is slab.raw  # a view into the chosen box, never outside it
    assert used == {id(s) for s in trainer.train_slabs}
    assert all(sampler.choose((22, 48, 48)) is trainer.train_slabs[1] for _ in range(10))
    with pytest.raises(Exception, match="fits in none of the labelled boxes"):
        sampler.choose((30, 48, 48))
    batch = trainer.next_batch()
    assert batch.raw.shape == (1, 1, 16, 48, 48) and np.isfinite(batch.weights).all()
