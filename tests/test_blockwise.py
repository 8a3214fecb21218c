"""Blockwise fragments + agglomeration: results independent of the block grid, resumable."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import ndimage

from ssn_deploy.affinities import affinities_from_labels
from ssn_deploy.agglomeration.blockwise import segment_blockwise
from ssn_deploy.errors import ConfigError, OutputExistsError
from ssn_deploy.metrics import evaluate
from ssn_deploy.volumes import create_volume, open_volume
from tests.conftest import sha256

OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]


@pytest.fixture(scope="module")
def labels(medulla_250: Path) -> np.ndarray:
    with h5py.File(medulla_250, "r") as f:
        return f["volumes/labels/neuron_ids"][125:189, :96, :128]


@pytest.fixture(scope="module")
def affs_zarr(labels: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Ground-truth affinities blurred like a network's output, stored as uint8 like infer's."""
    affs, _ = affinities_from_labels(labels)
    affs = ndimage.gaussian_filter(affs, (0, 1, 1, 1))
    spec = str(tmp_path_factory.mktemp("affs") / "affs.zarr")
    vol = create_volume(
        spec,
        affs.shape,
        np.uint8,
        chunks=(3, 32, 32, 32),
        voxel_size=(10, 10, 10),
        attrs={"ssn_deploy": {"offsets": OFFSETS, "scale": 255.0}},
    )
    vol[...] = np.rint(affs * 255).astype(np.uint8)
    return spec


def run(affs: str, out: Path, block_shape, **kwargs):
    return segment_blockwise(
        affs,
        str(out / "fragments.zarr"),
        str(out / "segmentation.zarr"),
        block_shape=block_shape,
        fragment_tile=(32, 32, 32),
        progress=False,
        **kwargs,
    )


def test_partition_does_not_depend_on_the_block_grid(affs_zarr, labels, tmp_path):
    digest = sha256(Path(affs_zarr))
    single, _ = run(affs_zarr, tmp_path / "single", (64, 96, 128))
    whole = single[...]
    for shape in [(32, 32, 32), (64, 32, 64)]:
        seg, _ = run(affs_zarr, tmp_path / "x".join(map(str, shape)), shape)
        assert evaluate(seg[...], whole)["voi"] == pytest.approx(0.0, abs=1e-12)
        np.testing.assert_array_equal(seg[...], whole)  # even the ids agree
    scores = evaluate(whole, labels)
    assert scores["voi"] < 1.5, scores
    assert sha256(Path(affs_zarr)) == digest, "the input must not change"
    attrs = single.attrs["ssn_deploy"]
    assert attrs["threshold"] == 0.5 and attrs["merge_function"] == "aff50_his256"


def test_threshold_sweep_from_one_history(affs_zarr, tmp_path):
    seg, history = run(affs_zarr, tmp_path, (64, 32, 64), threshold=0.7)
    frags = open_volume(str(tmp_path / "fragments.zarr"))[...]
    counts = [len(set(history.lookup(t).values())) for t in (0.1, 0.3, 0.5, 0.7)]
    assert counts == sorted(counts, reverse=True)
    assert len(np.unique(seg[...])) <= len(np.unique(frags))


def test_resume_skips_finished_blocks_and_refuses_existing_output(affs_zarr, tmp_path, caplog):
    reference, _ = run(affs_zarr, tmp_path / "ref", (32, 32, 32))
    out = tmp_path / "resumed"
    run(affs_zarr, out, (32, 32, 32))
    with pytest.raises(OutputExistsError, match="already exists"):
        run(affs_zarr, out, (32, 32, 32))
    # forget two finished segmentation blocks, as if the run had been killed before them
    done = open_volume(str(out / "segmentation.zarr" / "done"), "r+")
    flags = done[...]
    flags.ravel()[[1, 5]] = 0
    done[...] = flags
    caplog.set_level("INFO")
    seg, _ = run(affs_zarr, out, (32, 32, 32), resume=True)
    assert "fragments: skipping 24 finished blocks" in caplog.text
    assert "segmentation: skipping 22 finished blocks" in caplog.text
    np.testing.assert_array_equal(seg[...], reference[...])
    with pytest.raises(ConfigError, match=r"other settings \(threshold\)"):
        run(affs_zarr, out, (32, 32, 32), resume=True, threshold=0.7)


def test_block_shape_must_hold_whole_fragment_tiles(affs_zarr, tmp_path):
    with pytest.raises(ConfigError, match="multiple of the fragment tile"):
        run(affs_zarr, tmp_path, (48, 32, 32))
