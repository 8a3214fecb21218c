"""Training configuration: YAML → typed, validated dataclasses (errors name the bad key)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ssn_deploy.errors import ConfigError, InputNotFoundError
from ssn_deploy.models.unet import ModelConfig

ZRange = tuple[int, int]
RoiBox = tuple[ZRange, ZRange, ZRange]


def _z_range(value: Any, key: str) -> ZRange | None:
    if value is None:
        return None
    try:
        z0, z1 = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected [z_begin, z_end], got {value!r}") from None
    if not 0 <= z0 < z1:
        raise ConfigError(f"{key}: expected 0 <= z_begin < z_end, got {value!r}")
    return z0, z1


def _roi_box(value: Any, key: str) -> RoiBox:
    try:
        box = tuple((int(a), int(b)) for a, b in value)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 3 or any(not 0 <= a < b for a, b in box):
        raise ConfigError(
            f"{key}: expected [[z0, z1], [y0, y1], [x0, x1]] with 0 <= begin < end, got {value!r}"
        )
    return box  # type: ignore[return-value]


def read_rois_json(path: Path) -> list[list[list[int]]]:
    """The voxel boxes of a ``ssn-deploy select`` rois.json: ``[[z0, z1], [y0, y1], [x0, x1]]``."""
    if not path.is_file():
        raise InputNotFoundError(f"data.rois: {path} not found")
    try:
        rois = json.loads(path.read_text())["rois"]
        return [
            [[b, b + s] for b, s in zip(r["offset_voxels"], r["shape_voxels"], strict=True)]
            for r in rois
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"data.rois: {path} is not a rois.json from ssn-deploy select: {exc}"
        ) from None


def _overlaps(a: ZRange, b: ZRange) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@dataclass(frozen=True)
class ThickSections:
    """More training sections for an anisotropic model, cut from the isotropic volume that
    ``data.raw`` was thickened from: every ``factor`` consecutive sections averaged (raw, rounded)
    and labelled by the middle one, starting at each of ``phases`` (0 ≤ phase < factor) within
    the source's ``z``.

    ``fib_medulla_250_aniso5`` is ``fib_medulla_250`` thickened so at phase 0; phases 1–4 of the
    same training sections are 4 more cuts of tissue the model already trains on, never of the
    validation or test sections: ``z`` must lie within ``data.train_z × factor``. ``val_z``
    (within ``data.val_z × factor``) cuts the validation tissue at the same phases too, and
    checkpoints are then ranked by the mean VOI over all cuts: more sections, less noise.
    """

    raw: str
    labels: str
    factor: int
    z: ZRange
    phases: tuple[int, ...] = ()
    val_z: ZRange | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", int(self.factor))
        if self.factor < 2:
            raise ConfigError(f"data.thick_sections.factor: expected >= 2, got {self.factor}")
        object.__setattr__(self, "z", _z_range(self.z, "data.thick_sections.z"))
        object.__setattr__(self, "val_z", _z_range(self.val_z, "data.thick_sections.val_z"))
        phases = tuple(int(p) for p in self.phases) or tuple(range(self.factor))
        if any(not 0 <= p < self.factor for p in phases) or len(set(phases)) != len(phases):
            raise ConfigError(
                f"data.thick_sections.phases: expected distinct values in 0..{self.factor - 1}, "
                f"got {list(self.phases)}"
            )
        object.__setattr__(self, "phases", phases)
        for key in ("z", "val_z"):
            rng = getattr(self, key)
            if rng is not None and rng[1] - rng[0] < self.factor + max(phases):
                raise ConfigError(
                    f"data.thick_sections.{key}: {list(rng)} holds no {self.factor}-section run "
                    f"at phase {max(phases)}"
                )


def _require_within(
    rng: ZRange, zone: ZRange | None, factor: int, key: str, zone_key: str, other: str
) -> None:
    """Refuse a ``data.thick_sections`` range of the isotropic source that reaches outside the
    thickened volume's ``zone`` × ``factor``: it would read ``other`` or test tissue."""
    if zone is not None and zone[0] * factor <= rng[0] < rng[1] <= zone[1] * factor:
        return
    scaled = f" = {[zone[0] * factor, zone[1] * factor]}" if zone else ""
    raise ConfigError(
        f"data.thick_sections.{key}: {list(rng)} must lie within data.{zone_key} × {factor}"
        f"{scaled}, so that no {other} or test tissue is read"
    )


