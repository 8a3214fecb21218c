"""bioimage.io packages of the packaged models: valid, reproducible, and what ssn-deploy computes.

The iso package is tested by bioimageio.core itself (``test_model``: format validation, the
test outputs reproduced by both weight formats, inference at other sizes and batch sizes);
running it through bioimageio.core must give ssn-deploy's own (torch) prediction.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

pytest.importorskip("bioimageio.core")  # the bioimageio and dev extras install it

import bioimageio.core as bioimageio_core  # not its test_model by name: pytest would collect it
from bioimageio.spec.utils import load_array

from ssn_deploy.cli import main
from ssn_deploy.errors import ConfigError, OutputExistsError
from ssn_deploy.export.bioimageio import export_bioimageio, sample_crop
from ssn_deploy.export.package import BIOIMAGEIO
from ssn_deploy.inference.loader import default_model, load_predictor
from ssn_deploy.models import ModelConfig, Normalization, build_model, save_checkpoint


def _export(name: str, out_dir: Path) -> Path:
    """The packaged model's package, from its shipped (parity-checked) ONNX graph."""
    return export_bioimageio(
        default_model("torch", name), default_model("onnxruntime", name), out_dir / BIOIMAGEIO,
        opset=17,
    )  # fmt: skip


@pytest.fixture(scope="module")
def iso_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export("iso", tmp_path_factory.mktemp("bioimageio"))


def _rdf(package: Path) -> dict:
    with zipfile.ZipFile(package) as zf:
        return yaml.safe_load(zf.read("rdf.yaml"))


def test_iso_package_passes_bioimageio_core_test_model(iso_package: Path) -> None:
    summary = bioimageio_core.test_model(iso_package)
    assert summary.status == "passed", summary.format()
    reproduced = [d for d in summary.details if d.name.startswith("Reproduce test outputs")]
    assert sorted(d.name for d in reproduced) == [
        "Reproduce test outputs from test inputs (onnx)",
        "Reproduce test outputs from test inputs (pytorch_state_dict)",
    ]
    assert all(d.status == "passed" for d in reproduced)


def test_iso_package_reproduces_ssn_deploys_prediction(iso_package: Path) -> None:
    descr = bioimageio_core.load_model_description(iso_package)
    raw = load_array(descr.inputs[0].test_tensor)
    assert raw.dtype == np.uint8 and raw.shape == (1, 1, 32, 64, 64)
    np.testing.assert_array_equal(raw[0, 0], sample_crop((16, 16, 16)))  # a real sample crop
    reference = load_predictor("iso", "torch")
    expected = reference.predict(reference.normalization(raw))
    for weights in ("onnx", "pytorch_state_dict"):
        # predict() loads and unloads the pipeline (entering it here too would deadlock)
        pipeline = bioimageio_core.create_prediction_pipeline(descr, weight_format=weights)
        out = bioimageio_core.predict(model=pipeline, inputs={"raw": raw})
        affinities = out.members["affinities"].data.to_numpy()
        assert affinities.shape == expected.shape == (1, 3, 32, 64, 64)
        assert np.abs(affinities - expected).max() < 1e-4, weights


