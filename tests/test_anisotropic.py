"""Anisotropic (serial-section) data end to end, on real crops of ``fib_medulla_250_aniso5``.

Sections [25, 50) are the test region: nothing here reads them. Covers the geometry at every
voxel size from 4×4×4 to 50×4×4 nm, the packaged model chosen by voxel size, blockwise vs one
block, tiled vs untiled fragments, ``segment`` repeating infer from the affinities' provenance,
the intensity baseline against one segment, and ``evaluate --voxel-size``.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from ssn_deploy.cli import main
from ssn_deploy.errors import ConfigError
from ssn_deploy.inference.blend import PatchGrid
from ssn_deploy.inference.checks import voxel_size_advice
from ssn_deploy.inference.loader import (
    PACKAGED_MODELS,
    choose_packaged,
    default_model,
    load_predictor,
)
from ssn_deploy.metrics import evaluate
from ssn_deploy.models.checkpoint import load_checkpoint
from ssn_deploy.pipeline import MIN_CORE_FRACTION, default_geometry
from ssn_deploy.volumes import create_volume, open_volume

VOXEL_SIZES = [(4, 4, 4), (8, 4, 4), (16, 4, 4), (30, 4, 4), (40, 4, 4), (50, 4, 4), (50, 10, 10)]
ANISO_VOXEL = (50.0, 10.0, 10.0)


@pytest.fixture(scope="session")
def aniso5(data_dir: Path) -> Path:
    return data_dir / "fib_medulla_250_aniso5.hdf"


@pytest.fixture(scope="module")
def crop(aniso5: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sections [0, 24), whole (training + validation sections, never the test ones)."""
    root = tmp_path_factory.mktemp("aniso")
    with h5py.File(aniso5, "r") as f:
        raw = f["volumes/raw"][0:24]
        gt = f["volumes/labels/neuron_ids"][0:24]
    create_volume(str(root / "raw.zarr"), raw.shape, np.uint8, voxel_size=ANISO_VOXEL)[...] = raw
    create_volume(str(root / "gt.zarr"), gt.shape, np.uint64, voxel_size=ANISO_VOXEL)[...] = gt
    return root


def invoke(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def infer(root: Path, name: str, *extra: str) -> str:
    out = root / f"{name}.zarr"
    invoke("infer", root / "raw.zarr", "-o", out, "--no-progress", "--no-preview", *extra)
    return str(out)


def voi(a: str, b: str) -> float:
    return float(evaluate(open_volume(a)[...], open_volume(b)[...])["voi"])


# --- geometry -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [m.name for m in PACKAGED_MODELS] + ["intensity"])
@pytest.mark.parametrize("voxel_size", VOXEL_SIZES)
def test_geometry_never_collapses(name: str, voxel_size: tuple[float, ...]) -> None:
    predictor = load_predictor(name)
    g = default_geometry(predictor, voxel_size)
    grid = PatchGrid.plan(g.patch_shape, g.margin, g.overlap, predictor.granularity)
    for patch, margin, stride, context in zip(
        g.patch_shape, g.margin, grid.stride, predictor.context, strict=True
    ):
        assert stride >= 1
        assert margin >= min(4, context), "at least 4 voxels dropped where the context has them"
        assert stride >= MIN_CORE_FRACTION * patch - 1e-9, "the core keeps 2/3 of the patch"
    assert all(b % s == 0 for b, s in zip(g.block_shape, grid.stride, strict=True))
    assert all(b % t == 0 for b, t in zip(g.block_shape, g.fragment_tile, strict=True))


def test_patch_shape_is_honoured() -> None:
    predictor = load_predictor("aniso")
    g = default_geometry(predictor, (50, 4, 4), patch_shape=(20, 128, 128))
    assert g.patch_shape == (20, 128, 128)
    assert g.margin == (4, 16, 16)
    short = default_geometry(predictor, (50, 4, 4), patch_shape=(4, 64, 64))
    assert short.patch_shape == (4, 64, 64) and short.margin[0] == 1  # shrunk to leave a core
    with pytest.raises(ConfigError, match="granularity"):
        default_geometry(predictor, (50, 4, 4), patch_shape=(20, 100, 100))


# --- which model ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("voxel_size", "expected"),
    [((4, 4, 4), "iso"), ((10, 10, 10), "iso"), ((8, 4, 4), "iso"), ((50, 4, 4), "aniso"),
     ((40, 4, 4), "aniso"), ((50, 10, 10), "aniso"), ((30, 6, 6), "aniso")],
)  # fmt: skip
def test_default_model_by_voxel_size(voxel_size: tuple[float, ...], expected: str) -> None:
    assert choose_packaged(voxel_size).name == expected


