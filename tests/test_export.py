"""torch → ONNX export: metadata carries the model spec, the graph checks, outputs match."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from ssn_deploy.cli import main
from ssn_deploy.errors import OutputExistsError
from ssn_deploy.export import export_fp16, export_onnx
from ssn_deploy.inference.loader import load_predictor
from ssn_deploy.models import (
    ModelConfig,
    Normalization,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from ssn_deploy.models.spec import ModelSpec

CONFIG = ModelConfig(filters=(4, 8, 8), poolings=((1, 2, 2), (2, 2, 2)), embed_kernel=(1, 3, 3))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model(CONFIG)
    model.train()
    with torch.no_grad():  # move BatchNorm statistics away from their defaults
        model(torch.randn(2, 1, 8, 32, 32))
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    return save_checkpoint(path, model, normalization=Normalization(), voxel_size=(10, 10, 10))


def test_export_round_trip_and_parity(checkpoint: Path, tmp_path: Path) -> None:
    out = export_onnx(checkpoint, tmp_path / "model.onnx")
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    props = {p.key: p.value for p in proto.metadata_props}
    spec = ModelSpec.from_metadata(props, str(out))
    assert spec.offsets == CONFIG.offsets
    assert spec.granularity == CONFIG.granularity == (2, 4, 4)
    assert spec.context == CONFIG.context
    assert spec.voxel_size == (10.0, 10.0, 10.0)

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    model = load_checkpoint(checkpoint).model
    for shape in [(1, 1, 4, 32, 32), (2, 1, 6, 16, 48)]:  # dynamic batch and z/y/x
        x = rng.standard_normal(shape).astype(np.float32)
        (onnx_out,) = session.run(None, {"raw": x})
        with torch.inference_mode():
            torch_out = model(torch.from_numpy(x)).numpy()
        assert onnx_out.shape == (shape[0], 3, *shape[2:])
        np.testing.assert_allclose(onnx_out, torch_out, atol=1e-5)


def test_export_refuses_existing_output(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        export_onnx(checkpoint, out)
    assert out.read_bytes() == b"keep me"
    export_onnx(checkpoint, out, overwrite=True)
    assert onnx.load(str(out)).graph.input[0].name == "raw"


def test_export_command_writes_a_deployable_directory(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    result = CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(out)])
    assert result.exit_code == 0, result.output
    shipped = torch.load(out / "model.ckpt", weights_only=True)
    assert "optimizer" not in shipped and "rng" not in shipped
    assert load_checkpoint(out / "model.ckpt").config == CONFIG
    parity = json.loads((out / "parity.json").read_text())
    fp32 = parity["variants"]["onnxruntime fp32"]
    assert fp32["ok"] and fp32["max_abs_diff"] < 1e-4
    assert fp32["voi_difference"] <= 0.01
    assert fp32["segmentation_vs_reference"]["voi"] <= 0.01  # random weights: near-ties flip
    assert parity["shape"][2:] == [64, 128, 128]  # a block of the bundled sample
    assert "onnxruntime fp16" not in parity["variants"]  # only with --fp16
    again = CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(out)])
    assert again.exit_code == 1 and "pass --overwrite" in again.output


def test_threshold_chosen_on_validation_travels_in_the_metadata(tmp_path: Path) -> None:
    model = build_model(CONFIG).eval()
    ckpt = save_checkpoint(
        tmp_path / "m.ckpt",
        model,
        normalization=Normalization(),
        voxel_size=(10, 10, 10),
        extra={"best": {"threshold": 0.3, "voi": 1.2}},
    )
    proto = onnx.load(str(export_onnx(ckpt, tmp_path / "m.onnx")))
    spec = ModelSpec.from_metadata({p.key: p.value for p in proto.metadata_props}, "m.onnx")
    assert spec.threshold == 0.3
    assert ModelSpec.from_checkpoint(load_checkpoint(ckpt)).threshold == 0.3


def _session_output(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"raw": x})[0]


def _real_block() -> np.ndarray:
    from ssn_deploy.sample import load_sample

    return Normalization()(load_sample()["raw"][:16, :64, :64])[None, None]


def test_simplified_graph_folds_batchnorm_and_computes_the_same(
    checkpoint: Path, tmp_path: Path
) -> None:
    plain = export_onnx(checkpoint, tmp_path / "plain.onnx")
    simple = export_onnx(checkpoint, tmp_path / "simple.onnx", simplify=True)
    ops = {
        name: [n.op_type for n in onnx.load(str(p)).graph.node]
        for name, p in (("plain", plain), ("simple", simple))
    }
    assert "BatchNormalization" in ops["plain"]
    assert "BatchNormalization" not in ops["simple"]
    assert len(ops["simple"]) < len(ops["plain"])
    props = {p.key: p.value for p in onnx.load(str(simple)).metadata_props}
    assert props["ssn_deploy.simplified"] == "true"
    assert ModelSpec.from_metadata(props, "simple.onnx").offsets == CONFIG.offsets
    x = _real_block()
    np.testing.assert_allclose(_session_output(simple, x), _session_output(plain, x), atol=1e-5)


def test_fp16_variant_keeps_float32_io_and_stays_within_1e_2(
    checkpoint: Path, tmp_path: Path
) -> None:
    fp32 = export_onnx(checkpoint, tmp_path / "m.onnx", simplify=True)
    fp16 = export_fp16(fp32, tmp_path / "m.fp16.onnx")
    proto = onnx.load(str(fp16))
    onnx.checker.check_model(proto, full_check=True)
    float32 = onnx.TensorProto.FLOAT
    assert proto.graph.input[0].type.tensor_type.elem_type == float32
    assert proto.graph.output[0].type.tensor_type.elem_type == float32
    weights = [t for t in proto.graph.initializer if len(t.dims) == 5]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert fp16.stat().st_size < 0.75 * fp32.stat().st_size
    predictor = load_predictor(fp16, "onnxruntime")
    assert predictor.provenance["precision"] == "fp16"
    assert load_predictor(fp32, "onnxruntime").provenance["precision"] == "fp32"
    x = _real_block()
    out16, out32 = predictor.predict(x), _session_output(fp32, x)
    assert out16.dtype == np.float32
    diff = np.abs(out16 - out32)
    assert 0 < diff.max() < 1e-2  # really computed in half precision, and close
    with pytest.raises(OutputExistsError):
        export_fp16(fp32, fp16)


def test_export_fp16_command_checks_both_variants(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    result = CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(out), "--fp16"])
    assert result.exit_code == 0, result.output
    assert "onnxruntime fp16: max |diff|" in result.output and ": ok" in result.output
    parity = json.loads((out / "parity.json").read_text())
    fp16 = parity["variants"]["onnxruntime fp16"]
    assert fp16["ok"] and fp16["max_abs_diff"] < 1e-2
    assert fp16["voi_difference"] <= 0.01 and fp16["segmentation_vs_reference"]["voi"] <= 0.01
    assert fp16["provenance"]["precision"] == "fp16"
    assert set(fp16["to_ground_truth"]) == {"voi_split", "voi_merge", "voi"}


def test_parity_flags_a_variant_out_of_tolerance(checkpoint: Path) -> None:
    from ssn_deploy.parity import Variant, compare, parity_block

    reference = load_predictor(checkpoint, "torch")

    class Shifted:
        """The same model, off by 0.005 everywhere: fine for fp16, not for an fp32 graph."""

        def __init__(self) -> None:
            self.inner = load_predictor(checkpoint, "torch")

        def __getattr__(self, name: str):
            return getattr(self.inner, name)

        def predict(self, batch: np.ndarray) -> np.ndarray:
            return np.clip(self.inner.predict(batch) + 0.005, 0, 1)

    raw, labels = parity_block(reference.granularity)
    variants = [
        Variant("shifted fp32", Path("x.onnx"), Shifted, "fp32"),
        Variant("shifted fp16", Path("x.onnx"), Shifted, "fp16"),
    ]
    report = compare(reference, variants, raw, labels, threshold=0.5, anisotropic=False)
    rows = report["variants"]
    assert rows["shifted fp32"]["max_abs_diff"] == pytest.approx(0.005, abs=1e-6)
    assert rows["shifted fp32"]["ok"] is False
    assert rows["shifted fp16"]["ok"] is True
    assert rows["shifted fp16"]["voi_difference"] <= 0.01


def test_tensorrt_export_without_tensorrt_fails_before_writing(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on any machine without TensorRT
    out = tmp_path / "deploy"
    args = ["export", str(checkpoint), "-o", str(out), "--format", "tensorrt"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "tensorrt" in result.output.lower()
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir())