def test_iso_package_describes_the_model(iso_package: Path) -> None:
    rdf = _rdf(iso_package)
    assert rdf["type"] == "model" and rdf["format_version"].startswith("0.5.")
    assert set(rdf["weights"]) == {"onnx", "pytorch_state_dict"}
    (raw,), (affs,) = rdf["inputs"], rdf["outputs"]
    assert [a["type"] for a in raw["axes"]] == ["batch", "channel", "space", "space", "space"]
    assert [(a["id"], a["scale"], a["unit"]) for a in raw["axes"][2:]] == [
        (axis, 10.0, "nanometer") for axis in "zyx"
    ]
    assert [a["size"] for a in raw["axes"][2:]] == [{"min": 16, "step": 16}] * 3
    assert raw["data"]["type"] == "uint8"
    scale = next(p for p in raw["preprocessing"] if p["id"] == "scale_linear")["kwargs"]
    assert scale == pytest.approx({"gain": 1 / 127.5, "offset": -1.0})
    assert raw["preprocessing"][-1] == {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}
    assert affs["axes"][1]["channel_names"] == ["aff_z", "aff_y", "aff_x"]
    config = rdf["config"]["ssn_deploy"]
    assert config["offsets"] == [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
    assert config["voxel_size_nm"] == [10.0, 10.0, 10.0]
    assert config["decoder"]["threshold"] == 0.5 and not config["decoder"]["anisotropic"]
    assert rdf["cite"][0]["doi"] == "10.1016/j.isci.2025.114507"
    assert rdf["license"] == "MIT" and rdf["authors"]
    with zipfile.ZipFile(iso_package) as zf:
        readme = zf.read(rdf["documentation"]["source"]).decode()
        assert {"cover.png", "test_input.npy", "test_output.npy"} <= set(zf.namelist())
    assert readme.startswith("# Isotropic model") and "## Validation" in readme


def test_aniso_package_carries_its_voxel_size_and_threshold(tmp_path: Path) -> None:
    package = _export("aniso", tmp_path)
    summary = bioimageio_core.test_model(package, weight_format="onnx")
    assert summary.status == "passed", summary.format()
    rdf = _rdf(package)
    axes = rdf["inputs"][0]["axes"][2:]
    assert [a["scale"] for a in axes] == [50.0, 10.0, 10.0]
    assert [a["size"]["step"] for a in axes] == [1, 16, 16]
    decoder = rdf["config"]["ssn_deploy"]["decoder"]
    assert decoder["threshold"] == 0.8 and decoder["anisotropic"]


def test_export_command_packages_any_checkpoint(tmp_path: Path) -> None:
    """The CLI path (export, parity, package) on a small random model: no model card, so the
    documentation is generated from the checkpoint; no validated threshold, so the default."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = ModelConfig(filters=(4, 8), poolings=((1, 2, 2),), embed_kernel=(1, 3, 3))
    ckpt = save_checkpoint(
        tmp_path / "tiny.ckpt",
        build_model(config).eval(),
        normalization=Normalization(mean=0.4, std=0.2, kind="meanstd"),
        voxel_size=(40, 8, 8),
    )
    out = tmp_path / "deploy"
    args = ["export", str(ckpt), "-o", str(out), "--format", "bioimageio"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out / BIOIMAGEIO}" in result.output
    summary = bioimageio_core.test_model(out / BIOIMAGEIO)
    assert summary.status == "passed", summary.format()
    rdf = _rdf(out / BIOIMAGEIO)
    assert [a["scale"] for a in rdf["inputs"][0]["axes"][2:]] == [40.0, 8.0, 8.0]
    scale = next(p for p in rdf["inputs"][0]["preprocessing"] if p["id"] == "scale_linear")
    assert scale["kwargs"] == pytest.approx({"gain": 1 / (255 * 0.2), "offset": -0.4 / 0.2})
    decoder = rdf["config"]["ssn_deploy"]["decoder"]
    assert decoder["threshold"] == 0.5 and decoder["threshold_source"] == "default"
    assert decoder["anisotropic"]
    with zipfile.ZipFile(out / BIOIMAGEIO) as zf:
        assert zf.read("README.md").decode().startswith("# ssn-deploy affinity model `tiny.ckpt`")


def test_existing_package_is_refused_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    out.mkdir()
    (out / BIOIMAGEIO).write_bytes(b"keep me")
    result = CliRunner().invoke(main, ["export", "aniso", "-o", str(out), "--format", "bioimageio"])
    assert result.exit_code == 1 and "pass --overwrite" in result.output, result.output
    assert (out / BIOIMAGEIO).read_bytes() == b"keep me"
    assert sorted(p.name for p in out.iterdir()) == [BIOIMAGEIO]  # nothing else written
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        _export("aniso", out)
    assert (out / BIOIMAGEIO).read_bytes() == b"keep me"


def test_missing_bioimageio_spec_fails_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)  # import raises ImportError
    out = tmp_path / "deploy"
    result = CliRunner().invoke(main, ["export", "-o", str(out), "--format", "bioimageio"])
    assert result.exit_code == 1 and "ssn-deploy[bioimageio]" in result.output, result.output
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(ConfigError, match=r"bioimageio\.spec"):
        _export("iso", tmp_path)