@dataclass(frozen=True)
class ExtraVolume:
    """Another labelled volume of the same modality and voxel size, trained on in full.

    ``fill_label`` (e.g. 0 where membranes are labelled 0) gives those voxels the nearest body's
    id, the dense convention of ``data.labels`` (boundaries between ids, not between voxels of a
    boundary class). ``match_intensity`` maps its raw's histogram onto ``data.raw``'s first
    training slab (another microscope's contrast, as a per-dataset normalisation would).
    ``share`` is the fraction of crops drawn from it; ``data.raw``'s slabs share the rest. It
    must not be ``data.raw``'s file, whose test region it would read.
    """

    raw: str
    labels: str
    share: float
    z: ZRange | None = None
    unknown_label: int | None = None
    fill_label: int | None = None
    match_intensity: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "share", float(self.share))
        if not 0 < self.share < 1:
            raise ConfigError(f"data.extra.share: expected a fraction in (0, 1), got {self.share}")
        object.__setattr__(self, "z", _z_range(self.z, "data.extra.z"))


def _file(spec: str) -> Path:
    return Path(spec.partition(":")[0]).resolve()


@dataclass(frozen=True)
class DataConfig:
    """Where labelled data lives and which z-slabs training and validation may read.

    ``test_z`` is the held-out test slab: no range that training or checkpoint selection reads
    may overlap it, and the reader never loads it (validation pads by reflection instead of
    reading context from it).
    """

    raw: str
    labels: str
    train_z: ZRange | None = None
    val_z: ZRange | None = None
    test_z: ZRange | None = None
    unknown_label: int | None = None
    mask_channels: tuple[int, ...] = ()
    isotropic: bool = False
    normalization: str = "scale"
    rois: tuple[RoiBox, ...] | None = None
    thick_sections: ThickSections | None = None
    extra: tuple[ExtraVolume, ...] = ()

    def __post_init__(self) -> None:
        extra = []
        for i, item in enumerate(self.extra or ()):
            if isinstance(item, dict):
                keys = set(item) - {f.name for f in fields(ExtraVolume)}
                if keys:
                    raise ConfigError(f"data.extra[{i}]: unknown key(s) {sorted(keys)}")
                try:
                    item = ExtraVolume(**item)
                except TypeError as exc:
                    raise ConfigError(f"data.extra[{i}]: {exc}") from None
            if _file(item.raw) == _file(self.raw) or _file(item.labels) == _file(self.labels):
                raise ConfigError(
                    f"data.extra[{i}]: {item.raw} is data.raw's file; extra volumes are read "
                    "whole, which would read its validation and test regions"
                )
            extra.append(item)
        if sum(e.share for e in extra) >= 1:
            raise ConfigError("data.extra: the shares must leave some crops to data.raw")
        object.__setattr__(self, "extra", tuple(extra))
        if isinstance(self.thick_sections, dict):
            keys = set(self.thick_sections) - {f.name for f in fields(ThickSections)}
            if keys:
                raise ConfigError(f"data.thick_sections: unknown key(s) {sorted(keys)}")
            try:
                thick = ThickSections(**self.thick_sections)
            except TypeError as exc:
                raise ConfigError(f"data.thick_sections: {exc}") from None
            object.__setattr__(self, "thick_sections", thick)
        for key in ("train_z", "val_z", "test_z"):
            object.__setattr__(self, key, _z_range(getattr(self, key), f"data.{key}"))
        if self.rois is not None:
            if not self.rois:
                raise ConfigError("data.rois: empty; omit it to train on all of data.train_z")
            boxes = tuple(_roi_box(b, f"data.rois[{i}]") for i, b in enumerate(self.rois))
            object.__setattr__(self, "rois", boxes)
            zone = self.train_z or (0, max(b[0][1] for b in boxes))
            for i, box in enumerate(boxes):
                if not zone[0] <= box[0][0] < box[0][1] <= zone[1]:
                    raise ConfigError(
                        f"data.rois[{i}]: z {list(box[0])} lies outside data.train_z {list(zone)}"
                    )
        object.__setattr__(self, "mask_channels", tuple(int(c) for c in self.mask_channels))
        if self.normalization not in ("scale", "meanstd"):
            raise ConfigError(
                f"data.normalization: expected 'scale' or 'meanstd', got {self.normalization!r}"
            )
        if self.test_z is not None:
            if self.train_z is None:
                raise ConfigError("data.train_z: required when data.test_z excludes a test slab")
            for key in ("train_z", "val_z"):
                rng = getattr(self, key)
                if rng is not None and _overlaps(rng, self.test_z):
                    raise ConfigError(
                        f"data.{key}: {list(rng)} overlaps the test region data.test_z "
                        f"{list(self.test_z)}, which training must never read"
                    )
        if self.thick_sections is not None:
            thick = self.thick_sections
            _require_within(thick.z, self.train_z, thick.factor, "z", "train_z", "validation")
            if thick.val_z is not None:
                _require_within(thick.val_z, self.val_z, thick.factor, "val_z", "val_z", "training")
        if self.train_z and self.val_z and _overlaps(self.train_z, self.val_z):
            raise ConfigError(
                f"data.val_z: {list(self.val_z)} overlaps data.train_z {list(self.train_z)}"
            )


