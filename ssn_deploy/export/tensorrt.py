"""ONNX → TensorRT engines, with optimisation profiles, cached per GPU compute capability.

A TensorRT engine is compiled for one GPU architecture and one TensorRT version: an engine
built on an H100 does not load on an A100, nor under another TensorRT release. So engines are
never shipped; they are built on the machine that runs them, cached under
``root / "sm_XY" /`` and keyed by the ONNX file's sha256, the optimisation profile (the range
of input shapes the engine accepts), the precision and the TensorRT version. A cache hit skips
a build that takes minutes.

Every engine ``X.plan`` has a sidecar ``X.plan.json`` carrying the ONNX model's
``ssn_deploy.*`` metadata (the :class:`~ssn_deploy.models.spec.ModelSpec`), the profile, the
precision, the capability and the TensorRT version, because a serialized engine has no room for
them. The engine is written first and the sidecar last, each atomically, so an interrupted
build never looks complete.

TensorRT is optional (NVIDIA GPUs only; wheels come from NVIDIA's index) and imported lazily:
everything here but :func:`build_engine` works without it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssn_deploy.errors import (
    ConfigError,
    InputNotFoundError,
    InvalidInputError,
)
from ssn_deploy.models.spec import METADATA_PREFIX, ModelSpec

log = logging.getLogger(__name__)

Shape5 = tuple[int, int, int, int, int]
Builder = Callable[[Path, "Profile", bool], bytes]

DEFAULT_WORKSPACE_BYTES = 4 << 30
SIDECAR_FORMAT = "ssn-deploy/tensorrt-engine-v1"
_CAPABILITY = re.compile(r"^sm_\d+$")
_SIDECAR_KEYS = ("key", "metadata", "profile", "fp16", "capability", "tensorrt_version")


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or a one-line :class:`ConfigError` saying how to get it."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: wheel present, CUDA/TensorRT libs missing
        raise ConfigError(
            f"TensorRT is not available ({type(exc).__name__}: {exc}); it is an optional "
            "dependency that needs an NVIDIA GPU: pip install tensorrt (from NVIDIA's package "
            "index), or use the onnxruntime or torch backend"
        ) from None
    return tensorrt


def _shape5(values: Sequence[Any], what: str) -> Shape5:
    try:
        shape = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 5:
        raise InvalidInputError(f"profile {what}: expected 5 integers N,1,Z,Y,X, got {values!r}")
    return shape  # type: ignore[return-value]


@dataclass(frozen=True)
class Profile:
    """The input shapes an engine accepts: ``min`` ≤ shape ≤ ``max``, tuned for ``opt``.

    Shapes are ``(N, 1, Z, Y, X)``. TensorRT rejects inputs outside the profile, so the
    profile is recorded with the engine and checked before every batch.
    """

    min: Shape5
    opt: Shape5
    max: Shape5

    def __post_init__(self) -> None:
        for name in ("min", "opt", "max"):
            object.__setattr__(self, name, _shape5(getattr(self, name), name))

    def validate(self, spec: ModelSpec) -> Profile:
        """Raise :class:`InvalidInputError` unless every shape is a valid model input."""
        g = spec.granularity
        for name in ("min", "opt", "max"):
            shape = getattr(self, name)
            if shape[0] < 1:
                raise InvalidInputError(f"profile {name} shape {shape}: batch size must be >= 1")
            if shape[1] != 1:
                raise InvalidInputError(
                    f"profile {name} shape {shape}: the model takes 1 input channel, got {shape[1]}"
                )
            if any(s < 1 or s % m for s, m in zip(shape[2:], g, strict=True)):
                raise InvalidInputError(
                    f"profile {name} shape {shape}: Z,Y,X must be positive multiples of the "
                    f"model's granularity {g}"
                )
        for low, high in (("min", "opt"), ("opt", "max")):
            a, b = getattr(self, low), getattr(self, high)
            if any(x > y for x, y in zip(a, b, strict=True)):
                raise InvalidInputError(
                    f"profile {low} shape {a} exceeds {high} shape {b}; "
                    "need min <= opt <= max per axis"
                )
        return self

    def contains(self, shape: Sequence[int]) -> bool:
        """Whether an input of ``shape`` lies within ``min`` .. ``max`` on every axis."""
        shape = tuple(shape)
        return len(shape) == 5 and all(
            lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max, strict=True)
        )

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Profile:
        try:
            return cls(min=values["min"], opt=values["opt"], max=values["max"])
        except (KeyError, TypeError):
            raise InvalidInputError(
                f"profile: expected {{'min', 'opt', 'max'}} shapes, got {values!r}"
            ) from None

    def __str__(self) -> str:
        return f"min {self.min}, opt {self.opt}, max {self.max}"


def profile_for(spec: ModelSpec, patch_shape: Sequence[int], max_batch: int = 1) -> Profile:
    """A profile tuned for ``max_batch`` patches of ``patch_shape`` that also accepts any
    smaller valid input (down to one patch of the model's granularity), e.g. the last, partial
    batch of a volume."""
    patch = tuple(int(p) for p in patch_shape)
    g = spec.granularity
    if len(patch) != 3 or any(p < 1 or p % m for p, m in zip(patch, g, strict=True)):
        raise InvalidInputError(
            f"patch shape {tuple(patch_shape)}: expected Z,Y,X positive multiples of the model's "
            f"granularity {g}"
        )
    if max_batch < 1:
        raise InvalidInputError(f"batch size must be >= 1, got {max_batch}")
    top = (max_batch, 1, *patch)
    return Profile(min=(1, 1, *g), opt=top, max=top).validate(spec)


def compute_capability(device: int = 0) -> str:
    """``"sm_XY"`` of CUDA ``device`` (engines only run on the architecture they were built for)."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            "TensorRT needs an NVIDIA GPU, but torch sees no CUDA device; "
            "use the onnxruntime or torch backend"
        )
    count = torch.cuda.device_count()
    if not 0 <= device < count:
        raise ConfigError(f"CUDA device {device} does not exist (torch sees {count})")
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def cache_key(
    onnx_sha256: str, profile: Profile, fp16: bool, tensorrt_version: str, capability: str
) -> str:
    """16 hex digits of the sha256 of everything that determines an engine."""
    canonical = json.dumps(
        {
            "onnx_sha256": onnx_sha256,
            "profile": profile.to_dict(),
            "fp16": bool(fp16),
            "tensorrt_version": tensorrt_version,
            "capability": capability,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def onnx_metadata(onnx_path: Path) -> dict[str, str]:
    """The ``ssn_deploy.*`` ``metadata_props`` of an ONNX file (weights are not loaded)."""
    import onnx

    if not onnx_path.is_file():
        raise InputNotFoundError(f"ONNX model not found: {onnx_path}")
    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError
        raise InvalidInputError(f"{onnx_path}: not a readable ONNX model ({exc})") from None
    return {p.key: p.value for p in proto.metadata_props if p.key.startswith(METADATA_PREFIX)}


def _check_capability(capability: str) -> str:
    if not _CAPABILITY.match(capability):  # it names a cache folder
        raise ConfigError(f"compute capability must look like 'sm_90', got {capability!r}")
    return capability


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a unique temporary name beside ``path``, then rename over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class _BuildPlan:
    """Everything that determines an engine, checked, with its cache key."""

    onnx_path: Path
    profile: Profile
    fp16: bool
    metadata: Mapping[str, str]
    onnx_sha256: str
    capability: str
    tensorrt_version: str
    key: str


def _build_and_write(plan: _BuildPlan, out_path: Path, builder: Builder) -> Path:
    """Build, then write the engine and, last, its sidecar (so a crash never looks complete)."""
    data = bytes(builder(plan.onnx_path, plan.profile, plan.fp16))
    if not data:
        raise ConfigError(f"TensorRT produced an empty engine for {plan.onnx_path}")
    sidecar = {
        "format": SIDECAR_FORMAT,
        "key": plan.key,
        "metadata": dict(plan.metadata),
        "profile": plan.profile.to_dict(),
        "fp16": bool(plan.fp16),
        "precision": "fp16" if plan.fp16 else "fp32",
        "capability": plan.capability,
        "tensorrt_version": plan.tensorrt_version,
        "onnx_path": str(plan.onnx_path.resolve()),
        "onnx_sha256": plan.onnx_sha256,
        "engine_bytes": len(data),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sidecar_path(out_path).unlink(missing_ok=True)  # an old sidecar must not describe new bytes
    _atomic_write(out_path, data)
    _atomic_write(sidecar_path(out_path), (json.dumps(sidecar, indent=2) + "\n").encode())
    log.info(
        "wrote TensorRT engine %s (%s, %s, %d bytes)",
        out_path,
        plan.capability,
        plan.profile,
        len(data),
    )
    return out_path


def _prepare(
    onnx_path: str | Path,
    profile: Profile,
    fp16: bool,
    capability: str | None,
    tensorrt_version: str | None,
) -> _BuildPlan:
    """Check the model and profile; fill in capability and version; compute the cache key."""
    onnx_path = Path(onnx_path)
    metadata = onnx_metadata(onnx_path)
    profile.validate(ModelSpec.from_metadata(metadata, str(onnx_path)))
    if tensorrt_version is None:
        tensorrt_version = str(require_tensorrt().__version__)
    capability = _check_capability(compute_capability() if capability is None else capability)
    sha = file_sha256(onnx_path)
    key = cache_key(sha, profile, fp16, tensorrt_version, capability)
    return _BuildPlan(onnx_path, profile, fp16, metadata, sha, capability, tensorrt_version, key)


class EngineCache:
    """Engines under ``root / capability / f"{onnx_stem}-{key}.plan"``, built on a miss."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def engine_path(self, onnx_path: str | Path, capability: str, key: str) -> Path:
        return self.root / _check_capability(capability) / f"{Path(onnx_path).stem}-{key}.plan"

    def get_or_build(
        self,
        onnx_path: str | Path,
        profile: Profile,
        *,
        fp16: bool,
        capability: str | None = None,
        tensorrt_version: str | None = None,
        builder: Builder | None = None,
    ) -> Path:
        """The cached engine for these inputs, building it first if absent or damaged.

        ``capability`` and ``tensorrt_version`` default to this GPU's and the installed
        TensorRT's; ``builder`` (default :func:`build_engine`) turns ONNX into engine bytes.
        """
        plan = _prepare(onnx_path, profile, fp16, capability, tensorrt_version)
        key = plan.key
        engine = self.engine_path(plan.onnx_path, plan.capability, key)
        sidecar = sidecar_path(engine)
        if engine.is_file() and sidecar.is_file():
            try:
                recorded = json.loads(sidecar.read_text())
                complete = (
                    recorded["key"] == key
                    and recorded.get("engine_bytes", engine.stat().st_size) == engine.stat().st_size
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning(
                    "rebuilding %s: its sidecar %s is unreadable (%s)", engine, sidecar, exc
                )
            else:
                if complete:
                    log.info("using cached engine %s", engine)
                    return engine
                log.warning("rebuilding %s: its sidecar does not match the engine", engine)
        log.info(
            "building TensorRT engine for %s (%s, fp16=%s); this can take minutes",
            plan.onnx_path,
            profile,
            fp16,
        )
        return _build_and_write(plan, engine, builder or build_engine)


def read_sidecar(engine_path: str | Path) -> dict[str, Any]:
    """The sidecar of an engine; what the TensorRT backend needs besides the engine bytes."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise InputNotFoundError(f"TensorRT engine not found: {engine_path}")
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise InputNotFoundError(
            f"{engine_path} has no sidecar {path.name} (model spec, profile); build engines "
            "with ssn-deploy export --format tensorrt"
        )
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: unreadable engine sidecar ({exc})") from None
    if not isinstance(sidecar, dict):
        raise InvalidInputError(f"{path}: engine sidecar must be a JSON object")
    missing = [k for k in _SIDECAR_KEYS if k not in sidecar]
    if missing:
        raise InvalidInputError(f"{path}: engine sidecar lacks {', '.join(missing)}")
    if not isinstance(sidecar["metadata"], dict):
        raise InvalidInputError(f"{path}: engine sidecar 'metadata' must be a JSON object")
    return sidecar


def build_engine(
    onnx_path: str | Path,
    profile: Profile,
    fp16: bool,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> bytes:
    """Serialize a TensorRT 10 engine for the ONNX model, valid for inputs within ``profile``."""
    trt = require_tensorrt()
    onnx_path = Path(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    # the path lets the parser find external weights stored beside the model
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InvalidInputError(f"TensorRT cannot parse {onnx_path}: {errors or 'unknown error'}")
    if network.num_inputs != 1:
        raise InvalidInputError(
            f"{onnx_path}: expected one input tensor, the model has {network.num_inputs}"
        )
    input_name = network.get_input(0).name
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        if not getattr(builder, "platform_has_fast_fp16", True):
            log.warning("this GPU has no fast fp16; the fp16 engine may be slower than fp32")
        config.set_flag(trt.BuilderFlag.FP16)
    optimization_profile = builder.create_optimization_profile()
    optimization_profile.set_shape(input_name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(optimization_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConfigError(
            f"TensorRT could not build an engine for {onnx_path} ({profile}); see the TensorRT "
            "log above (too little GPU memory? try a smaller --patch-shape or --batch-size)"
        )
    return bytes(serialized)
