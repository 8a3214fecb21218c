"""ONNX → TensorRT: profiles, cache keys, the engine cache and the backend's error paths.

TensorRT and a GPU are absent on CI machines, so engines here come from an injected builder
(deterministic bytes); ``build_engine`` runs against a stand-in ``tensorrt`` module that
records the TensorRT 10 calls. The last test builds and runs a real engine where TensorRT and
a GPU exist.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import json
import logging
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from ssn_deploy.errors import (
    ConfigError,
    InputNotFoundError,
    InvalidInputError,
)
from ssn_deploy.export.onnx_export import export_onnx
from ssn_deploy.export.tensorrt import (
    EngineCache,
    Profile,
    build_engine,
    cache_key,
    compute_capability,
    file_sha256,
    profile_for,
    read_sidecar,
    require_tensorrt,
    sidecar_path,
)
from ssn_deploy.inference.tensorrt_backend import TensorRTPredictor
from ssn_deploy.models import ModelConfig, Normalization, build_model, save_checkpoint
from ssn_deploy.models.spec import ModelSpec

CONFIG = ModelConfig(filters=(4, 8, 8), poolings=((1, 2, 2), (2, 2, 2)), embed_kernel=(1, 3, 3))
GRANULARITY = (2, 4, 4)
SM, VERSION = "sm_90", "10.0.0"
PROFILE = Profile(min=(1, 1, 2, 4, 4), opt=(2, 1, 8, 32, 32), max=(2, 1, 8, 32, 32))
LOGGER = "ssn_deploy.export.tensorrt"


def _checkpoint(directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_model(CONFIG)
    model.train()
    with torch.no_grad():  # move BatchNorm statistics away from their defaults
        model(torch.randn(2, 1, 8, 32, 32))
    return save_checkpoint(
        directory / f"model{seed}.ckpt",
        model,
        normalization=Normalization(),
        voxel_size=(10, 10, 10),
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("ckpt")
    return _checkpoint(directory, 0), _checkpoint(directory, 1)


@pytest.fixture(scope="module")
def exported(checkpoints: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(checkpoints[0], tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture
def onnx_path(exported: Path, tmp_path: Path) -> Path:
    """A private copy, so tests may replace it."""
    return Path(shutil.copy(exported, tmp_path / "model.onnx"))


@pytest.fixture(scope="module")
def spec(exported: Path) -> ModelSpec:
    props = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    return ModelSpec.from_metadata(props, str(exported))


class CountingBuilder:
    """Stands in for build_engine: deterministic bytes from the ONNX content and options."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, Profile, bool]] = []

    def __call__(self, onnx_path: Path, profile: Profile, fp16: bool) -> bytes:
        self.calls.append((onnx_path, profile, fp16))
        digest = hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()
        return f"plan {digest} {profile} fp16={fp16}".encode()


def failing_builder(onnx_path: Path, profile: Profile, fp16: bool) -> bytes:
    raise ConfigError("TensorRT could not build an engine (simulated)")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# --- Profile -------------------------------------------------------------------------------


def test_spec_granularity_is_what_the_profiles_assume(spec: ModelSpec) -> None:
    assert spec.granularity == GRANULARITY


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        (Profile((1, 1, 2, 4, 4), (1, 1, 8, 30, 32), (1, 1, 8, 32, 32)), r"opt shape .*granular"),
        (Profile((1, 1, 0, 4, 4), (1, 1, 8, 32, 32), (1, 1, 8, 32, 32)), r"min shape .*positive"),
        (Profile((1, 1, 4, 8, 8), (1, 1, 2, 32, 32), (1, 1, 8, 32, 32)), r"min shape .* exceeds"),
        (Profile((1, 1, 2, 4, 4), (4, 1, 8, 32, 32), (2, 1, 8, 32, 32)), r"opt shape .* exceeds"),
        (Profile((1, 2, 2, 4, 4), (1, 2, 8, 32, 32), (1, 2, 8, 32, 32)), r"1 input channel"),
        (Profile((0, 1, 2, 4, 4), (1, 1, 8, 32, 32), (1, 1, 8, 32, 32)), r"batch size"),
    ],
)
def test_profile_validation_names_the_bad_shape(
    spec: ModelSpec, profile: Profile, message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        profile.validate(spec)


def test_profile_needs_five_integers() -> None:
    with pytest.raises(InvalidInputError, match="5 integers"):
        Profile((1, 8, 32, 32), (1, 1, 8, 32, 32), (1, 1, 8, 32, 32))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="5 integers"):
        Profile.from_dict({"min": "abc", "opt": [1, 1, 8, 32, 32], "max": [1, 1, 8, 32, 32]})
    with pytest.raises(InvalidInputError, match="min"):
        Profile.from_dict({"opt": [1, 1, 8, 32, 32]})


