"""``ssn-deploy pretrain`` (SimSiam) and ``ssn-deploy select`` (CGS) on real anisotropic EM.

Small on purpose (a 16×96×96 crop of sections [0, 25) of ``fib_medulla_250_aniso5``, a 8×32×32
encoder patch): what is tested is the plumbing — exact resume, embeddings stored and reused,
ROIs that never overlap or enter an excluded region, crops, the picture, one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ssn_deploy.cli import main
from ssn_deploy.models.checkpoint import load_checkpoint
from ssn_deploy.volumes import create_volume, open_volume


@pytest.fixture(scope="module")
def unlabelled(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("select")
    with h5py.File(data_dir / "fib_medulla_250_aniso5.hdf", "r") as f:
        raw = f["volumes/raw"][0:16, 40:136, 40:136]
    create_volume(str(root / "raw.zarr"), raw.shape, np.uint8, voxel_size=(50, 10, 10))[...] = raw
    return root


def run(*args: object) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


PRETRAIN = ("--crop", "8,32,32", "--threads", "1", "--checkpoint-every", "2")


@pytest.fixture(scope="module")
def encoder(unlabelled: Path) -> Path:
    run("pretrain", unlabelled / "raw.zarr", "-o", unlabelled / "run", "--iterations", "4",
        *PRETRAIN)  # fmt: skip
    return unlabelled / "run" / "encoder.ckpt"


def test_pretraining_resumes_exactly(unlabelled: Path, encoder: Path) -> None:
    from ssn_deploy.training.simsiam import pretrain

    half = unlabelled / "half"
    config = load_checkpoint(encoder).extra["pretrain"]
    from ssn_deploy.models.unet import ModelConfig
    from ssn_deploy.training.simsiam import PretrainConfig

    cfg = PretrainConfig(**(config | {"model": ModelConfig.from_dict(config["model"])}))
    pretrain([str(unlabelled / "raw.zarr")], half, cfg, until=2, progress=False)  # interrupted
    assert not (half / "encoder.ckpt").exists() and (half / "last.ckpt").exists()
    run("pretrain", unlabelled / "raw.zarr", "-o", half, "--iterations", "4", "--resume",
        *PRETRAIN)  # fmt: skip
    a, b = load_checkpoint(encoder), load_checkpoint(half / "encoder.ckpt")
    assert a.iteration == b.iteration == 4 and a.extra["kind"] == "simsiam-encoder"
    for (name, x), (_, y) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name
    assert a.extra["patch_shape"] == [8, 32, 32] and tuple(a.voxel_size) == (50, 10, 10)


def test_select_writes_rois_crops_and_picture(unlabelled: Path, encoder: Path) -> None:
    out = unlabelled / "sel"
    args = ["select", unlabelled / "raw.zarr", "-o", out, "--encoder", encoder, "--no-progress"]
    output = run(*args, "--budget", "3", "--k", "10", "--exclude", "0:16,0:96,64:96")
    assert "coverage: CGS" in output
    report = json.loads((out / "rois.json").read_text())
    assert report["method"] == "cgs" and len(report["rois"]) == 3 and report["k"] == 10
    c = report["coverage"]
    assert len(c["random"]) == 5 and 0 < c["cgs"] <= 1
    assert c["cgs"] >= c["random_best"] - 1e-9, "CGS maximises coverage"
    boxes = []
    for roi in report["rois"]:
        (z, y, x), (dz, dy, dx) = roi["offset_voxels"], roi["shape_voxels"]
        assert x + dx <= 64, "nothing selected inside the excluded region"
        crop = open_volume(str(out / roi["crop"]))
        assert crop.shape == (dz, dy, dx)
        np.testing.assert_array_equal(
            crop[...], open_volume(str(unlabelled / "raw.zarr"))[z : z + dz, y : y + dy, x : x + dx]
        )
        assert roi["offset_nm"] == [z * 50.0, y * 10.0, x * 10.0]
        boxes.append(np.s_[z : z + dz, y : y + dy, x : x + dx])
    claimed = np.zeros((16, 96, 96), int)
    for box in boxes:
        claimed[box] += 1
    assert claimed.max() == 1, "no voxel is annotated twice"
    assert (out / "selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = CliRunner().invoke(main, [str(a) for a in [*args, "--budget", "3", "--k", "10",
                                      "--exclude", "0:16,0:96,64:96", "--overwrite"]])  # fmt: skip
    assert again.exit_code == 0 and "reusing" in again.output
    assert json.loads((out / "rois.json").read_text())["rois"] == report["rois"], "deterministic"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--budget", "500"], "cannot fit"),
        (["--exclude", "0:16,0:96,0:96"], "excluded"),
        (["--window", "20,96,96"], "larger than the volume"),
        (["--window", "8,16,16"], "smaller than one patch"),
        (["--stride", "4,8,8"], "granularity"),
    ],
)
def test_select_refuses_bad_requests(unlabelled: Path, encoder: Path, extra, message) -> None:
    out = unlabelled / f"bad_{message.replace(' ', '_')}"
    args = ["select", unlabelled / "raw.zarr", "-o", out, "--encoder", encoder, "--no-progress"]
    result = CliRunner().invoke(main, [str(a) for a in [*args, *extra]])
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, "one line, no traceback"
    assert not out.exists(), "refused before anything is embedded or written"


def test_an_encoder_for_another_voxel_size_is_refused(unlabelled: Path, encoder: Path) -> None:
    raw = open_volume(str(unlabelled / "raw.zarr"))[...]
    iso = unlabelled / "iso.zarr"
    create_volume(str(iso), raw.shape, np.uint8, voxel_size=(10, 10, 10))[...] = raw
    result = CliRunner().invoke(
        main, ["select", str(iso), "-o", str(unlabelled / "iso_sel"), "--encoder", str(encoder)]
    )
    assert result.exit_code == 1 and "pretrain one for this voxel size" in result.output
    assert not (unlabelled / "iso_sel").exists()


def test_dense_embedding_places_block_features_and_pools_footprints(
    unlabelled: Path, encoder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many blocks (a tiny block budget): each block's cells equal the encoder run directly on
    that block's mirrored read; each patch's embedding is the mean of the cells it covers."""
    from ssn_deploy.geometry import BlockGrid, Box
    from ssn_deploy.selection import embed
    from ssn_deploy.volumes import reflect_read

    monkeypatch.setattr(embed, "BLOCK_VOXELS", 30_000)
    enc = embed.Encoder(encoder)
    raw = open_volume(str(unlabelled / "raw.zarr"))
    out = str(unlabelled / "dense" / "embeddings.zarr")
    store = embed.embed_volume(raw, enc, out, progress=False)
    grid = embed.embedding_grid(raw.shape, enc, None, "dense")
    assert grid.stride == (4, 16, 16), "~0.45 of the patch in z, 1/4 in-plane (granularity 16)"
    features = np.asarray(open_volume(embed.features_path(out))[...])
    g = enc.granularity
    extent = grid.window_voxels(grid.shape)
    core, halo = embed.dense_layout(enc, extent)
    blocks = list(BlockGrid(Box.from_shape(extent), core, 0))
    assert len(blocks) > 4, "the tiny budget forces several blocks"
    for block in blocks[:: max(1, len(blocks) // 3)]:
        box = block.write_box
        direct = enc.features(enc.normalization(reflect_read(raw, box.grow(halo))))
        inner = embed.cells(halo, np.add(halo, box.shape), g)
        stored = features[(slice(None), *embed.cells(box.begin, box.end, g))]
        np.testing.assert_allclose(stored, direct[(slice(None), *inner)], rtol=1e-5, atol=1e-5)
    emb = np.asarray(store[...])
    assert emb.shape == (enc.dim, *grid.shape)
    for index in [(0, 0, 0), (grid.shape[0] - 1, 1, grid.shape[2] - 1)]:
        patch = grid.box(index)
        foot = features[(slice(None), *embed.cells(patch.begin, patch.end, g))]
        np.testing.assert_allclose(emb[(slice(None), *index)], foot.mean(axis=(1, 2, 3)), rtol=1e-5)


def test_dense_embedding_refuses_strides_off_the_granularity(encoder: Path) -> None:
    from ssn_deploy.errors import InvalidInputError
    from ssn_deploy.selection import embed

    enc = embed.Encoder(encoder)
    with pytest.raises(InvalidInputError, match="granularity"):
        embed.embedding_grid((16, 96, 96), enc, (2, 8, 8), "dense")
    assert embed.embedding_grid((16, 96, 96), enc, (2, 8, 8), "patch").stride == (2, 8, 8)


def test_select_without_an_encoder_uses_the_packaged_one(data_dir: Path, tmp_path: Path) -> None:
    """The shipped anisotropic encoder (18×64×64 patches) on real serial sections of the
    training part: chosen by voxel size, announced, and CGS covers at least as much as the
    best random selection."""
    with h5py.File(data_dir / "fib_medulla_250_aniso5.hdf", "r") as f:
        raw = f["volumes/raw"][0:20, :128, :128]
    vol = tmp_path / "raw.zarr"
    create_volume(str(vol), raw.shape, np.uint8, voxel_size=(50, 10, 10))[...] = raw
    out = tmp_path / "sel"
    result = CliRunner().invoke(
        main, ["select", str(vol), "-o", str(out), "--budget", "2", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "encoder: packaged aniso" in result.output
    report = json.loads((out / "rois.json").read_text())
    assert report["encoder"].endswith("aniso.ckpt") and report["patch"] == [18, 64, 64]
    assert report["coverage"]["cgs"] >= report["coverage"]["random_best"]
