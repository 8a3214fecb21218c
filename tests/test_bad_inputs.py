"""Bad inputs across every command: one line ``error: …``, exit status 1, inputs untouched.

Each case is run through the real CLI on real files (small volumes, checkpoints and configs
made here). The table of cases and the messages they print is ``docs/bad_inputs.md``; this test
regenerates it and fails if the file differs (``SSN_UPDATE_DOCS=1 pytest
tests/test_bad_inputs.py`` rewrites it).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

from ssn_deploy.cli import main
from ssn_deploy.models import ModelConfig, Normalization, build_model, save_checkpoint
from ssn_deploy.volumes import create_volume
from tests.conftest import sha256

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad_inputs.md"


@dataclass(frozen=True)
class Case:
    command: str
    what: str
    args: Callable[[Path], list[object]]
    expect: str


def _volume(path: Path, data: np.ndarray, voxel=(10, 10, 10)) -> Path:
    create_volume(str(path), data.shape, data.dtype, voxel_size=voxel)[...] = data
    return path


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A workspace of inputs, good and bad."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, (32, 64, 64), dtype=np.uint8)
    _volume(root / "raw.zarr", raw)
    _volume(root / "aniso.zarr", raw, (50, 10, 10))
    _volume(root / "raw16.zarr", raw.astype(np.uint16))
    zarr.create_array(str(root / "noscale.zarr"), data=raw)
    zarr.create_array(str(root / "flat.zarr"), data=raw[0], attributes={"voxel_size": [10, 10]})
    nan = raw.astype(np.float32) / 255
    nan[0, 0, 0] = np.nan
    _volume(root / "nan.zarr", nan)
    labels = (np.arange(32 * 64 * 64).reshape(32, 64, 64) // 4096 + 1).astype(np.uint64)
    _volume(root / "labels.zarr", labels)
    _volume(root / "labels_small.zarr", labels[:16])
    _volume(root / "labels_float.zarr", labels.astype(np.float32))
    _volume(root / "affs.zarr", rng.integers(0, 255, (3, 32, 64, 64), dtype=np.uint8))
    _volume(root / "affs2.zarr", rng.integers(0, 255, (2, 32, 64, 64), dtype=np.uint8))
    with h5py.File(root / "raw.hdf", "w") as f:
        f.create_dataset("volumes/raw", data=raw)
    (root / "empty.zarr").mkdir()
    (root / "existing.zarr").mkdir()
    (root / "existing.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    broken = _volume(root / "broken.zarr", raw)
    (broken / "zarr.json").write_text("{not json")
    model = build_model(ModelConfig(filters=(4, 8), poolings=((2, 2, 2),), embed_kernel=(3, 3, 3)))
    save_checkpoint(root / "tiny.ckpt", model, normalization=Normalization(),
                    voxel_size=(10, 10, 10))  # fmt: skip
    aniso = build_model(ModelConfig(filters=(4, 8), poolings=((1, 2, 2),), embed_kernel=(1, 3, 3)))
    save_checkpoint(root / "encoder.ckpt", aniso, normalization=Normalization(),
                    voxel_size=(50, 10, 10),
                    extra={"kind": "simsiam-encoder", "patch_shape": [8, 32, 32]})  # fmt: skip

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(root / "evil.ckpt", "wb") as f:
        pickle.dump({"model": Payload()}, f)
    (root / "garbage.ckpt").write_bytes(b"\x00" * 100)
    config = yaml.safe_load((REPO / "configs" / "fib_tiny_train.yaml").read_text())
    for key in ("raw", "labels"):
        path, _, node = config["data"][key].partition(":")
        config["data"][key] = f"{(REPO / 'configs' / path).resolve()}:{node}"
    (root / "good.yaml").write_text(yaml.safe_dump(config))
    bad_key = {**config, "training": {**config["training"], "iteratons": 5}}
    (root / "typo.yaml").write_text(yaml.safe_dump(bad_key))
    overlap = {**config, "data": {**config["data"], "test_z": [30, 50]}}
    (root / "overlap.yaml").write_text(yaml.safe_dump(overlap))
    crop = {**config, "training": {**config["training"], "crop": [15, 48, 48]}}
    (root / "crop.yaml").write_text(yaml.safe_dump(crop))
    (root / "notyaml.yaml").write_text("model: [unclosed")
    (root / "run").mkdir()
    (root / "run" / "log.csv").write_text("iteration\n")
    (root / "gt.json").write_text("{}")
    return root


R = "raw.zarr"
CASES = [
    # convert
    Case("convert", "input file missing", lambda w: ["convert", w / "nope.hdf:volumes/raw", w / "o1.zarr"], "nope.hdf"),
    Case("convert", "dataset missing in the HDF5 file", lambda w: ["convert", w / "raw.hdf:volumes/nothing", w / "o2.zarr"], "volumes/nothing"),
    Case("convert", "output not .zarr", lambda w: ["convert", w / "raw.hdf:volumes/raw", w / "o3.tif", "--voxel-size", "10,10,10"], "name the output PATH.zarr"),
    Case("convert", "output exists", lambda w: ["convert", w / "raw.hdf:volumes/raw", w / "existing.zarr", "--voxel-size", "10,10,10"], "--overwrite"),
    Case("convert", "no voxel size anywhere", lambda w: ["convert", w / "raw.hdf:volumes/raw", w / "o4.zarr"], "--voxel-size"),
    Case("convert", "voxel size 0,0,0", lambda w: ["convert", w / "raw.hdf:volumes/raw", w / "o5.zarr", "--voxel-size", "0,0,0"], "positive"),
    Case("convert", "voxel size nan", lambda w: ["convert", w / "raw.hdf:volumes/raw", w / "o6.zarr", "--voxel-size", "nan,1,1"], "positive"),
    Case("convert", "ROI outside the volume", lambda w: ["convert", w / R, w / "o7.zarr", "--roi", "0:10,0:10,60:90"], "outside the volume"),
    Case("convert", "output is the input", lambda w: ["convert", w / R, w / R, "--overwrite"], "overlaps the input"),
    Case("convert", "output under a file", lambda w: ["convert", w / R, w / "gt.json" / "o8.zarr"], "not a directory"),
    # infer
    Case("infer", "volume missing", lambda w: ["infer", w / "nope.zarr", "-o", w / "i1.zarr"], "no such"),
    Case("infer", "empty directory as volume", lambda w: ["infer", w / "empty.zarr", "-o", w / "i2.zarr"], "empty.zarr"),
    Case("infer", "corrupt zarr.json", lambda w: ["infer", w / "broken.zarr", "-o", w / "i3.zarr"], "broken.zarr"),
    Case("infer", "2D volume", lambda w: ["infer", w / "flat.zarr", "-o", w / "i4.zarr"], "3D"),
    Case("infer", "uint16 raw", lambda w: ["infer", w / "raw16.zarr", "-o", w / "i5.zarr"], "uint8"),
    Case("infer", "no voxel size", lambda w: ["infer", w / "noscale.zarr", "-o", w / "i6.zarr"], "--voxel-size"),
    Case("infer", "NaN in float raw", lambda w: ["infer", w / "nan.zarr", "-o", w / "i7.zarr"], "NaN"),
    Case("infer", "threshold 2", lambda w: ["infer", w / R, "-o", w / "i8.zarr", "--threshold", "2"], "threshold"),
    Case("infer", "threshold nan", lambda w: ["infer", w / R, "-o", w / "i9.zarr", "--threshold", "nan"], "threshold"),
    Case("infer", "block shape not a multiple of the fragment tile", lambda w: ["infer", w / R, "-o", w / "i10.zarr", "--block-shape", "32,64,64", "--fragment-tile", "24,64,64"], "multiple"),
    Case("infer", "patch shape off the model's granularity", lambda w: ["infer", w / R, "-o", w / "i11.zarr", "--model", w / "tiny.ckpt", "--patch-shape", "31,64,64"], "granularity"),
    Case("infer", "--workers 0", lambda w: ["infer", w / R, "-o", w / "i12.zarr", "--workers", "0"], "--workers"),
    Case("infer", "unreachable scheduler", lambda w: ["infer", w / R, "-o", w / "i13.zarr", "--model", w / "tiny.ckpt", "--scheduler", "tcp://127.0.0.1:9"], "scheduler"),
    Case("infer", "scheduler that is not an address", lambda w: ["infer", w / R, "-o", w / "i20.zarr", "--model", "intensity", "--scheduler", "foo"], "scheduler"),
    Case("infer", "output under a file", lambda w: ["infer", w / R, "-o", w / "gt.json" / "i21.zarr", "--model", "intensity"], "not a directory"),
    Case("infer", "model file missing", lambda w: ["infer", w / R, "-o", w / "i14.zarr", "--model", w / "nope.ckpt"], "nope.ckpt"),
    Case("infer", "checkpoint that runs code when unpickled", lambda w: ["infer", w / R, "-o", w / "i15.zarr", "--model", w / "evil.ckpt"], "evil.ckpt"),
    Case("infer", "checkpoint that is not one", lambda w: ["infer", w / R, "-o", w / "i16.zarr", "--model", w / "garbage.ckpt"], "garbage.ckpt"),
    Case("infer", "TensorRT on a machine without it", lambda w: ["infer", w / R, "-o", w / "i17.zarr", "--backend", "tensorrt"], "tensorrt"),
    Case("infer", "output exists", lambda w: ["infer", w / R, "-o", w / "existing.zarr"], "--overwrite"),
    Case("infer", "--resume with --overwrite", lambda w: ["infer", w / R, "-o", w / "i18.zarr", "--resume", "--overwrite"], "pick one"),
    Case("infer", "output into the input", lambda w: ["infer", w / R, "-o", w / R, "--overwrite"], "raw.zarr"),
    Case("infer", "voxel size 0,0,0", lambda w: ["infer", w / R, "-o", w / "i19.zarr", "--voxel-size", "0,0,0"], "positive"),
    # segment
    Case("segment", "affinities missing", lambda w: ["segment", w / "nope.zarr", "-o", w / "s1.zarr"], "no such"),
    Case("segment", "raw given as affinities", lambda w: ["segment", w / R, "-o", w / "s2.zarr"], "affinities"),
    Case("segment", "two channels for three offsets", lambda w: ["segment", w / "affs2.zarr", "-o", w / "s3.zarr"], "offsets"),
    Case("segment", "threshold -1", lambda w: ["segment", w / "affs.zarr", "-o", w / "s4.zarr", "--threshold", "-1"], "threshold"),
    Case("segment", "output inside the affinities", lambda w: ["segment", w / "affs.zarr", "-o", w / "affs.zarr", "--overwrite"], "which this command reads"),
    Case("segment", "output under a file", lambda w: ["segment", w / "affs.zarr", "-o", w / "gt.json" / "s5.zarr"], "not a directory"),
    Case("segment", "scheduler that is not an address", lambda w: ["segment", w / "affs.zarr", "-o", w / "s6.zarr", "--scheduler", "foo"], "scheduler"),
    # evaluate
    Case("evaluate", "shapes differ", lambda w: ["evaluate", w / "labels.zarr", w / "labels_small.zarr"], "shape"),
    Case("evaluate", "float labels", lambda w: ["evaluate", w / "labels_float.zarr", w / "labels.zarr"], "integer"),
    Case("evaluate", "ground truth missing", lambda w: ["evaluate", w / "labels.zarr", w / "nope.zarr"], "no such"),
    Case("evaluate", "--output onto the ground truth", lambda w: ["evaluate", w / "labels.zarr", w / "labels.zarr", "--output", w / "labels.zarr/zarr.json", "--overwrite"], "which this command reads"),
    Case("evaluate", "--output exists", lambda w: ["evaluate", w / "labels.zarr", w / "labels.zarr", "--output", w / "gt.json"], "--overwrite"),
    Case("evaluate", "--output under a file", lambda w: ["evaluate", w / "labels.zarr", w / "labels.zarr", "--output", w / "gt.json" / "report.json"], "not a directory"),
    # train
    Case("train", "config missing", lambda w: ["train", w / "nope.yaml", "-o", w / "t1"], "nope.yaml"),
    Case("train", "config that is not YAML", lambda w: ["train", w / "notyaml.yaml", "-o", w / "t2"], "notyaml.yaml"),
    Case("train", "misspelt key", lambda w: ["train", w / "typo.yaml", "-o", w / "t3"], "iteratons"),
    Case("train", "training data overlaps the test region", lambda w: ["train", w / "overlap.yaml", "-o", w / "t4"], "test"),
    Case("train", "crop off the model's granularity", lambda w: ["train", w / "crop.yaml", "-o", w / "t5"], "granularity"),
    Case("train", "run directory exists", lambda w: ["train", w / "good.yaml", "-o", w / "run"], "--resume"),
    Case("train", "run directory under a file", lambda w: ["train", w / "good.yaml", "-o", w / "gt.json" / "t6"], "not a directory"),
    # export
    Case("export", "checkpoint missing", lambda w: ["export", w / "nope.ckpt", "-o", w / "e1"], "nope.ckpt"),
    Case("export", "checkpoint that runs code when unpickled", lambda w: ["export", w / "evil.ckpt", "-o", w / "e2"], "evil.ckpt"),
    Case("export", "TensorRT without TensorRT", lambda w: ["export", w / "tiny.ckpt", "-o", w / "e3", "--format", "tensorrt"], "tensorrt"),
    Case("export", "output directory under a file", lambda w: ["export", w / "tiny.ckpt", "-o", w / "gt.json" / "e4"], "not a directory"),
    # pretrain
    Case("pretrain", "2D volume", lambda w: ["pretrain", w / "flat.zarr", "-o", w / "p1"], "3D"),
    Case("pretrain", "volumes of two voxel sizes", lambda w: ["pretrain", w / R, w / "aniso.zarr", "-o", w / "p2", "--crop", "16,32,32"], "voxel size"),
    Case("pretrain", "crop off the granularity", lambda w: ["pretrain", w / "aniso.zarr", "-o", w / "p3", "--crop", "8,30,30"], "granularity"),
    Case("pretrain", "batch of one", lambda w: ["pretrain", w / "aniso.zarr", "-o", w / "p4", "--batch-size", "1"], "--batch-size"),
    # select
    Case("select", "budget that does not fit", lambda w: ["select", w / "aniso.zarr", "-o", w / "x1", "--encoder", w / "encoder.ckpt", "--budget", "500"], "cannot fit"),
    Case("select", "window larger than the volume", lambda w: ["select", w / "aniso.zarr", "-o", w / "x2", "--encoder", w / "encoder.ckpt", "--window", "64,64,64"], "larger than the volume"),
    Case("select", "encoder for another voxel size", lambda w: ["select", w / R, "-o", w / "x3", "--encoder", w / "encoder.ckpt"], "voxel size"),
    Case("select", "everything excluded", lambda w: ["select", w / "aniso.zarr", "-o", w / "x4", "--encoder", w / "encoder.ckpt", "--exclude", "0:32,0:64,0:64"], "excluded"),
    Case("select", "stride off the granularity", lambda w: ["select", w / "aniso.zarr", "-o", w / "x5", "--encoder", w / "encoder.ckpt", "--stride", "4,7,7"], "granularity"),
    Case("select", "not an encoder", lambda w: ["select", w / "aniso.zarr", "-o", w / "x6", "--encoder", w / "tiny.ckpt"], "not an encoder"),
    # verify
    Case("verify", "not an ssn-deploy output", lambda w: ["verify", w / R], "no ssn-deploy stage"),
    # sample
    Case("sample", "folder already holds the sample", lambda w: ["sample", w / "existing.zarr/.."], "--overwrite"),
]  # fmt: skip


def run_case(case: Case, w: Path) -> str:
    result = CliRunner().invoke(main, [str(a) for a in case.args(w)], prog_name="ssn-deploy")
    assert result.exit_code == 1, f"{case.what}: exit {result.exit_code}\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    assert case.expect.lower() in errors[0].lower(), f"{case.what}: {errors[0]}"
    return errors[0].replace(str(w), "W")


def test_every_bad_input_is_one_line_and_changes_nothing(w: Path) -> None:
    assert len(CASES) >= 40
    inputs = {p: sha256(p) for p in w.iterdir()}
    rows = ["| command | bad input | message |", "| --- | --- | --- |"]
    for case in CASES:
        message = run_case(case, w).replace("|", "\\|")
        rows.append(f"| `{case.command}` | {case.what} | `{message}` |")
    for path, digest in inputs.items():
        assert sha256(path) == digest, f"{path} changed"
    text = "\n".join(
        [
            "# Bad inputs and what ssn-deploy says",
            "",
            f"{len(CASES)} cases, each run by `tests/test_bad_inputs.py` through the real CLI on "
            "real files (W is the test's",
            "workspace). Every one exits with status 1, prints exactly this line and leaves its "
            "inputs byte-identical.",
            "",
            *rows,
            "",
        ]
    )
    if os.environ.get("SSN_UPDATE_DOCS"):
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text)
    assert DOC.exists() and DOC.read_text() == text, (
        "docs/bad_inputs.md is stale: SSN_UPDATE_DOCS=1 pytest tests/test_bad_inputs.py"
    )