def test_profile_for_spans_one_granule_to_the_full_batch(spec: ModelSpec) -> None:
    profile = profile_for(spec, (8, 32, 32), max_batch=4)
    assert profile == Profile((1, 1, 2, 4, 4), (4, 1, 8, 32, 32), (4, 1, 8, 32, 32))
    assert profile.validate(spec) is profile
    assert profile.contains((4, 1, 8, 32, 32))
    assert profile.contains((1, 1, 2, 4, 4))
    assert profile.contains((3, 1, 6, 16, 28))
    assert not profile.contains((5, 1, 8, 32, 32))  # batch too large
    assert not profile.contains((1, 1, 8, 36, 32))  # patch too large
    assert not profile.contains((1, 1, 8, 32))  # wrong rank
    assert profile_for(spec, (2, 4, 4)).max == (1, 1, 2, 4, 4)


@pytest.mark.parametrize(
    ("patch", "batch", "message"),
    [((8, 30, 32), 1, "granularity"), ((8, 32), 1, "granularity"), ((8, 32, 32), 0, "batch")],
)
def test_profile_for_rejects_invalid_requests(
    spec: ModelSpec, patch: tuple[int, ...], batch: int, message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        profile_for(spec, patch, batch)


def test_profile_dict_round_trip_through_json() -> None:
    data = json.loads(json.dumps(PROFILE.to_dict()))
    assert data == {"min": [1, 1, 2, 4, 4], "opt": [2, 1, 8, 32, 32], "max": [2, 1, 8, 32, 32]}
    assert Profile.from_dict(data) == PROFILE
    assert Profile.from_dict(data).opt == (2, 1, 8, 32, 32)


# --- cache keys ----------------------------------------------------------------------------


def test_cache_key_is_stable_and_depends_on_every_input() -> None:
    base = ("a" * 64, PROFILE, False, VERSION, SM)
    key = cache_key(*base)
    assert key == cache_key("a" * 64, Profile.from_dict(PROFILE.to_dict()), False, VERSION, SM)
    assert len(key) == 16 and int(key, 16) >= 0
    other_profile = Profile(PROFILE.min, (1, 1, 8, 32, 32), PROFILE.max)
    variants = [
        ("b" * 64, PROFILE, False, VERSION, SM),
        ("a" * 64, other_profile, False, VERSION, SM),
        ("a" * 64, PROFILE, True, VERSION, SM),
        ("a" * 64, PROFILE, False, "10.1.0", SM),
        ("a" * 64, PROFILE, False, VERSION, "sm_89"),
    ]
    keys = {cache_key(*v) for v in variants}
    assert len(keys) == len(variants) and key not in keys


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * (3 << 20) + b"tail")  # spans several read chunks
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# --- EngineCache ---------------------------------------------------------------------------


