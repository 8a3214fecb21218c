"""Every key of a training config, with its type, default and meaning: ``train --config-keys``.

The text lives here, next to the dataclasses it documents, and a test checks that every field
of every section has an entry (and no entry names a field that does not exist), so the
reference cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ssn_deploy.models.unet import ModelConfig
from ssn_deploy.training.config import (
    AugmentConfig,
    DataConfig,
    SemiConfig,
    TrainingConfig,
    ValidationConfig,
)

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "augment": AugmentConfig,
    "validation": ValidationConfig,
    "semi": SemiConfig,
}

KEY_DOCS: dict[str, str] = {
    "model.name": "architecture; only unet3d (residual symmetric U-Net, DESIGN §2)",
    "model.filters": "channels per level, top to bottom (paper: 28, 36, 48, 64, 80)",
    "model.poolings": "max-pool factor z,y,x below each level; (1,2,2) for serial sections, "
    "(2,2,2) somewhere for isotropic data; their product is the input granularity",
    "model.offsets": "affinity offsets dz,dy,dx, one output channel each; the 3 nearest "
    "neighbours (-1,0,0), (0,-1,0), (0,0,-1) feed the boundary map and the region graph, "
    "longer ones (e.g. -3,0,0) are auxiliary outputs (trained, stored, not segmented)",
    "model.in_channels": "input channels (1 for EM)",
    "model.embed_kernel": "kernel of the embedding convs in and out (odd; 1,5,5 anisotropic)",
    "model.skip": "how skips join the decoder: concat or add",
    "model.norm": "batch, group or none",
    "data.raw": "labelled volume's raw, FILE:DATASET or PATH (relative to the config file)",
    "data.labels": "its neuron ids (uint64 or any integer; same shape as raw)",
    "data.train_z": "[z_begin, z_end) of the sections training crops come from (all if unset)",
    "data.val_z": "[z_begin, z_end) of the validation slab that ranks checkpoints "
    "(best.ckpt); must not overlap train_z",
    "data.test_z": "held-out test slab: any overlapping range is refused and it is never read",
    "data.unknown_label": "id meaning 'unknown' (loss weight 0); null if every id is known",
    "data.mask_channels": "output channels without a valid target (e.g. z for 2D-only "
    "labels): loss weight 0",
    "data.isotropic": "true for FIB-SEM (z transposes, 3D fragments in validation); false for "
    "serial sections (per-section 2D fragments)",
    "data.normalization": "scale ((raw/255-0.5)/0.5) or meanstd (measured on train_z)",
    "data.rois": "labels only inside these boxes: [[z0, z1], [y0, y1], [x0, x1]] voxels each, or "
    "the path of a rois.json from ssn-deploy select; crops come from inside one box (all of "
    "train_z if unset)",
    "data.thick_sections": "for an anisotropic model: more training sections cut from the "
    "isotropic volume data.raw was thickened from, {raw, labels, factor, z, phases}: each run of "
    "factor sections averaged (labels of the middle one) at every phase; z must lie within "
    "train_z x factor; val_z (within val_z x factor) cuts the validation tissue the same way, "
    "and checkpoints are then ranked by the mean VOI of all validation cuts",
    "data.extra": "more labelled volumes of the same modality and voxel size, read whole: a list "
    "of {raw, labels, share, z, unknown_label, fill_label, match_intensity}; share is the fraction "
    "of crops drawn from each; fill_label (e.g. 0 for membrane-labelled data) gives those voxels "
    "the nearest body's id, the dense convention of data.labels; match_intensity maps its "
    "histogram onto data.raw's training slab; never data.raw's file",
    "training.iterations": "total updates (a resumed run continues to this number)",
    "training.crop": "crop z,y,x; a multiple of the model's granularity",
    "training.batch_size": "crops per update",
    "training.lr": "Adam learning rate (eps 0.01, weight decay 1e-6, AMSGrad as the paper)",
    "training.lr_schedule": "constant, or poly: constant until lr_decay_start, then decayed "
    "to lr_end at the last iteration",
    "training.lr_decay_start": "poly: the iteration the decay starts at",
    "training.lr_end": "poly: the learning rate at the last iteration",
    "training.lr_power": "poly: the decay's power (paper's SimSiam schedule: 1.5)",
    "training.loss": "bce (class-balanced) or mse",
    "training.amp": "none or bf16 (autocast; fast only on CPUs with AVX512-BF16, or GPUs)",
    "training.device": "cpu or cuda",
    "training.threads": "torch intra-op threads (null: torch's default)",
    "training.loader_workers": "processes that make batches ahead (0: in the training "
    "process); for GPUs, where augmentation would otherwise stall the updates; batches "
    "are the same for any number, so resume stays exact (supervised training only)",
    "training.clip_grad_norm": "gradient-norm clip; null disables it",
    "training.seed": "seeds crops, augmentations and initialisation",
    "training.init_from": "checkpoint whose weights start the run (e.g. the supervised warm-up "
    "before semi-supervised tuning); path relative to the config file",
    "training.lsd_sigma": "local shape descriptors (Sheridan et al. 2022) as an auxiliary "
    "target: their Gaussian window in nm (null: off); a training-only head predicts them from "
    "the affinity head's features and is not part of the saved model (supervised only)",
    "training.lsd_weight": "weight of the descriptors' squared error beside the affinity loss",
    "training.lsd_downsample": "descriptors computed on a grid this many times coarser "
    "(speed); an integer or z,y,x factors (1,2,2 for anisotropic sections)",
    "training.log_every": "iterations per log.csv row",
    "training.checkpoint_every": "iterations per checkpoint (last.ckpt and checkpoints/)",
    "training.val_every": "iterations per validation (printed; best.ckpt follows the best)",
    "augment.flip": "probability of random flips",
    "augment.transpose": "probability of a random axis transpose (y/x only unless isotropic)",
    "augment.intensity": "probability of a contrast/brightness change",
    "augment.noise": "probability of Gaussian noise (std augment.noise_std)",
    "augment.blur": "probability of a Gaussian blur",
    "augment.missing_section": "probability of blanking one section",
    "augment.misalignment": "probability of shifting sections by up to augment.max_shift",
    "augment.elastic": "probability of an elastic deformation (augment.elastic_sigma)",
    "augment.noise_std": "noise standard deviation in [0, 1] intensity units",
    "augment.max_shift": "largest misalignment shift, in pixels",
    "augment.elastic_sigma": "displacement scale of the elastic deformation, in pixels",
    "validation.thresholds": "agglomeration thresholds tried at each validation; the best "
    "becomes the model's threshold (used by infer)",
    "validation.ignore_ids": "ground-truth ids left out of validation metrics (e.g. glia)",
    "semi.method": "supervised, iic (intra- and inter-mixing consistency) or mean_teacher",
    "semi.unlabeled": "unlabelled raw volumes: FILE:DATASET, or {raw: FILE:DATASET, z: [a, b]}",
    "semi.weight_intra_unlabeled": "IIC: weight of the consistency on two mixed unlabelled crops",
    "semi.weight_inter": "IIC: weight of the labelled-into-unlabelled mixing terms",
    "semi.weight_consistency": "mean_teacher: weight of the consistency to the EMA teacher",
    "semi.target": "IIC target network: siamese (the same weights, stop-gradient) or ema",
    "semi.ema_decay": "decay of the EMA teacher (target: ema, and mean_teacher)",
    "semi.box_fraction": "IIC box mask side as a fraction of the crop (paper: 90 of 160)",
}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if isinstance(value, tuple):
        value = [list(v) if isinstance(v, tuple) else v for v in value]
    return "null" if value is None else value


def config_reference() -> str:
    """The reference text: one block per section, one line per key."""
    lines = ["Training config keys (YAML sections; unknown keys are refused):"]
    for section, cls in SECTIONS.items():
        lines.append(f"\n{section}:")
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            lines.append(f"  {f.name}: {_default(f)}\n      {KEY_DOCS[key]}")
    return "\n".join(lines)
