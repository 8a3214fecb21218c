"""``ssn-deploy infer`` end to end on real EM data with a small model: outputs, refusals, resume."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from ssn_deploy.cli import main
from ssn_deploy.models import ModelConfig, Normalization, build_model, save_checkpoint
from ssn_deploy.volumes import create_volume, open_volume
from tests.conftest import sha256

OPTIONS = [
    *("--block-shape", "32,64,64", "--fragment-tile", "32,64,64"),
    *("--patch-shape", "32,64,64", "--no-progress"),
]


@pytest.fixture(scope="module")
def workspace(medulla_250: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    with h5py.File(medulla_250, "r") as f:
        raw = f["volumes/raw"][125:157, :64, :128]
    vol = create_volume(str(root / "raw.zarr"), raw.shape, np.uint8, voxel_size=(10, 10, 10))
    vol[...] = raw
    torch.manual_seed(0)
    config = ModelConfig(filters=(4, 8), poolings=((2, 2, 2),), embed_kernel=(3, 3, 3))
    save_checkpoint(
        root / "tiny.ckpt",
        build_model(config),
        normalization=Normalization(),
        voxel_size=(10, 10, 10),
    )
    return root


def infer(workspace: Path, out: str, *extra: str):
    args = [
        "infer",
        str(workspace / "raw.zarr"),
        "-o",
        out,
        "--model",
        str(workspace / "tiny.ckpt"),
    ]
    return CliRunner().invoke(main, [*args, *OPTIONS, *extra])


def test_infer_writes_all_stages_with_provenance_and_preview(workspace: Path) -> None:
    digest = sha256(workspace / "raw.zarr")
    out = str(workspace / "seg.zarr")
    result = infer(workspace, out)
    assert result.exit_code == 0, result.output
    affs = open_volume(f"{out}/affinities")
    seg = open_volume(f"{out}/segmentation")
    frags = open_volume(f"{out}/fragments")
    assert affs.shape == (3, 32, 64, 128) and affs.dtype == np.uint8
    assert seg.shape == frags.shape == (32, 64, 128) and seg.dtype == np.uint64
    assert seg.voxel_size == (10.0, 10.0, 10.0)
    assert seg[...].min() > 0, "every voxel belongs to a segment"
    assert affs.attrs["ssn_deploy"]["predictor"]["model"].endswith("tiny.ckpt")
    assert seg.attrs["ssn_deploy"]["threshold"] == 0.5
    preview = workspace / "seg.preview.png"
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sha256(workspace / "raw.zarr") == digest


def test_existing_output_is_refused_and_resume_finishes_it(workspace: Path) -> None:
    out = str(workspace / "again.zarr")
    assert infer(workspace, out).exit_code == 0
    reference = open_volume(f"{out}/segmentation")[...]
    refused = infer(workspace, out)
    assert refused.exit_code == 1
    assert refused.output.strip().splitlines() == [
        f"error: {out} already exists; pass --resume to continue it or --overwrite to replace it"
    ]
    # a run killed during segmentation: two blocks not yet marked
    done = open_volume(f"{out}/segmentation/done", "r+")
    flags = done[...]
    flags.ravel()[:2] = 0
    done[...] = flags
    resumed = infer(workspace, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    np.testing.assert_array_equal(open_volume(f"{out}/segmentation")[...], reference)


def test_bad_inputs_fail_with_one_line(workspace: Path, tmp_path: Path) -> None:
    flat = zarr.create_array(str(tmp_path / "flat.zarr"), shape=(64, 64), dtype=np.uint8)
    flat.attrs["voxel_size"] = [10, 10]
    for volume, message in [
        (str(tmp_path / "missing.zarr"), "no such zarr store"),
        (str(tmp_path / "flat.zarr"), "3D"),
    ]:
        result = CliRunner().invoke(
            main,
            [
                "infer",
                volume,
                "-o",
                str(tmp_path / "o.zarr"),
                "--model",
                str(workspace / "tiny.ckpt"),
            ],
        )
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "o.zarr").exists()


def test_intensity_baseline_runs_through_the_same_pipeline(workspace: Path) -> None:
    out = str(workspace / "baseline.zarr")
    args = ["infer", str(workspace / "raw.zarr"), "-o", out, "--model", "intensity"]
    result = CliRunner().invoke(main, [*args, *OPTIONS, "--no-preview"])
    assert result.exit_code == 0, result.output
    affs = open_volume(f"{out}/affinities")[...]
    raw = open_volume(str(workspace / "raw.zarr"))[...]
    padded = np.pad(raw, 1, mode="reflect")  # the engine mirrors the volume at its faces
    for channel, offset in zip(affs, ((-1, 0, 0), (0, -1, 0), (0, 0, -1)), strict=True):
        # an edge is as bright as its darker end: min(I(v), I(v + offset))
        shifted = padded[
            tuple(slice(1 + o, 1 + o + n) for o, n in zip(offset, raw.shape, strict=True))
        ]
        np.testing.assert_array_equal(channel, np.minimum(raw, shifted))
    assert open_volume(f"{out}/affinities").attrs["ssn_deploy"]["predictor"]["model"] == "intensity"


def test_onnx_model_gives_the_torch_affinities(workspace: Path) -> None:
    from ssn_deploy.export import export_onnx

    onnx_path = export_onnx(workspace / "tiny.ckpt", workspace / "tiny.onnx")
    outs = {}
    for name, model in (("torch", workspace / "tiny.ckpt"), ("onnx", onnx_path)):
        out = str(workspace / f"parity_{name}.zarr")
        args = ["infer", str(workspace / "raw.zarr"), "-o", out, "--model", str(model)]
        args += [*OPTIONS, "--affinity-dtype", "float32", "--no-preview", "--batch-size", "2"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        outs[name] = open_volume(f"{out}/affinities")[...]
    assert np.abs(outs["onnx"] - outs["torch"]).max() < 1e-4


def test_fp16_export_of_the_default_model_through_infer(
    workspace: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Issue 5 acceptance on real EM: fp16 affinities within 1e-2 of torch, VOI ≤ 0.01."""
    from ssn_deploy.export import export_fp16, export_onnx
    from ssn_deploy.inference.loader import default_model
    from ssn_deploy.metrics import evaluate

    root = tmp_path_factory.mktemp("fp16")
    checkpoint = default_model("torch")
    fp16 = export_fp16(
        export_onnx(checkpoint, root / "m.onnx", simplify=True), root / "m.fp16.onnx"
    )
    outs, segs = {}, {}
    for name, model in (("torch", checkpoint), ("fp16", fp16)):
        out = str(root / f"{name}.zarr")
        args = ["infer", str(workspace / "raw.zarr"), "-o", out, "--model", str(model)]
        args += [*OPTIONS, "--affinity-dtype", "float32", "--no-preview"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        outs[name] = open_volume(f"{out}/affinities")[...]
        segs[name] = open_volume(f"{out}/segmentation")[...]
    assert (
        open_volume(f"{root}/fp16.zarr/affinities").attrs["ssn_deploy"]["predictor"]["precision"]
        == "fp16"
    )
    diff = np.abs(outs["fp16"] - outs["torch"])
    assert 0 < diff.max() < 1e-2
    assert evaluate(segs["fp16"], segs["torch"])["voi"] <= 0.01


def test_tensorrt_engine_on_a_cpu_machine_is_a_clear_error(workspace: Path) -> None:
    engine = workspace / "model.plan"
    engine.write_bytes(b"not an engine")
    args = ["infer", str(workspace / "raw.zarr"), "-o", str(workspace / "trt.zarr")]
    result = CliRunner().invoke(main, [*args, "--model", str(engine), *OPTIONS])
    assert result.exit_code == 1
    assert "error: the tensorrt backend runs on a GPU: pass --device cuda" in result.output
    result = CliRunner().invoke(main, [*args, "--model", str(engine), "--device", "cuda"])
    assert result.exit_code == 1 and result.output.startswith("error: ")
    assert not (workspace / "trt.zarr").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold", "nan"], "threshold must be a number in [0, 1]"),
        (["--threshold", "2"], "threshold must be a number in [0, 1]"),
        (["--threshold", "-1"], "threshold must be a number in [0, 1]"),
        (["--threshold", "inf"], "threshold must be a number in [0, 1]"),
        (["--block-shape", "32,64,64", "--fragment-tile", "32,48,48"], "multiple of the fragment"),
    ],
)
def test_bad_settings_are_refused_before_any_work(
    workspace: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    out = tmp_path / "o.zarr"
    args = ["infer", str(workspace / "raw.zarr"), "-o", str(out), "--model", "intensity"]
    result = CliRunner().invoke(main, [*args, "--no-progress", *extra])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: ")
    assert message in result.output
    assert not out.exists(), "nothing is written before the settings are checked"


def test_an_existing_preview_is_not_overwritten(workspace: Path, tmp_path: Path) -> None:
    png = tmp_path / "out.preview.png"
    png.write_bytes(b"a picture someone keeps")
    out = tmp_path / "out.zarr"
    args = ["infer", str(workspace / "raw.zarr"), "-o", str(out), "--model", "intensity"]
    result = CliRunner().invoke(main, [*args, "--no-progress"])
    assert result.exit_code == 1 and "preview.png already exists" in result.output
    assert png.read_bytes() == b"a picture someone keeps" and not out.exists()


def test_auto_backend_is_the_fastest_that_runs_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from ssn_deploy.inference import torch_backend
    from ssn_deploy.inference.loader import auto_backend, resolve_precision

    monkeypatch.setattr(torch_backend, "cpu_has_fast_bf16", lambda: True)
    assert auto_backend("default") == auto_backend("aniso") == "torch"
    assert resolve_precision("auto", "torch") == resolve_precision("auto", "torch", "cpu", "aniso")
    assert resolve_precision("auto", "torch") == "bf16"
    assert resolve_precision("auto", "torch", "cpu", "run/best.ckpt") == "fp32"  # unmeasured
    assert auto_backend("iso", precision="fp32") == "onnxruntime"
    assert auto_backend("iso", device="cuda") == "onnxruntime"
    assert resolve_precision("auto", "torch", "cuda") == "fp32"
    assert resolve_precision("auto", "onnxruntime") == resolve_precision("auto", "triton") == "fp32"
    monkeypatch.setattr(torch_backend, "cpu_has_fast_bf16", lambda: False)  # AVX2-only CPUs
    assert resolve_precision("auto", "torch") == "fp32"
    assert auto_backend("default") == auto_backend("aniso") == "onnxruntime"
    assert auto_backend("iso", precision="bf16") == auto_backend("iso", compile=True) == "torch"
    assert auto_backend("run/best.ckpt") == "torch" and auto_backend("m.onnx") == "onnxruntime"
    assert auto_backend("e.plan") == "tensorrt" and auto_backend("intensity") == "torch"


def test_verify_finds_damaged_chunks_and_resume_recomputes_only_those(
    workspace: Path, tmp_path: Path
) -> None:
    """After a finished run: one affinity chunk made undecodable, one segmentation block
    silently changed. ``verify`` names both (exit 1) and unmarks them; ``infer --resume``
    recomputes them and the output equals the undamaged one; ``verify`` is then clean."""
    out = str(tmp_path / "out.zarr")
    args = ["--model", "intensity", "--no-preview"]
    result = CliRunner().invoke(main, ["infer", str(workspace / "raw.zarr"), "-o", out,
                                       *args, *OPTIONS])  # fmt: skip
    assert result.exit_code == 0, result.output
    original = {s: open_volume(f"{out}/{s}")[...] for s in ("affinities", "segmentation")}
    clean = CliRunner().invoke(main, ["verify", out])
    assert clean.exit_code == 0 and "0 damaged" in clean.output, clean.output

    chunk = next(p for p in Path(out, "affinities").rglob("c/*/*/*/*") if p.is_file())
    chunk.write_bytes(b"not a zstd frame")
    seg = zarr.open_array(f"{out}/labels/segmentation/0", mode="r+")  # level 0 of the label
    seg[0:32, 0:64, 64:128] = 7  # valid data, wrong values: only a checksum sees it

    dry = CliRunner().invoke(main, ["verify", out, "--dry-run"])
    assert dry.exit_code == 1 and "2 damaged block(s) reported" in dry.output, dry.output
    damaged = CliRunner().invoke(main, ["verify", out])
    assert damaged.exit_code == 1, damaged.output
    assert "affinities: 2/2 blocks finished, 1 damaged [0]" in damaged.output
    assert "segmentation: 2/2 blocks finished, 1 damaged [1]" in damaged.output
    resumed = CliRunner().invoke(main, ["infer", str(workspace / "raw.zarr"), "-o", out,
                                        *args, *OPTIONS, "--resume"])  # fmt: skip
    assert resumed.exit_code == 0, resumed.output
    for stage, data in original.items():
        np.testing.assert_array_equal(open_volume(f"{out}/{stage}")[...], data)
    again = CliRunner().invoke(main, ["verify", out])
    assert again.exit_code == 0 and "damaged []" in again.output, again.output


def test_infer_merges_by_super_blocks_and_segment_repeats_the_choice(workspace: Path) -> None:
    """``infer --agglomeration superblocks``: the region graph stays in storage beside the
    fragments, the segmentation is within VOI 0.05 of the global one (ties, see the README),
    and ``segment`` on those affinities repeats the recorded choice unless told otherwise."""
    from ssn_deploy.metrics import evaluate

    grid = [*("--block-shape", "32,64,64", "--fragment-tile", "16,32,32")]
    base = ["infer", str(workspace / "raw.zarr"), "--model", "intensity", *grid]
    segs = {}
    for mode in ("global", "superblocks"):
        out = workspace / f"agglomeration_{mode}.zarr"
        args = [*base, "-o", str(out), "--agglomeration", mode, "--no-progress", "--no-preview"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        segs[mode] = open_volume(f"{out}/labels/segmentation")[...]
        recorded = open_volume(f"{out}/affinities").attrs["ssn_deploy"]["segmentation"]
        assert recorded["agglomeration"] == mode
    edges = workspace / "agglomeration_superblocks.zarr" / "labels" / "fragments_edges"
    assert (edges / "map").is_dir() and not (
        workspace / "agglomeration_global.zarr" / "labels" / "fragments_edges"
    ).exists()
    assert len(np.unique(segs["superblocks"])) > 10
    assert evaluate(segs["superblocks"], segs["global"])["voi"] <= 0.05

    affs = str(workspace / "agglomeration_superblocks.zarr" / "affinities")
    again = workspace / "agglomeration_again.zarr"
    result = CliRunner().invoke(main, ["segment", affs, "-o", str(again), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "superblocks agglomeration" in result.output
    assert "merged by super-blocks" in result.output
    np.testing.assert_array_equal(
        open_volume(f"{again}/labels/segmentation")[...], segs["superblocks"]
    )
    rejected = CliRunner().invoke(main, [*base, "-o", str(again), "--agglomeration", "tree"])
    assert rejected.exit_code == 1 and "'tree' is not one of" in rejected.output


def test_auto_agglomeration_merges_by_super_blocks_above_64_mi_voxels() -> None:
    from ssn_deploy.errors import ConfigError
    from ssn_deploy.pipeline import AUTO_SUPERBLOCKS_VOXELS, resolve_agglomeration

    assert AUTO_SUPERBLOCKS_VOXELS == 64 * 2**20  # the CLI help says so
    assert resolve_agglomeration("auto", (125, 250, 250)) == "global"
    assert resolve_agglomeration("auto", (256, 512, 512)) == "global"  # exactly the limit
    assert resolve_agglomeration("auto", (512, 512, 512)) == "superblocks"
    assert resolve_agglomeration("global", (512, 512, 512)) == "global"
    assert resolve_agglomeration("superblocks", (8, 8, 8)) == "superblocks"
    with pytest.raises(ConfigError, match="expected one of auto, global, superblocks"):
        resolve_agglomeration("tree", (8, 8, 8))