def test_cache_builds_once_then_hits(
    onnx_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache, builder = EngineCache(tmp_path / "engines"), CountingBuilder()
    first = cache.get_or_build(
        onnx_path, PROFILE, fp16=False, capability=SM, tensorrt_version=VERSION, builder=builder
    )
    key = cache_key(file_sha256(onnx_path), PROFILE, False, VERSION, SM)
    assert first == tmp_path / "engines" / SM / f"model-{key}.plan"
    assert first.read_bytes() == CountingBuilder()(onnx_path, PROFILE, False)
    assert len(builder.calls) == 1 and builder.calls[0][1:] == (PROFILE, False)
    built = first.stat().st_mtime_ns

    with caplog.at_level(logging.INFO, logger=LOGGER):
        second = cache.get_or_build(
            onnx_path, PROFILE, fp16=False, capability=SM, tensorrt_version=VERSION, builder=builder
        )
    assert second == first and first.stat().st_mtime_ns == built
    assert len(builder.calls) == 1
    assert any("using cached engine" in r.getMessage() for r in caplog.records)
    assert _files(tmp_path / "engines") == [first, sidecar_path(first)]  # no temporary files


def test_cache_separates_capabilities_precisions_and_versions(
    onnx_path: Path, tmp_path: Path
) -> None:
    cache, builder = EngineCache(tmp_path), CountingBuilder()

    def get(capability: str = SM, fp16: bool = False, version: str = VERSION) -> Path:
        return cache.get_or_build(
            onnx_path,
            PROFILE,
            fp16=fp16,
            capability=capability,
            tensorrt_version=version,
            builder=builder,
        )

    engines = [get(), get(capability="sm_89"), get(fp16=True), get(version="10.1.0")]
    assert len(set(engines)) == 4 and len(builder.calls) == 4
    assert engines[1].parent == tmp_path / "sm_89" and engines[0].parent == tmp_path / SM
    assert read_sidecar(engines[1])["capability"] == "sm_89"
    assert read_sidecar(engines[2])["precision"] == "fp16" and read_sidecar(engines[2])["fp16"]
    assert read_sidecar(engines[3])["tensorrt_version"] == "10.1.0"
    assert [get(), get(capability="sm_89")] == engines[:2] and len(builder.calls) == 4


def test_cache_rebuilds_when_the_onnx_changes(
    onnx_path: Path, tmp_path: Path, checkpoints: tuple[Path, Path]
) -> None:
    cache, builder = EngineCache(tmp_path / "engines"), CountingBuilder()
    options: dict[str, Any] = dict(capability=SM, tensorrt_version=VERSION, builder=builder)
    old = cache.get_or_build(onnx_path, PROFILE, fp16=False, **options)
    old_sha = file_sha256(onnx_path)
    export_onnx(checkpoints[1], onnx_path, overwrite=True)  # other weights, same file name
    assert file_sha256(onnx_path) != old_sha
    new = cache.get_or_build(onnx_path, PROFILE, fp16=False, **options)
    assert new != old and len(builder.calls) == 2
    assert new.read_bytes() != old.read_bytes()
    assert read_sidecar(new)["onnx_sha256"] == file_sha256(onnx_path)
    assert read_sidecar(old)["onnx_sha256"] == old_sha


def test_sidecar_carries_the_model_spec_and_build_inputs(
    onnx_path: Path, tmp_path: Path, spec: ModelSpec
) -> None:
    engine = EngineCache(tmp_path).get_or_build(
        onnx_path,
        PROFILE,
        fp16=True,
        capability=SM,
        tensorrt_version=VERSION,
        builder=CountingBuilder(),
    )
    sidecar = read_sidecar(engine)
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert sidecar["metadata"] == {k: v for k, v in props.items() if k.startswith("ssn_deploy.")}
    assert "ssn_deploy.version" in sidecar["metadata"]
    assert ModelSpec.from_metadata(sidecar["metadata"], str(engine)) == spec
    assert Profile.from_dict(sidecar["profile"]) == PROFILE
    assert sidecar["fp16"] is True and sidecar["capability"] == SM
    assert sidecar["tensorrt_version"] == VERSION
    assert sidecar["onnx_path"] == str(onnx_path.resolve())
    assert sidecar["onnx_sha256"] == file_sha256(onnx_path)
    assert sidecar["key"] == cache_key(file_sha256(onnx_path), PROFILE, True, VERSION, SM)
    assert sidecar["engine_bytes"] == engine.stat().st_size
    assert sidecar["created"]


@pytest.mark.parametrize(
    "damage",
    ["garbage", "wrong key", "no sidecar", "truncated engine"],
)
def test_cache_rebuilds_a_damaged_entry(
    onnx_path: Path, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache, builder = EngineCache(tmp_path), CountingBuilder()
    options: dict[str, Any] = dict(capability=SM, tensorrt_version=VERSION, builder=builder)
    engine = cache.get_or_build(onnx_path, PROFILE, fp16=False, **options)
    good = engine.read_bytes()
    sidecar = sidecar_path(engine)
    if damage == "garbage":
        sidecar.write_text("{not json")
    elif damage == "wrong key":
        sidecar.write_text(json.dumps(json.loads(sidecar.read_text()) | {"key": "0" * 16}))
    elif damage == "no sidecar":  # a build killed between the engine and its sidecar
        sidecar.unlink()
    else:
        engine.write_bytes(good[:10])
    with caplog.at_level(logging.INFO, logger=LOGGER):
        again = cache.get_or_build(onnx_path, PROFILE, fp16=False, **options)
    assert again == engine and len(builder.calls) == 2
    assert engine.read_bytes() == good
    assert read_sidecar(engine)["key"] == cache_key(
        file_sha256(onnx_path), PROFILE, False, VERSION, SM
    )
    if damage == "garbage":
        assert any(r.levelno == logging.WARNING for r in caplog.records)
    assert not any("using cached engine" in r.getMessage() for r in caplog.records)


def test_failed_build_leaves_nothing_behind(onnx_path: Path, tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    with pytest.raises(ConfigError, match="simulated"):
        cache.get_or_build(
            onnx_path,
            PROFILE,
            fp16=False,
            capability=SM,
            tensorrt_version=VERSION,
            builder=failing_builder,
        )
    assert not (tmp_path / "engines").exists() or _files(tmp_path / "engines") == []


def test_cache_checks_the_profile_and_capability_before_building(
    onnx_path: Path, tmp_path: Path
) -> None:
    cache, builder = EngineCache(tmp_path), CountingBuilder()
    bad = Profile((1, 1, 2, 4, 4), (1, 1, 8, 30, 32), (1, 1, 8, 32, 32))
    with pytest.raises(InvalidInputError, match="granularity"):
        cache.get_or_build(
            onnx_path, bad, fp16=False, capability=SM, tensorrt_version=VERSION, builder=builder
        )
    with pytest.raises(ConfigError, match="sm_90"):
        cache.get_or_build(
            onnx_path,
            PROFILE,
            fp16=False,
            capability="../x",
            tensorrt_version=VERSION,
            builder=builder,
        )
    with pytest.raises(InputNotFoundError, match="not found"):
        cache.get_or_build(
            tmp_path / "missing.onnx",
            PROFILE,
            fp16=False,
            capability=SM,
            tensorrt_version=VERSION,
            builder=builder,
        )
    assert builder.calls == [] and _files(tmp_path) == [onnx_path]


def test_read_sidecar_errors(onnx_path: Path, tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="engine not found"):
        read_sidecar(tmp_path / "missing.plan")
    lone = tmp_path / "lone.plan"
    lone.write_bytes(b"plan")
    with pytest.raises(InputNotFoundError, match="no sidecar"):
        read_sidecar(lone)
    sidecar_path(lone).write_text("[1, 2")
    with pytest.raises(InvalidInputError, match="unreadable"):
        read_sidecar(lone)
    sidecar_path(lone).write_text(json.dumps({"key": "k", "metadata": {}}))
    with pytest.raises(InvalidInputError, match="lacks profile"):
        read_sidecar(lone)


# --- without TensorRT or a GPU -------------------------------------------------------------


def test_require_tensorrt_explains_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ConfigError) as info:
        require_tensorrt()
    message = str(info.value)
    assert "\n" not in message
    for words in ("optional", "NVIDIA GPU", "pip install tensorrt", "onnxruntime", "torch"):
        assert words in message


class _BrokenLibraries(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A tensorrt wheel whose shared libraries are missing: importing it raises OSError."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name == "tensorrt":
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        raise OSError("libnvinfer.so.10: cannot open shared object file")


def test_require_tensorrt_turns_missing_libraries_into_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenLibraries(), *sys.meta_path])
    with pytest.raises(ConfigError, match=r"libnvinfer\.so\.10.*pip install tensorrt"):
        require_tensorrt()


def test_default_builder_without_tensorrt_is_a_config_error(
    onnx_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    cache = EngineCache(tmp_path / "engines")
    with pytest.raises(ConfigError, match="pip install tensorrt"):
        cache.get_or_build(onnx_path, PROFILE, fp16=False, capability=SM)
    with pytest.raises(ConfigError, match="pip install tensorrt"):
        cache.get_or_build(onnx_path, PROFILE, fp16=False, capability=SM, tensorrt_version=VERSION)
    assert not (tmp_path / "engines").exists() or _files(tmp_path / "engines") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_compute_capability_without_a_gpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA device"):
        compute_capability()


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int] = (8, 9)) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_compute_capability_names_the_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gpu(monkeypatch, (9, 0))
    assert compute_capability() == "sm_90"
    with pytest.raises(ConfigError, match="device 1 does not exist"):
        compute_capability(1)