@pytest.mark.parametrize("model", PACKAGED_MODELS, ids=lambda m: m.name)
def test_packaged_models_are_what_the_table_says(model) -> None:
    ckpt = load_checkpoint(default_model("torch", model.name))
    assert tuple(ckpt.voxel_size) == model.voxel_size
    onnx = load_predictor(model.name, "onnxruntime")
    assert tuple(onnx.voxel_size) == model.voxel_size
    assert onnx.spec.threshold == ckpt.extra["best"]["threshold"]
    for backend in ("torch", "onnxruntime"):
        assert default_model(backend, model.name).stat().st_size <= 10 * 2**20


def test_voxel_size_advice_says_what_to_do() -> None:
    assert voxel_size_advice("v", (10, 10, 10), (10, 10, 10)) is None
    assert voxel_size_advice("v", (11, 9, 9), (10, 10, 10)) is None
    shape = voxel_size_advice("v", (50, 4, 4), (10, 10, 10))
    assert "anisotropy" in shape and "--model default" in shape and "'aniso'" in shape
    assert "--voxel-size" in shape
    nearest = voxel_size_advice("v", (50, 4.6, 4.6), (50, 10, 10))  # already the best packaged
    assert "no packaged model fits better" in nearest and "resample" in nearest
    scale = voxel_size_advice("v", (4, 4, 4), (10, 10, 10))
    assert "resample" in scale and "anisotropy" not in scale


# --- the pipeline on real anisotropic crops ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("voxel_size", ["4,4,4", "20,4,4", "50,4,4"])
def test_infer_runs_at_any_voxel_size(crop: Path, tmp_path: Path, voxel_size: str) -> None:
    raw = open_volume(str(crop / "raw.zarr"))[:, :64, :64]  # small: 160³ patches at 4×4×4
    create_volume(str(tmp_path / "raw.zarr"), raw.shape, np.uint8, voxel_size=ANISO_VOXEL)[...] = (
        raw
    )
    out = infer(tmp_path, "out", "--voxel-size", voxel_size)
    seg = open_volume(f"{out}/segmentation")
    assert seg.shape == raw.shape
    # the model sees 10 nm data labelled as another size: only "it segments" is asserted
    assert len(np.unique(seg[...])) > 3