@dataclass(frozen=True)
class AugmentConfig:
    """Probability of each EM augmentation per sample (0 disables it)."""

    flip: float = 0.5
    transpose: float = 0.5
    intensity: float = 0.5
    noise: float = 0.3
    blur: float = 0.2
    missing_section: float = 0.1
    misalignment: float = 0.1
    elastic: float = 0.1
    noise_std: float = 0.03
    max_shift: int = 6
    elastic_sigma: float = 2.0


@dataclass(frozen=True)
class TrainingConfig:
    iterations: int = 1000
    crop: tuple[int, int, int] = (32, 96, 96)
    batch_size: int = 1
    lr: float = 1e-4
    lr_schedule: str = "constant"
    lr_decay_start: int = 0
    lr_end: float = 1e-5
    lr_power: float = 1.5
    loss: str = "bce"
    amp: str = "none"
    device: str = "cpu"
    threads: int | None = None
    loader_workers: int = 0
    clip_grad_norm: float | None = 10.0
    init_from: str | None = None
    lsd_sigma: float | None = None
    lsd_weight: float = 1.0
    lsd_downsample: int | tuple[int, int, int] = 2
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    val_every: int = 500

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop", tuple(int(c) for c in self.crop))
        if len(self.crop) != 3 or min(self.crop) < 1:
            raise ConfigError(f"training.crop: expected three positive sizes, got {self.crop}")
        if self.loss not in ("bce", "mse"):
            raise ConfigError(f"training.loss: expected 'bce' or 'mse', got {self.loss!r}")
        if self.amp not in ("none", "bf16"):
            raise ConfigError(f"training.amp: expected 'none' or 'bf16', got {self.amp!r}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"training.device: expected 'cpu' or 'cuda', got {self.device!r}")
        for key in ("iterations", "batch_size", "log_every", "checkpoint_every", "val_every"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"training.{key}: must be >= 1, got {getattr(self, key)}")
        if int(self.loader_workers) < 0:
            raise ConfigError(f"training.loader_workers: must be >= 0, got {self.loader_workers}")
        if self.lsd_sigma is not None and not float(self.lsd_sigma) > 0:
            raise ConfigError(f"training.lsd_sigma: must be > 0 nm or null, got {self.lsd_sigma}")
        if not isinstance(self.lsd_downsample, int):
            object.__setattr__(self, "lsd_downsample", tuple(int(f) for f in self.lsd_downsample))
        factors = (
            [self.lsd_downsample] if isinstance(self.lsd_downsample, int) else self.lsd_downsample
        )
        if not float(self.lsd_weight) > 0 or len(factors) not in (1, 3) or min(factors) < 1:
            raise ConfigError(
                "training.lsd_weight must be > 0 and training.lsd_downsample an integer >= 1 "
                f"or z,y,x factors, got {self.lsd_weight}, {self.lsd_downsample}"
            )
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError(f"training.clip_grad_norm: must be > 0, got {self.clip_grad_norm}")
        if not self.lr > 0:
            raise ConfigError(f"training.lr: must be > 0, got {self.lr}")
        if self.lr_schedule not in ("constant", "poly"):
            raise ConfigError(
                f"training.lr_schedule: expected constant or poly, got {self.lr_schedule!r}"
            )
        if self.lr_schedule == "poly":
            if not 0 <= self.lr_decay_start < self.iterations:
                raise ConfigError(
                    f"training.lr_decay_start: expected 0 <= start < iterations, got "
                    f"{self.lr_decay_start}"
                )
            if not 0 < self.lr_end < self.lr or not self.lr_power > 0:
                raise ConfigError("training.lr_end must lie in (0, lr) and lr_power be > 0")

    def lr_at(self, iteration: int) -> float:
        """Learning rate of update ``iteration + 1``: constant, or constant until
        ``lr_decay_start`` and then ``lr_end + (lr − lr_end)·(1 − t)^lr_power`` to the end."""
        if self.lr_schedule == "constant" or iteration < self.lr_decay_start:
            return self.lr
        t = (iteration - self.lr_decay_start) / (self.iterations - self.lr_decay_start)
        return self.lr_end + (self.lr - self.lr_end) * (1 - min(t, 1.0)) ** self.lr_power


@dataclass(frozen=True)
class UnlabelledSource:
    """An unlabelled raw volume (FILE:DATASET or PATH) and the z-range crops may come from."""

    raw: str
    z: ZRange | None = None


@dataclass(frozen=True)
class SemiConfig:
    """Semi-supervised training (DESIGN §2): IIC mixing or a mean teacher, on unlabelled pools.

    ``method: supervised`` (the default) ignores the rest.
    """

    method: str = "supervised"
    unlabeled: tuple[UnlabelledSource, ...] = ()
    weight_intra_unlabeled: float = 0.2
    weight_inter: float = 0.2
    weight_consistency: float = 0.2
    target: str = "siamese"
    ema_decay: float = 0.99
    box_fraction: float = 0.5625

    def __post_init__(self) -> None:
        if self.method not in ("supervised", "iic", "mean_teacher"):
            raise ConfigError(
                f"semi.method: expected supervised, iic or mean_teacher, got {self.method!r}"
            )
        if self.target not in ("siamese", "ema"):
            raise ConfigError(f"semi.target: expected siamese or ema, got {self.target!r}")
        sources = []
        for i, item in enumerate(self.unlabeled):
            if isinstance(item, UnlabelledSource):
                sources.append(item)
            elif isinstance(item, str):
                sources.append(UnlabelledSource(item))
            elif isinstance(item, dict) and "raw" in item and set(item) <= {"raw", "z"}:
                sources.append(
                    UnlabelledSource(
                        str(item["raw"]), _z_range(item.get("z"), f"semi.unlabeled[{i}].z")
                    )
                )
            else:
                raise ConfigError(
                    f"semi.unlabeled[{i}]: expected FILE:DATASET or {{raw: ..., z: [a, b]}}, "
                    f"got {item!r}"
                )
        object.__setattr__(self, "unlabeled", tuple(sources))
        if self.method != "supervised" and not self.unlabeled:
            raise ConfigError(f"semi.unlabeled: {self.method} needs at least one unlabelled volume")
        for key in ("weight_intra_unlabeled", "weight_inter", "weight_consistency"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"semi.{key}: must be >= 0, got {getattr(self, key)}")
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"semi.ema_decay: expected a value in (0, 1), got {self.ema_decay}")
        if not 0 < self.box_fraction < 1:
            raise ConfigError(f"semi.box_fraction: expected (0, 1), got {self.box_fraction}")