@pytest.fixture
def fake_engine(onnx_path: Path, tmp_path: Path) -> Path:
    """An engine file + sidecar as the cache leaves them (the bytes are not a real plan)."""
    return EngineCache(tmp_path / "engines").get_or_build(
        onnx_path,
        PROFILE,
        fp16=True,
        capability=SM,
        tensorrt_version=VERSION,
        builder=CountingBuilder(),
    )


def _stub_tensorrt(monkeypatch: pytest.MonkeyPatch, version: str = VERSION) -> None:
    """An importable ``tensorrt`` whose use beyond the version check would fail loudly."""
    module = types.ModuleType("tensorrt")
    module.__version__ = version  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", module)


def test_predictor_without_tensorrt_is_a_config_error(
    fake_engine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ConfigError, match="pip install tensorrt"):
        TensorRTPredictor(fake_engine)


def test_predictor_without_cuda_is_a_config_error(
    fake_engine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _stub_tensorrt(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"needs an NVIDIA GPU.*no CUDA device"):
        TensorRTPredictor(fake_engine)


def test_predictor_refuses_an_engine_for_another_gpu_or_tensorrt(
    fake_engine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _stub_tensorrt(monkeypatch)
    _fake_gpu(monkeypatch, (8, 9))
    with pytest.raises(ConfigError, match="built for sm_90, this GPU is sm_89; rebuild it with"):
        TensorRTPredictor(fake_engine)
    _fake_gpu(monkeypatch, (9, 0))
    _stub_tensorrt(monkeypatch, "10.3.0")
    with pytest.raises(
        ConfigError, match=r"built with TensorRT 10\.0\.0, this is TensorRT 10\.3\.0"
    ):
        TensorRTPredictor(fake_engine)


def test_predictor_needs_the_sidecar(tmp_path: Path) -> None:
    engine = tmp_path / "bare.plan"
    engine.write_bytes(b"plan")
    with pytest.raises(InputNotFoundError, match="no sidecar"):
        TensorRTPredictor(engine)


# --- build_engine against a stand-in for the TensorRT 10 Python API ------------------------


def _recording_tensorrt(
    *, parse_ok: bool = True, build_ok: bool = True, fast_fp16: bool = True
) -> tuple[types.ModuleType, dict[str, Any]]:
    calls: dict[str, Any] = {"flags": [], "profiles": []}
    trt = types.ModuleType("tensorrt")
    trt.__version__ = VERSION  # type: ignore[attr-defined]

    class Logger:
        WARNING = "warning"

        def __init__(self, severity: str) -> None:
            calls["severity"] = severity

    class Network:
        num_inputs = 1

        def get_input(self, index: int) -> Any:
            return types.SimpleNamespace(name="raw")

    class OnnxParser:
        num_errors = 0 if parse_ok else 2

        def __init__(self, network: Network, logger: Logger) -> None:
            pass

        def parse(self, data: bytes, path: str) -> bool:
            calls["parsed"] = (hashlib.sha256(data).hexdigest(), path)
            return parse_ok

        def get_error(self, index: int) -> str:
            return f"error {index}: unsupported node"

    class OptimizationProfile:
        def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:
            calls["shape"] = (name, tuple(min), tuple(opt), tuple(max))

    class BuilderConfig:
        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            calls["pool"] = (pool, size)

        def set_flag(self, flag: str) -> None:
            calls["flags"].append(flag)

        def add_optimization_profile(self, profile: OptimizationProfile) -> int:
            calls["profiles"].append(profile)
            return 0

    class Builder:
        platform_has_fast_fp16 = fast_fp16

        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            calls["network_flags"] = flags
            return Network()

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig()

        def create_optimization_profile(self) -> OptimizationProfile:
            return OptimizationProfile()

        def build_serialized_network(self, network: Network, config: BuilderConfig) -> Any:
            return memoryview(b"serialized plan") if build_ok else None

    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.Builder = Builder  # type: ignore[attr-defined]
    trt.OnnxParser = OnnxParser  # type: ignore[attr-defined]
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")  # type: ignore[attr-defined]
    trt.BuilderFlag = types.SimpleNamespace(FP16="fp16")  # type: ignore[attr-defined]
    return trt, calls


def test_build_engine_sets_the_profile_precision_and_workspace(
    onnx_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    trt, calls = _recording_tensorrt(fast_fp16=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        plan = build_engine(onnx_path, PROFILE, True, workspace_bytes=1 << 30)
    assert plan == b"serialized plan" and isinstance(plan, bytes)
    assert calls["network_flags"] == 0 and calls["severity"] == "warning"
    assert calls["parsed"] == (file_sha256(onnx_path), str(onnx_path))
    assert calls["shape"] == ("raw", PROFILE.min, PROFILE.opt, PROFILE.max)
    assert calls["pool"] == ("workspace", 1 << 30)
    assert calls["flags"] == ["fp16"] and len(calls["profiles"]) == 1
    assert any("no fast fp16" in r.getMessage() for r in caplog.records)

    trt, calls = _recording_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    build_engine(onnx_path, PROFILE, False)
    assert calls["flags"] == [] and calls["pool"] == ("workspace", 4 << 30)


def test_build_engine_reports_parser_and_builder_failures(
    onnx_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trt, _ = _recording_tensorrt(parse_ok=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(InvalidInputError, match=r"cannot parse .*error 0.*; error 1: unsupported"):
        build_engine(onnx_path, PROFILE, False)
    trt, _ = _recording_tensorrt(build_ok=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(ConfigError, match="TensorRT could not build an engine"):
        build_engine(onnx_path, PROFILE, False)


# --- the real thing, where TensorRT and a GPU exist ----------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_engine_matches_onnxruntime(onnx_path: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    ort = pytest.importorskip("onnxruntime")
    cache = EngineCache(tmp_path / "engines")
    engine = cache.get_or_build(onnx_path, PROFILE, fp16=False)
    assert cache.get_or_build(onnx_path, PROFILE, fp16=False) == engine
    predictor = TensorRTPredictor(engine)
    assert predictor.provenance["backend"] == "tensorrt"
    assert predictor.provenance["precision"] == "fp32"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for shape in [(2, 1, 8, 32, 32), (1, 1, 4, 16, 28)]:
        x = rng.standard_normal(shape).astype(np.float32)
        (expected,) = session.run(None, {"raw": x})
        np.testing.assert_allclose(predictor.predict(x), expected, atol=2e-2)
    with pytest.raises(InvalidInputError, match="--patch-shape"):
        predictor.predict(np.zeros((1, 1, 8, 36, 32), np.float32))