@pytest.mark.slow
def test_anisotropic_pipeline(crop: Path) -> None:
    """Default model picked by voxel size; blocks never change the result; segment repeats
    infer from the provenance; tiles cost at most 0.02 VOI; the baseline beats one segment."""
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["infer", str(crop / "raw.zarr"), "-o", str(crop / "one.zarr"), "--no-progress",
         "--no-preview", "--block-shape", "24,250,250", "--fragment-tile", "24,125,125",
         "--affinity-dtype", "float32"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "packaged 'aniso'" in result.output
    one = str(crop / "one.zarr")
    small = infer(crop, "small", "--block-shape", "24,125,125", "--fragment-tile", "24,125,125",
                  "--affinity-dtype", "float32")  # fmt: skip
    a, b = open_volume(f"{one}/affinities")[...], open_volume(f"{small}/affinities")[...]
    assert np.abs(a - b).max() <= 1e-5
    assert voi(f"{one}/segmentation", f"{small}/segmentation") == pytest.approx(0, abs=1e-12)
    attrs = open_volume(f"{one}/segmentation").attrs["ssn_deploy"]
    assert attrs["anisotropic"] is True and attrs["fragment_context"][0] == 0

    # segment with no options repeats infer's segmentation exactly
    output = invoke("segment", f"{one}/affinities", "-o", crop / "again.zarr", "--no-progress")
    assert "2D (per section)" in output and "provenance" in output
    again = open_volume(str(crop / "again.zarr/segmentation"))[...]
    assert np.array_equal(again, open_volume(f"{one}/segmentation")[...])

    # one tile over the whole crop: the tile lattice costs at most 0.02 VOI
    invoke("segment", f"{one}/affinities", "-o", crop / "untiled.zarr", "--no-progress",
           "--fragment-tile", "24,250,250")  # fmt: skip
    gt = str(crop / "gt.zarr")
    tiled_voi = voi(f"{one}/segmentation", gt)
    untiled_voi = voi(str(crop / "untiled.zarr/segmentation"), gt)
    assert abs(tiled_voi - untiled_voi) <= 0.02, (tiled_voi, untiled_voi)

    # the no-network baseline beats one segment on serial sections
    base = infer(crop, "base", "--model", "intensity")
    one_segment = np.ones((24, 250, 250), np.uint64)
    gt_ids = open_volume(gt)[...]
    baseline_voi = voi(f"{base}/segmentation", gt)
    assert baseline_voi < evaluate(one_segment, gt_ids)["voi"] - 0.3
    assert tiled_voi < baseline_voi, "the model beats the baseline"


def test_evaluate_voxel_size(crop: Path, tmp_path: Path) -> None:
    gt = open_volume(str(crop / "gt.zarr"))[...]
    other = create_volume(str(tmp_path / "seg.zarr"), gt.shape, np.uint64, voxel_size=(40, 4, 4))
    other[...] = gt
    result = CliRunner().invoke(
        main, ["evaluate", str(tmp_path / "seg.zarr"), str(crop / "gt.zarr")]
    )
    assert result.exit_code == 1 and "voxel sizes differ" in result.output
    args = ["evaluate", tmp_path / "seg.zarr", crop / "gt.zarr", "--voxel-size", "50,10,10"]
    report = json.loads(invoke(*args, "--json"))
    assert report["voi"] == 0 and report["voxel_size"] == [50, 10, 10]
    bad = CliRunner().invoke(
        main,
        ["evaluate", str(tmp_path / "seg.zarr"), str(crop / "gt.zarr"), "--voxel-size", "0,1,1"],
    )
    assert bad.exit_code == 1 and "positive" in bad.output


@pytest.mark.parametrize("name", [m.name for m in PACKAGED_MODELS])
@pytest.mark.parametrize(
    "shape", [(125, 250, 250), (80, 160, 160), (50, 250, 250), (25, 250, 250), (512, 512, 512)]
)
def test_geometry_fitted_to_the_volume_computes_fewer_model_voxels(
    name: str, shape: tuple[int, int, int]
) -> None:
    """Same margins, cores on the same kind of lattice, never more model voxels than the
    volume-blind geometry and never a patch more than 10 % longer than the nominal one."""
    predictor = load_predictor(name)
    voxel = predictor.voxel_size

    def model_voxels(g) -> int:
        cores = [p - 2 * m for p, m in zip(g.patch_shape, g.margin, strict=True)]
        counts = [-(-n // c) for n, c in zip(shape, cores, strict=True)]
        return int(np.prod([k * p for k, p in zip(counts, g.patch_shape, strict=True)]))

    blind = default_geometry(predictor, voxel)
    fitted = default_geometry(predictor, voxel, volume_shape=shape)
    assert fitted.margin == blind.margin
    assert all(
        f <= int(b * 1.1) for f, b in zip(fitted.patch_shape, blind.patch_shape, strict=True)
    )
    assert model_voxels(fitted) <= model_voxels(blind)
    grid = PatchGrid.plan(fitted.patch_shape, fitted.margin, fitted.overlap, predictor.granularity)
    assert all(b % s == 0 for b, s in zip(fitted.block_shape, grid.stride, strict=True))
    if shape == (80, 160, 160) and name == "iso":  # the bundled demo: 8 → 2.7 model voxels/voxel
        assert model_voxels(blind) / np.prod(shape) > 7.9
        assert model_voxels(fitted) / np.prod(shape) < 2.8