@dataclass(frozen=True)
class ValidationConfig:
    thresholds: tuple[float, ...] = (0.5,)
    ignore_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        object.__setattr__(self, "ignore_ids", tuple(int(i) for i in self.ignore_ids))
        if not self.thresholds or any(not 0 < t < 1 for t in self.thresholds):
            raise ConfigError(
                f"validation.thresholds: expected values in (0, 1), got {self.thresholds}"
            )


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig = field(default_factory=TrainingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)

    def __post_init__(self) -> None:
        g = self.model.granularity
        if any(c % m for c, m in zip(self.training.crop, g, strict=True)):
            raise ConfigError(
                f"training.crop: {list(self.training.crop)} must be a multiple of the model "
                f"granularity {list(g)}"
            )
        bad = [c for c in self.data.mask_channels if not 0 <= c < self.model.out_channels]
        if bad:
            raise ConfigError(
                f"data.mask_channels: {bad} outside 0..{self.model.out_channels - 1} (offsets)"
            )
        if self.training.lsd_sigma is not None and self.semi.method != "supervised":
            raise ConfigError(
                "training.lsd_sigma: local shape descriptors are a supervised auxiliary target; "
                f"set it to null for semi.method {self.semi.method!r}"
            )
        if self.training.loader_workers and self.semi.method != "supervised":
            raise ConfigError(
                "training.loader_workers: worker processes make supervised batches only; "
                f"set it to 0 for semi.method {self.semi.method!r}"
            )

    def inputs(self) -> list[str]:
        """Every file the run reads (volumes, the checkpoint it starts from)."""
        paths = [self.data.raw, self.data.labels, self.training.init_from]
        thick = self.data.thick_sections
        paths += [thick.raw, thick.labels] if thick else []
        paths += [p for e in self.data.extra for p in (e.raw, e.labels)]
        return [p for p in paths if p] + [u.raw for u in self.semi.unlabeled]

    def to_dict(self) -> dict[str, Any]:
        thick = self.data.thick_sections
        return {
            "model": self.model.to_dict(),
            "data": _plain(asdict(self.data))
            | {"rois": [[list(r) for r in box] for box in self.data.rois or ()] or None}
            | {"thick_sections": _plain(asdict(thick)) if thick else None}
            | {"extra": [_plain(asdict(e)) for e in self.data.extra]},
            "training": _plain(asdict(self.training)),
            "augment": asdict(self.augment),
            "validation": _plain(asdict(self.validation)),
            "semi": _plain(asdict(self.semi))
            | {"unlabeled": [_plain(asdict(u)) for u in self.semi.unlabeled]},
        }


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _section(cls: type, raw: Any, name: str, base: Path | None = None) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(raw).__name__}")
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}")
    if cls is SemiConfig and isinstance(raw.get("unlabeled"), list):
        resolved = []
        for item in raw["unlabeled"]:
            if isinstance(item, str):
                item = resolve_volume_path(item, base)
            elif isinstance(item, dict) and "raw" in item:
                item = item | {"raw": resolve_volume_path(str(item["raw"]), base)}
            resolved.append(item)
        raw = raw | {"unlabeled": tuple(resolved)}
    if cls is TrainingConfig and raw.get("init_from"):
        path = Path(os.path.expandvars(str(raw["init_from"])))
        if base is not None and not path.is_absolute():
            path = (base / path).resolve()
        raw = raw | {"init_from": str(path)}
    if cls is DataConfig:
        for key in ("raw", "labels"):
            if key not in raw:
                raise ConfigError(f"data.{key}: required (FILE:DATASET of the labelled volume)")
            raw = raw | {key: resolve_volume_path(str(raw[key]), base)}
        if isinstance(raw.get("rois"), str):
            path = Path(os.path.expandvars(raw["rois"]))
            if base is not None and not path.is_absolute():
                path = (base / path).resolve()
            raw = raw | {"rois": read_rois_json(path)}
        thick = raw.get("thick_sections")
        if isinstance(thick, dict):
            for key in ("raw", "labels"):
                if key not in thick:
                    raise ConfigError(f"data.thick_sections.{key}: required (FILE:DATASET)")
                thick = thick | {key: resolve_volume_path(str(thick[key]), base)}
            raw = raw | {"thick_sections": thick}
        if isinstance(raw.get("extra"), list):
            resolved = []
            for i, item in enumerate(raw["extra"]):
                if not isinstance(item, dict) or not {"raw", "labels"} <= set(item):
                    raise ConfigError(f"data.extra[{i}]: expected a mapping with raw and labels")
                resolved.append(
                    item | {k: resolve_volume_path(str(item[k]), base) for k in ("raw", "labels")}
                )
            raw = raw | {"extra": tuple(resolved)}
    try:
        return cls(**raw)
    except TypeError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def resolve_volume_path(spec: str, base: Path | None) -> str:
    """Expand ``$VARS`` and make a relative file path relative to the config file's folder."""
    spec = os.path.expandvars(spec)
    path, sep, dataset = spec.partition(":")
    if base is not None and not Path(path).is_absolute():
        path = str((base / path).resolve())
    return f"{path}{sep}{dataset}"


