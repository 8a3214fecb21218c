"""``OUT.zarr`` as an OME-Zarr 0.5 image with labels: validated by ome-zarr-models on real
``infer`` and ``segment`` runs, pyramid levels against a numpy reference, shards = blocks, and
provenance (model hash, UTC time, command line, version) on every stage."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from ome_zarr_models.v05 import Image, ImageLabel, Labels

from ssn_deploy.cli import main
from ssn_deploy.export.tensorrt import file_sha256
from ssn_deploy.inference.scheduling import dask_client
from ssn_deploy.pyramid import downsample_mode, pyramid_factors, write_pyramid
from ssn_deploy.volumes import create_volume, open_volume, shard_layout

BLOCK = (32, 128, 128)
OPTIONS = [
    *("--block-shape", ",".join(map(str, BLOCK)), "--fragment-tile", "32,64,64"),
    *("--no-progress", "--no-preview"),
]


def crop(medulla_250: Path, root: Path, shape: tuple[int, int, int]) -> str:
    with h5py.File(medulla_250, "r") as f:
        raw = f["volumes/raw"][100 : 100 + shape[0], : shape[1], : shape[2]]
    vol = create_volume(str(root / "raw.zarr"), raw.shape, np.uint8, voxel_size=(10, 10, 10))
    vol[...] = raw
    return vol.spec


def run(*args: object) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def out(medulla_250: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real infer (no-network baseline) on a 40×150×150 crop: 8 blocks, two scale levels."""
    root = tmp_path_factory.mktemp("outputs")
    raw = crop(medulla_250, root, (40, 150, 150))
    run("infer", raw, "-o", root / "out.zarr", "--model", "intensity", *OPTIONS)
    return root / "out.zarr"


def multiscale(group: zarr.Group) -> dict:
    return group.attrs.asdict()["ome"]["multiscales"][0]


def transforms(ms: dict) -> list[tuple[list[float], list[float]]]:
    """(scale, translation) of each level."""
    out = []
    for dataset in ms["datasets"]:
        scale, shift = dataset["coordinateTransformations"]
        assert scale["type"] == "scale" and shift["type"] == "translation"
        out.append((scale["scale"], shift["translation"]))
    return out


