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
from ssn_deploy.export import export_onnx
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
    assert parity["max_abs_diff"] < 1e-4
    assert parity["shape"][2:] == [64, 128, 128]  # a block of the bundled sample
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