def config_from_dict(raw: dict[str, Any], base: Path | None = None) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a mapping with model, data, training sections")
    allowed = {f.name for f in fields(Config)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"config: unknown section(s) {', '.join(unknown)}")
    if "data" not in raw:
        raise ConfigError("data: required section (raw, labels, z ranges)")
    model_raw = raw.get("model") or {}
    if not isinstance(model_raw, dict):
        raise ConfigError("model: expected a mapping")
    if model_raw.get("name", "unet3d") != "unet3d":
        raise ConfigError(f"model.name: unknown model {model_raw['name']!r} (known: unet3d)")
    try:
        model = ModelConfig.from_dict(model_raw)
    except TypeError as exc:
        raise ConfigError(f"model: {exc}") from None
    return Config(
        model=model,
        data=_section(DataConfig, raw["data"], "data", base),
        training=_section(TrainingConfig, raw.get("training"), "training", base),
        augment=_section(AugmentConfig, raw.get("augment"), "augment"),
        validation=_section(ValidationConfig, raw.get("validation"), "validation"),
        semi=_section(SemiConfig, raw.get("semi"), "semi", base),
    )


def load_config(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read a YAML config; ``overrides`` (section → key → value) come from the CLI."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None
    for section, values in (overrides or {}).items():
        if not isinstance(raw.get(section) or {}, dict):
            raise ConfigError(f"{section}: expected a mapping")
        raw[section] = (raw.get(section) or {}) | values
    return config_from_dict(raw, base=path.resolve().parent)