def test_infer_output_is_an_ome_zarr_image_with_label_images(out: Path) -> None:
    root = zarr.open_group(str(out), mode="r")
    image = Image.from_zarr(root)  # validates the root, its labels group and each label image
    assert image.labels is not None and image.labels.label_paths == ["segmentation", "fragments"]
    Image.from_zarr(zarr.open_group(str(out / "affinities"), mode="r"))
    Labels.from_zarr(zarr.open_group(str(out / "labels"), mode="r"))
    expected = [([10.0, 10.0, 10.0], [0.0, 0.0, 0.0]), ([10.0, 20.0, 20.0], [0.0, 5.0, 5.0])]
    ms = multiscale(root)
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"] and ms["type"] == "mean"
    assert [d["path"] for d in ms["datasets"]] == ["affinities/0", "affinities/1"]
    assert [(s[1:], t[1:]) for s, t in transforms(ms)] == expected
    assert all(s[0] == 1.0 and t[0] == 0.0 for s, t in transforms(ms))  # channels: no scale
    for name in ("segmentation", "fragments"):
        group = zarr.open_group(str(out / "labels" / name), mode="r")
        label = ImageLabel.from_zarr(group)
        assert label.attributes.ome.image_label.source.image == "../../"
        ms = multiscale(group)
        assert ms["type"] == "mode" and [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
        assert transforms(ms) == expected and [d["path"] for d in ms["datasets"]] == ["0", "1"]
    # the label images read by their old paths too, and evaluate takes them as before
    seg = open_volume(f"{out}/segmentation")
    assert seg.spec == f"{out}/labels/segmentation" and seg.voxel_size == (10.0, 10.0, 10.0)
    assert open_volume(f"{out}/segmentation/done").shape == (2, 2, 2)
    report = run("evaluate", f"{out}/segmentation", f"{out}/labels/segmentation", "--json")
    assert json.loads(report)["voi"] == pytest.approx(0.0, abs=1e-12)


def test_pyramid_levels_of_the_run_match_numpy(out: Path) -> None:
    affs = zarr.open_array(str(out / "affinities" / "0"), mode="r")[...]
    np.testing.assert_array_equal(
        zarr.open_array(str(out / "affinities" / "1"), mode="r")[...], mean_ref(affs, (1, 2, 2))
    )
    for name in ("segmentation", "fragments"):
        labels = zarr.open_array(str(out / "labels" / name / "0"), mode="r")[...]
        level = zarr.open_array(str(out / "labels" / name / "1"), mode="r")[...]
        np.testing.assert_array_equal(level, mode_ref(labels, (1, 2, 2)))
    level = open_volume(f"{out}/segmentation/1")  # a level alone keeps its geometry
    assert level.voxel_size == (10.0, 20.0, 20.0) and level.offset == (0.0, 5.0, 5.0)


def test_ome_zarr_py_reads_the_segmentation_as_a_label_image_of_the_output(out: Path) -> None:
    """The reference OME-Zarr reader (ome-zarr-py, 0.5/zarr v3) walks the output as viewers
    and notebooks do: the image, its labels/ listing, each label image with its pyramid."""
    pytest.importorskip("ome_zarr", minversion="0.12")  # zarr v3 / OME-Zarr 0.5 reading
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Labels, Multiscales, Reader

    location = parse_url(str(out))
    assert location is not None and location.version == "0.5"
    nodes = list(Reader(location)())
    image = nodes[0]
    assert image.load(Multiscales) is not None and image.load(Label) is None
    assert [d.shape for d in image.data] == [(3, 40, 150, 150), (3, 40, 75, 75)]
    listing = next(n for n in nodes if n.load(Labels) is not None)
    assert listing.zarr.path.rstrip("/") == f"{str(out).rstrip('/')}/labels"
    assert listing.zarr.root_attrs["labels"] == ["segmentation", "fragments"]
    found = {n.zarr.basename(): n for n in nodes if n.load(Label) is not None}
    assert list(found) == ["segmentation", "fragments"]  # reached through that listing
    seg = found["segmentation"]
    assert seg.zarr.path.rstrip("/") == f"{listing.zarr.path.rstrip('/')}/segmentation"
    assert seg.zarr.root_attrs["image-label"]["source"]["image"] == "../../"
    assert seg.metadata["name"] == "segmentation" and seg.load(Multiscales) is not None
    alone = list(Reader(parse_url(str(out / "labels" / "segmentation")))())
    assert alone[0].zarr.path.rstrip("/") == str(out)  # image-label source: its parent image
    assert [n.zarr.basename() for n in alone if n.visible] == ["segmentation"]
    assert [d.shape for d in seg.data] == [(40, 150, 150), (40, 75, 75)]
    assert [d.dtype for d in seg.data] == [np.uint64, np.uint64]
    ours = open_volume(f"{out}/segmentation")
    level0 = np.asarray(seg.data[0])
    assert level0.max() > 0 and len(np.unique(level0)) > 10  # a real segmentation
    np.testing.assert_array_equal(level0, ours[...])
    np.testing.assert_array_equal(
        np.asarray(seg.data[1]), open_volume(f"{out}/segmentation/1")[...]
    )


def shard_and_inner(array_dir: Path) -> tuple[list[int], list[int]]:
    meta = json.loads((array_dir / "zarr.json").read_text())
    (codec,) = [c for c in meta["codecs"] if c["name"] == "sharding_indexed"]
    return meta["chunk_grid"]["configuration"]["chunk_shape"], codec["configuration"]["chunk_shape"]


def test_arrays_are_sharded_by_block_with_small_inner_chunks(out: Path) -> None:
    """Shards are the engine's blocks (each block task writes one whole shard); inner chunks
    are ≤ 64 voxels per spatial axis and one channel, so a viewer reads little per tile."""
    block = list(BLOCK)
    assert open_volume(f"{out}/affinities").attrs["ssn_deploy"]["settings"]["block_shape"] == block
    assert shard_and_inner(out / "affinities" / "0") == ([3, *block], [1, 32, 64, 64])
    for name in ("segmentation", "fragments", "fragments_faces"):
        assert open_volume(f"{out}/labels/{name}").attrs["ssn_deploy"]["block_shape"] == block
        assert shard_and_inner(out / "labels" / name / "0") == (block, [32, 64, 64])
    # level 1 is 40×75×75: shards clipped to it; 75 is one shard, inner chunks divide it
    assert shard_and_inner(out / "affinities" / "1") == ([3, 32, 75, 75], [1, 32, 25, 25])
    assert shard_and_inner(out / "labels" / "segmentation" / "1") == ([32, 75, 75], [32, 25, 25])
    # a prime side with one shard along it is padded to whole inner chunks
    padded = shard_layout((3, 30, 127, 256), (3, 30, 127, 600))
    assert padded == ((3, 30, 128, 256), (1, 30, 64, 64))
    assert shard_layout((24, 120, 248), (100, 500, 500)) == ((24, 120, 248), (24, 60, 62))


def test_a_whole_shard_write_replaces_a_damaged_shard(tmp_path: Path) -> None:
    """What ``--resume`` does after ``verify`` found a damaged block: zarr would read the old
    shard first and fail on it; a whole-block write replaces it instead."""
    vol = create_volume(str(tmp_path / "v.zarr"), (8, 16, 40), np.uint64, shards=(8, 16, 32),
                        voxel_size=(1, 1, 1))  # fmt: skip
    vol[...] = 1
    (tmp_path / "v.zarr" / "0" / "c" / "0" / "0" / "1").write_bytes(b"damaged")
    vol[:, :, 32:40] = 2  # the last (clipped) shard, whole
    np.testing.assert_array_equal(vol[:, :, 30:], [[[1, 1] + [2] * 8] * 16] * 8)


def test_every_stage_records_model_hash_time_command_and_version(
    medulla_250: Path, tmp_path: Path
) -> None:
    import torch

    from ssn_deploy import __version__
    from ssn_deploy.models import ModelConfig, Normalization, build_model, save_checkpoint

    raw = crop(medulla_250, tmp_path, (32, 64, 64))
    torch.manual_seed(0)
    config = ModelConfig(filters=(4, 8), poolings=((2, 2, 2),), embed_kernel=(3, 3, 3))
    model = tmp_path / "tiny.ckpt"
    save_checkpoint(model, build_model(config), normalization=Normalization(), voxel_size=(10,) * 3)
    before = datetime.now(UTC).replace(microsecond=0)
    geometry = ("--block-shape", "32,64,64", "--fragment-tile", "32,64,64")
    out = tmp_path / "out.zarr"
    run("infer", raw, "-o", out, "--model", model, "--patch-shape", "32,64,64", *geometry,
        "--no-progress", "--no-preview")  # fmt: skip
    for spec in ("affinities", "labels/fragments", "labels/segmentation"):
        meta = open_volume(f"{out}/{spec}").attrs["ssn_deploy"]
        assert meta["model"].endswith("tiny.ckpt"), spec
        assert meta["model_sha256"] == file_sha256(model), spec
        assert meta["version"] == __version__
        assert before <= datetime.fromisoformat(meta["created"]) <= datetime.now(UTC)
        assert isinstance(meta["argv"], list) and meta["argv"]
    # segment into a new store: labels without an image to point at, same model provenance
    run("segment", f"{out}/affinities", "-o", tmp_path / "again.zarr", "--no-progress")
    labels = Labels.from_zarr(zarr.open_group(str(tmp_path / "again.zarr" / "labels"), mode="r"))
    assert labels.label_paths == ["segmentation", "fragments"]
    seg = zarr.open_group(str(tmp_path / "again.zarr" / "labels" / "segmentation"), mode="r")
    assert seg.attrs["ome"]["image-label"] == {}  # no source: again.zarr holds no image
    assert seg.attrs["ssn_deploy"]["model_sha256"] == file_sha256(model)


# --- pyramids on small arrays against an independent numpy reference -------------------------


def _window_ids(shape: tuple[int, ...], factor: tuple[int, ...]) -> tuple[np.ndarray, tuple]:
    """Each voxel's coarse window (flat index) over the last three axes; no padding."""
    coarse = tuple(-(-n // f) for n, f in zip(shape[-3:], factor, strict=True))
    grids = np.meshgrid(*(np.arange(n) // f for n, f in zip(shape[-3:], factor, strict=True)),
                        indexing="ij")  # fmt: skip
    return np.ravel_multi_index(grids, coarse), coarse


def mean_ref(data: np.ndarray, factor: tuple[int, int, int]) -> np.ndarray:
    """Mean over the voxels each window holds (partial windows: only those), rounded."""
    ids, coarse = _window_ids(data.shape, factor)
    counts = np.bincount(ids.ravel(), minlength=int(np.prod(coarse)))
    lead = data.reshape(-1, *data.shape[-3:])
    out = [np.bincount(ids.ravel(), c.ravel().astype(np.float64)) / counts for c in lead]
    return np.rint(np.stack(out)).astype(data.dtype).reshape(*data.shape[:-3], *coarse)


def mode_ref(data: np.ndarray, factor: tuple[int, int, int]) -> np.ndarray:
    """Most frequent label per window (smallest among ties), by counting (window, label)."""
    ids, coarse = _window_ids(data.shape, factor)
    pairs, counts = np.unique(np.stack([ids.ravel(), data.ravel()]), axis=1, return_counts=True)
    order = np.lexsort((pairs[1], -counts, pairs[0]))  # by window, then count desc, then label
    windows, first = np.unique(pairs[0][order], return_index=True)
    assert len(windows) == np.prod(coarse)
    return pairs[1][order][first].astype(data.dtype).reshape(coarse)


def test_pyramid_levels_equal_the_numpy_reference_and_carry_their_transforms(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    shape = (20, 70, 45)  # odd sides: partial windows at the far faces
    labels = rng.integers(1, 4, size=shape, dtype=np.uint64) * 1000  # many ties
    labels[:, :20] = rng.integers(0, 2**40, size=(20, 20, 45), dtype=np.uint64)  # all ties
    image = rng.integers(0, 256, size=(3, *shape), dtype=np.uint8)
    vols = {}
    for name, data in (("labels", labels), ("image", image)):
        vol = create_volume(str(tmp_path / f"{name}.zarr"), data.shape, data.dtype,
                            shards=(*data.shape[:-3], 16, 32, 32), voxel_size=(5, 4, 4),
                            offset=(100, 0, 8))  # fmt: skip
        vol[...] = data
        vols[name] = vol
    with dask_client(None, 2) as client:
        factors = write_pyramid(vols["labels"], client, method="mode", min_side=8)
        assert write_pyramid(vols["image"], client, method="mean", min_side=8) == factors
    # z (5 nm) is halved with y/x (4 nm) while ≥ 16 sections remain; stop at < 16 in y or x
    assert factors == [(1, 1, 1), (2, 2, 2), (2, 4, 4)]
    expect_l, expect_i = labels, image
    for level, (prev, cum) in enumerate(itertools.pairwise(factors), start=1):
        step = tuple(c // p for c, p in zip(cum, prev, strict=True))
        expect_l, expect_i = mode_ref(expect_l, step), mean_ref(expect_i, step)
        got_l = zarr.open_array(str(tmp_path / "labels.zarr" / str(level)), mode="r")[...]
        got_i = zarr.open_array(str(tmp_path / "image.zarr" / str(level)), mode="r")[...]
        np.testing.assert_array_equal(got_l, expect_l)
        np.testing.assert_array_equal(got_i, expect_i)
    group = zarr.open_group(str(tmp_path / "labels.zarr"), mode="r")
    scale, shift = transforms(multiscale(group))[2]
    assert scale == [10.0, 16.0, 16.0] and shift == [102.5, 6.0, 14.0]  # window centres
    Image.from_zarr(group)
    Image.from_zarr(zarr.open_group(str(tmp_path / "image.zarr"), mode="r"))
    assert pyramid_factors((300, 1250, 1250), (40, 4, 4)) == [(1, 2, 2)] * 3 + [(2, 2, 2)]
    assert pyramid_factors((64, 127, 500), (8, 8, 8)) == []


@pytest.mark.parametrize("factor", [(2, 2, 2), (1, 2, 2), (1, 3, 3)])
def test_mode_downsampling_takes_the_most_frequent_id_and_the_smallest_among_ties(factor) -> None:
    """The compiled mode against a direct count per window, on few labels (many ties) and on
    volumes whose sides the factor does not divide (the last voxel repeats)."""
    rng = np.random.default_rng(sum(factor))
    labels = rng.integers(0, 4, (7, 9, 11)).astype(np.uint64) * np.uint64(2**40)
    coarse = downsample_mode(labels, factor)
    assert coarse.shape == tuple(-(-n // f) for n, f in zip(labels.shape, factor, strict=True))
    padded = np.pad(
        labels, [(0, -n % f) for n, f in zip(labels.shape, factor, strict=True)], "edge"
    )
    for index in itertools.product(*(range(n) for n in coarse.shape)):
        window = padded[
            tuple(slice(i * f, (i + 1) * f) for i, f in zip(index, factor, strict=True))
        ]
        ids, counts = np.unique(window, return_counts=True)
        assert coarse[index] == ids[np.argmax(counts)]  # unique sorts: argmax = smallest of ties
