"""Predictors and the blockwise affinity engine on a real FIB-SEM crop (fib_medulla_250).

The model is a tiny U-Net from ``ssn_deploy.models`` (filters 2, 4; one (2,2,2) pooling) with
randomised weights and BatchNorm statistics, so its affinities vary over [0, 1] like a trained
model's do; seams and resume are properties of the engine, not of the weights.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import onnx
import pytest
import torch
import zarr

from ssn_deploy.errors import (
    ConfigError,
    CorruptDataError,
    InvalidInputError,
    OutputExistsError,
    SsnDeployError,
    VoxelSizeError,
)
from ssn_deploy.geometry import Box
from ssn_deploy.inference import (
    ModelSpec,
    PatchGrid,
    Predictor,
    load_predictor,
    predict_affinities,
    predict_block,
)
from ssn_deploy.inference import engine as engine_module
from ssn_deploy.inference.block import reflect_read
from ssn_deploy.models import (
    ModelConfig,
    Normalization,
    UNet3d,
    load_checkpoint,
    save_checkpoint,
)
from ssn_deploy.volumes import create_volume, open_volume
from tests.conftest import sha256

CONFIG = ModelConfig(filters=(2, 4), poolings=((2, 2, 2),), embed_kernel=(1, 3, 3))
PATCH = (32, 64, 64)  # context (9, 15, 15) → core 14×34×34
CROP = Box((100, 90, 80), (64, 64, 64))


def make_model(raw: np.ndarray, seed: int = 0) -> UNet3d:
    """Random weights and BatchNorm statistics; the head is calibrated on ``raw`` so that the
    affinities spread over [0, 1] (logits ≈ N(0, 2²) per channel)."""
    torch.manual_seed(seed)
    model = UNet3d(CONFIG)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.3, 1.0)
        model.eval()
        logits = model.forward_logits(torch.from_numpy(Normalization()(raw))[None, None])
        mean, std = logits.mean(dim=(0, 2, 3, 4)), logits.std(dim=(0, 2, 3, 4))
        model.head.weight.mul_((2 / std)[:, None, None, None, None])
        model.head.bias.sub_(mean).mul_(2 / std)
    return model


@pytest.fixture(scope="module")
def raw_crop(medulla_250: Path) -> np.ndarray:
    with h5py.File(medulla_250, "r") as f:
        return f["volumes/raw"][CROP.slices]


@pytest.fixture(scope="module")
def checkpoint(raw_crop: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.ckpt"
    model = make_model(raw_crop[:32])
    return save_checkpoint(
        path, model, normalization=Normalization(), voxel_size=(10.0, 10.0, 10.0)
    )


def write_raw(path: Path, data: np.ndarray, chunks=(32, 32, 32)) -> str:
    spec = str(path)
    vol = create_volume(spec, data.shape, data.dtype, chunks=chunks, voxel_size=(10, 10, 10))
    vol[...] = data
    return spec


@pytest.fixture
def raw_zarr(raw_crop: np.ndarray, tmp_path: Path) -> str:
    return write_raw(tmp_path / "raw.zarr", raw_crop)


def factory(checkpoint: Path, **options):
    return functools.partial(load_predictor, str(checkpoint), "torch", threads=1, **options)


BUILDS: list[str] = []


def counted_load_predictor(path: str) -> Predictor:
    """``load_predictor`` that records each build (to prove one build per worker thread)."""
    BUILDS.append(path)
    return load_predictor(path, "torch", threads=1)


def run(raw: str, out: Path, predictor_factory, **options):
    kwargs = dict(block_shape=(64, 64, 64), patch_shape=PATCH, progress=False) | options
    return predict_affinities(raw, str(out), predictor_factory, **kwargs)


# --- pure geometry ------------------------------------------------------------------------------


def test_reflect_read_matches_numpy_pad(raw_crop: np.ndarray, tmp_path: Path) -> None:
    data = raw_crop[:20, :24, :28]
    vol = open_volume(write_raw(tmp_path / "r.zarr", data, chunks=(8, 8, 8)))
    padded = np.pad(data, 30, mode="reflect")  # wider than the volume: reflects repeatedly
    for box in [Box((-30, -5, 3), (50, 20, 20)), Box((5, 10, -30), (45, 44, 60))]:
        expected = padded[box.shift((30, 30, 30)).slices]
        np.testing.assert_array_equal(reflect_read(vol, box), expected)


def test_patch_grid_covers_any_box_from_a_global_lattice() -> None:
    grid = PatchGrid.plan(PATCH, (9, 15, 15), 2, granularity=(2, 2, 2))
    assert grid.core_shape == (14, 34, 34) and grid.stride == (12, 32, 32)
    for box in [Box((0, 0, 0), (64, 64, 64)), Box((13, 31, 5), (7, 40, 1))]:
        cover = np.zeros(box.shape, int)
        for core in grid.cores_for(box):
            assert all(o % s == 0 for o, s in zip(core.offset, grid.stride, strict=True))
            cover[core.intersect(box).relative_to(box).slices] += 1
        assert cover.min() >= 1
    assert grid.window().min() > 0.002  # never weighs a voxel zero
    with pytest.raises(ConfigError, match="multiples of"):
        PatchGrid.plan((31, 64, 64), 9, 0, (2, 2, 2))
    with pytest.raises(ConfigError, match="leaves no room"):
        PatchGrid.plan((16, 64, 64), 9, 0, (2, 2, 2))


# --- the engine ---------------------------------------------------------------------------------


def test_small_blocks_equal_one_block(checkpoint: Path, raw_zarr: str, tmp_path: Path) -> None:
    """A margin below the context makes overlapping patches disagree, so this also proves the
    blend is the same in every block, not just that patches are translation-equivariant."""
    before = sha256(Path(raw_zarr))
    options = dict(
        patch_shape=(24, 48, 48), margin=(3, 6, 6), overlap=2, out_dtype="float32", batch_size=4
    )
    whole = run(raw_zarr, tmp_path / "one.zarr", factory(checkpoint), **options)
    BUILDS.clear()
    blocks = run(
        raw_zarr,
        tmp_path / "blocks.zarr",
        functools.partial(counted_load_predictor, str(checkpoint)),
        block_shape=(40, 48, 36),  # 8 blocks, not aligned with the patch lattice on purpose
        workers=2,
        **options,
    )
    assert len(BUILDS) <= 3  # the caller's thread and each of the 2 worker threads
    a, b = whole.read(), blocks.read()
    assert a.shape == (3, 64, 64, 64) and a.std() > 0.1  # real, varied affinities
    assert np.abs(a - b).max() < 1e-5
    assert blocks.chunks == (3, 40, 48, 36)
    assert blocks.voxel_size == (10.0, 10.0, 10.0)
    meta = blocks.attrs["ssn_deploy"]
    assert meta["offsets"] == [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
    assert meta["settings"]["block_shape"] == [40, 48, 36]
    assert meta["predictor"]["backend"] == "torch"
    assert sha256(Path(raw_zarr)) == before  # the input is never modified


def test_overlap_changes_nothing_when_margin_covers_context(
    checkpoint: Path, raw_zarr: str
) -> None:
    """Why the default overlap is 0: cores cropped by the context are exact already."""
    predictor = load_predictor(str(checkpoint), "torch", threads=1)
    raw, box = open_volume(raw_zarr), Box((20, 20, 20), (16, 32, 32))
    results = [
        predict_block(raw, box, predictor, PatchGrid.plan(PATCH, CONFIG.context, overlap, (2,) * 3))
        for overlap in (0, 2)
    ]
    assert results[0].std() > 0.1
    np.testing.assert_allclose(results[0], results[1], atol=1e-5)


class FailingAfter:
    """A predictor that dies on its ``calls``-th batch, like a worker killed mid-run."""

    def __init__(self, checkpoint: str, calls: int) -> None:
        self._inner = load_predictor(checkpoint, "torch", threads=1)
        self._left = calls

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self._left -= 1
        if self._left < 0:
            raise RuntimeError("killed")
        return self._inner.predict(batch)


def test_resume_skips_finished_blocks(
    checkpoint: Path, raw_crop: np.ndarray, tmp_path: Path, monkeypatch, caplog
) -> None:
    raw = write_raw(tmp_path / "raw.zarr", raw_crop[:28])
    options = dict(block_shape=(14, 32, 32), batch_size=16, max_in_flight=1)  # 8 blocks
    reference = run(raw, tmp_path / "ref.zarr", factory(checkpoint), **options).read()

    out = tmp_path / "aff.zarr"
    dying = functools.partial(FailingAfter, str(checkpoint), calls=3)  # one batch per block
    with pytest.raises(RuntimeError, match="killed"):
        run(raw, out, dying, **options)
    with pytest.raises(OutputExistsError):
        run(raw, out, factory(checkpoint), **options)

    computed: list[Box] = []

    def counting(raw, box, *args, **kwargs):
        computed.append(box)
        return predict_block(raw, box, *args, **kwargs)

    monkeypatch.setattr(engine_module, "predict_block", counting)
    with caplog.at_level(logging.INFO, logger="ssn_deploy.inference.engine"):
        resumed = run(raw, out, factory(checkpoint), resume=True, **options)
    assert "skipping 3 finished blocks" in caplog.text
    assert len(computed) == 5 and len(set(computed)) == 5
    np.testing.assert_array_equal(resumed.read(), reference)
    assert resumed.dtype == np.uint8


def test_resume_refuses_another_input_but_not_another_spelling(
    checkpoint: Path, raw_crop: np.ndarray, tmp_path: Path, monkeypatch
) -> None:
    """Resuming against a different volume (same shape, other content) would finish half of
    each: refused, naming what differs. The same volume by a relative path resumes."""
    raw = write_raw(tmp_path / "raw.zarr", raw_crop[:28])
    other = write_raw(tmp_path / "other.zarr", raw_crop[28:56])
    options = dict(block_shape=(14, 32, 32), batch_size=16, max_in_flight=1)
    out = tmp_path / "aff.zarr"
    dying = functools.partial(FailingAfter, str(checkpoint), calls=3)
    with pytest.raises(RuntimeError, match="killed"):
        run(raw, out, dying, **options)
    edited = write_raw(tmp_path / "edited.zarr", raw_crop[:28])
    open_volume(edited, "r+")[27:28, :32, :32] = 0  # the last sampled chunk changes
    for volume, what in [(other, "input fingerprint, input location"),
                         (edited, "input fingerprint, input location")]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"other settings \\({what}\\)"):
            run(volume, out, factory(checkpoint), resume=True, **options)
    monkeypatch.chdir(tmp_path)
    resumed = run("raw.zarr", Path("aff.zarr"), factory(checkpoint), resume=True, **options)
    reference = run(raw, tmp_path / "ref.zarr", factory(checkpoint), **options)
    np.testing.assert_array_equal(resumed.read(), reference.read())


def test_existing_output_and_conflicting_options(
    checkpoint: Path, raw_zarr: str, tmp_path: Path
) -> None:
    out = tmp_path / "aff.zarr"
    create_volume(str(out), (3, 8, 8, 8), np.uint8, voxel_size=(10, 10, 10))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run(raw_zarr, out, factory(checkpoint))
    with pytest.raises(ConfigError, match="pick one"):
        run(raw_zarr, out, factory(checkpoint), resume=True, overwrite=True)
    with pytest.raises(ConfigError, match="other settings"):
        run(raw_zarr, out, factory(checkpoint), resume=True)
    with pytest.raises(InvalidInputError, match="overlaps the input"):
        run(raw_zarr, Path(raw_zarr), factory(checkpoint), overwrite=True)
    assert open_volume(raw_zarr).shape == (64, 64, 64)


def plain_array(path: Path, data: np.ndarray, voxel_size=(10, 10, 10)) -> str:
    attrs = {"voxel_size": list(voxel_size)} if voxel_size else {}
    zarr.create_array(str(path), data=data, attributes=attrs)
    return str(path)


@pytest.mark.parametrize(
    ("kind", "error", "message"),
    [
        ("2d", InvalidInputError, "expected a 3D volume, got 2D"),
        ("uint16", InvalidInputError, "expected dtype uint8"),
        ("above one", InvalidInputError, r"must lie in \[0, 1\], found \["),
        ("nan", InvalidInputError, "NaN"),
        ("no voxel size", VoxelSizeError, "--voxel-size"),
    ],
)
def test_bad_inputs_fail_before_any_work(
    kind: str, error: type, message: str, raw_crop: np.ndarray, checkpoint: Path, tmp_path: Path
) -> None:
    crop = raw_crop[:16, :32, :32]
    unit = crop.astype(np.float32) / 255
    data = {
        "2d": crop[0],
        "uint16": crop.astype(np.uint16),
        "above one": unit * 2,
        "nan": np.where(crop > 128, np.nan, unit).astype(np.float32),
        "no voxel size": crop,
    }[kind]
    raw = plain_array(tmp_path / "raw.zarr", data, None if kind == "no voxel size" else (10,) * 3)
    out = tmp_path / "aff.zarr"
    with pytest.raises(error, match=message):
        run(raw, out, factory(checkpoint))
    assert not out.exists()


def test_float_raw_in_unit_range_equals_uint8(
    checkpoint: Path, raw_crop: np.ndarray, tmp_path: Path
) -> None:
    predictor = load_predictor(str(checkpoint), "torch", threads=1)
    grid = PatchGrid.plan(PATCH, predictor.context, 0, predictor.granularity)
    box = Box((0, 0, 0), (14, 34, 34))
    crop = raw_crop[:20, :40, :40]
    results = []
    for data in (crop, crop.astype(np.float32) / 255):
        vol = open_volume(write_raw(tmp_path / f"{data.dtype}.zarr", data))
        results.append(predict_block(vol, box, predictor, grid))
    np.testing.assert_allclose(results[0], results[1], atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1.5])
def test_a_bad_float_voxel_anywhere_stops_its_block(
    checkpoint: Path, raw_crop: np.ndarray, tmp_path: Path, bad: float
) -> None:
    """Chunk sampling misses most of a big volume: every block checks its own raw, so a NaN (or
    an out-of-range value) in an unsampled chunk is an error naming the voxel, not zeros."""
    data = raw_crop[:32, :32, :64].astype(np.float32) / 255
    data[20, 5, 40] = bad
    raw = write_raw(tmp_path / "raw.zarr", data, chunks=(8, 8, 8))  # 128 chunks, 8 sampled
    with pytest.raises(InvalidInputError, match=r"block \d .*raw voxel \(20, 5, 40\)"):
        run(raw, tmp_path / "aff.zarr", factory(checkpoint), block_shape=(32, 32, 32))


class NaNPredictor:
    """Wraps a predictor and returns NaN: a broken model or backend."""

    def __init__(self, inner: Predictor) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return np.full_like(self.inner.predict(batch), np.nan)


def nan_predictor(path: str) -> Predictor:
    return NaNPredictor(load_predictor(path, "torch", threads=1))


def test_non_finite_model_output_is_an_error(
    checkpoint: Path, raw_zarr: str, tmp_path: Path
) -> None:
    with pytest.raises(SsnDeployError, match="NaN or infinite affinities"):
        run(raw_zarr, tmp_path / "aff.zarr", functools.partial(nan_predictor, str(checkpoint)))


def test_corrupt_input_chunk_names_chunk_and_block(
    checkpoint: Path, raw_crop: np.ndarray, tmp_path: Path
) -> None:
    """An unsampled chunk (c/1/1/1 is not among the 8 of 128 fingerprinted) fails in its
    block, named; a sampled one (c/0/0/0) fails before any block."""
    raw = write_raw(tmp_path / "raw.zarr", raw_crop[:32, :32, :64], chunks=(8, 8, 8))
    (tmp_path / "raw.zarr" / "0" / "c" / "1" / "1" / "1").write_bytes(b"not blosc")
    with pytest.raises(
        CorruptDataError, match=r"block \d \(voxels \[0:32, 0:32, 0:32\]\): .*chunk c/1/1/1"
    ):
        run(raw, tmp_path / "aff.zarr", factory(checkpoint), block_shape=(32, 32, 32))
    (tmp_path / "raw.zarr" / "0" / "c" / "0" / "0" / "0").write_bytes(b"not blosc")
    with pytest.raises(CorruptDataError, match=r"^\S+raw.zarr: chunk c/0/0/0"):
        run(raw, tmp_path / "aff2.zarr", factory(checkpoint), block_shape=(32, 32, 32))
    assert not (tmp_path / "aff2.zarr").exists(), "refused before the output is created"


# --- backends -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_model(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    axes = {0: "n", 2: "z", 3: "y", 4: "x"}
    with warnings.catch_warnings():  # the legacy exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            load_checkpoint(checkpoint).model,
            torch.zeros(1, 1, *PATCH),
            str(path),
            dynamo=False,
            input_names=["raw"],
            output_names=["affinities"],
            dynamic_axes={"raw": axes, "affinities": axes},
            opset_version=17,
        )
    spec = ModelSpec(
        offsets=CONFIG.offsets,
        granularity=CONFIG.granularity,
        context=CONFIG.context,
        normalization=Normalization(),
        voxel_size=(10.0, 10.0, 10.0),
    )
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, spec.to_metadata())
    onnx.save(model, str(path))
    return path


def normalised_batch(raw_crop: np.ndarray, shape=(32, 64, 64)) -> np.ndarray:
    return Normalization()(raw_crop[: shape[0], : shape[1], : shape[2]])[None, None]


def test_onnxruntime_matches_torch(
    checkpoint: Path, onnx_model: Path, raw_crop: np.ndarray, raw_zarr: str
) -> None:
    torch_predictor = load_predictor(str(checkpoint), "torch", threads=1)
    onnx_predictor = load_predictor(str(onnx_model), "onnxruntime", threads=1)
    assert isinstance(onnx_predictor, Predictor)
    for name in ("context", "granularity", "offsets", "normalization", "num_channels"):
        assert getattr(onnx_predictor, name) == getattr(torch_predictor, name)
    batch = np.concatenate([normalised_batch(raw_crop), normalised_batch(raw_crop[::-1])])
    expected = torch_predictor.predict(batch)
    assert expected.shape == (2, 3, 32, 64, 64)
    np.testing.assert_allclose(onnx_predictor.predict(batch), expected, atol=1e-4)
    grid = PatchGrid.plan(PATCH, CONFIG.context, 0, CONFIG.granularity)
    box, raw = Box((0, 10, 20), (14, 40, 40)), open_volume(raw_zarr)
    np.testing.assert_allclose(
        predict_block(raw, box, onnx_predictor, grid),
        predict_block(raw, box, torch_predictor, grid),
        atol=1e-4,
    )


def test_onnxruntime_refuses_a_missing_provider_and_metadata(
    onnx_model: Path, tmp_path: Path
) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ConfigError, match="CUDAExecutionProvider"):
            load_predictor(str(onnx_model), "onnxruntime", device="cuda")
    bare = onnx.load(str(onnx_model))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(InvalidInputError, match=r"ssn_deploy\.offsets"):
        load_predictor(str(tmp_path / "bare.onnx"), "onnxruntime")
    with pytest.raises(ConfigError, match=r"runs \.ckpt models"):
        load_predictor(str(onnx_model), "torch")


def test_bf16_close_to_fp32(checkpoint: Path, raw_crop: np.ndarray) -> None:
    batch = normalised_batch(raw_crop)
    fp32 = load_predictor(str(checkpoint), "torch", threads=1).predict(batch)
    bf16 = load_predictor(str(checkpoint), "torch", precision="bf16", threads=1).predict(batch)
    assert bf16.dtype == np.float32
    error = np.abs(bf16 - fp32)
    assert error.max() < 0.1 and error.mean() < 0.02  # bf16 keeps 8 bits of mantissa


@pytest.mark.parametrize("name", ["iso", "aniso"])
def test_the_inference_form_equals_the_trained_model(name: str, raw_crop: np.ndarray) -> None:
    """BatchNorms folded and channels-last activations (the torch predictor's form) change
    nothing in fp32; bf16 in that form, auto's choice on CPUs with native bf16, stays close."""
    from ssn_deploy.inference.loader import default_model
    from ssn_deploy.models.fold import fold_batch_norms

    path = default_model("torch", name)
    trained = load_checkpoint(path).model.eval()
    predictor = load_predictor(path, "torch", threads=2)
    assert predictor.provenance["batch_norms_folded"] == 33
    assert predictor.provenance["layout"] == "channels_last_3d"
    shape = (32, 64, 64)
    batch = predictor.spec.normalization(raw_crop[: shape[0], : shape[1], : shape[2]])[None, None]
    with torch.inference_mode():
        expected = trained(torch.from_numpy(batch)).numpy()
    got = predictor.predict(batch)
    assert got.flags.c_contiguous
    np.testing.assert_allclose(got, expected, atol=2e-5)
    bf16 = load_predictor(path, "torch", precision="bf16", threads=2).predict(batch)
    error = np.abs(bf16 - expected)
    assert error.mean() < 5e-3 and error.max() < 0.1, (error.mean(), error.max())
    _, folded = fold_batch_norms(UNet3d(replace(CONFIG, norm="group")))
    assert folded == 0  # GroupNorm is not an affine map of fixed statistics: left as it is


def test_in_process_cluster_listens_on_loopback_only() -> None:
    import os

    import psutil

    from ssn_deploy.inference.scheduling import dask_client

    with dask_client(None, 1) as client:
        listening = [
            c.laddr.ip
            for c in psutil.Process(os.getpid()).net_connections()
            if c.status == psutil.CONN_LISTEN
        ]
        assert client.submit(sum, [1, 2]).result() == 3
    assert listening and all(ip == "127.0.0.1" for ip in listening), listening


def test_bf16_without_native_support_warns(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from ssn_deploy.inference import torch_backend

    monkeypatch.setattr(torch_backend, "cpu_has_fast_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="ssn_deploy.inference.torch_backend"):
        load_predictor(str(checkpoint), "torch", precision="bf16", threads=1)
        load_predictor(str(checkpoint), "torch", precision="fp32", threads=1)
    warnings_ = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings_) == 1 and "bf16 is emulated" in warnings_[0]
