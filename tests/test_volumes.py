"""volumes.py and ``ssn-deploy convert`` on the real EM volumes: formats, metadata, errors."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tensorstore as ts
import tifffile
import zarr
from click.testing import CliRunner

from ssn_deploy import volumes
from ssn_deploy.cli import main
from ssn_deploy.errors import (
    CorruptDataError,
    InputNotFoundError,
    InvalidInputError,
    OutputExistsError,
    VoxelSizeError,
)
from ssn_deploy.geometry import Box
from ssn_deploy.volumes import (
    choose_chunks,
    convert,
    create_volume,
    open_volume,
    require_volume,
)
from tests.conftest import sha256

RAW = "volumes/raw"
LABELS = "volumes/labels/neuron_ids"


def h5_read(path: Path, dataset: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[dataset][:]


def ts_read(array_dir: Path) -> np.ndarray:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(array_dir)}}
    return ts.open(spec).result().read().result()


def ome_multiscale(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_cli_error(result, message: str) -> None:
    """Exit 1, exactly one ``error: ...`` line on stderr, no traceback."""
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [f"error: {message}"]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def tiny_raw(tiny_train: Path) -> np.ndarray:
    return h5_read(tiny_train, RAW)


# --- convert on the real volumes --------------------------------------------------------------


def test_convert_cli_medulla_raw(medulla_250: Path, tmp_path: Path) -> None:
    before = sha256(medulla_250)
    out = tmp_path / "raw.zarr"
    result = run_cli("convert", f"{medulla_250}:{RAW}", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"wrote {out}: shape (250, 250, 250), uint8, voxel size 10x10x10 nm, chunks (128, 128, 128)"
    )
    expected = h5_read(medulla_250, RAW)
    np.testing.assert_array_equal(zarr.open_array(str(out), path="0", mode="r")[:], expected)
    np.testing.assert_array_equal(ts_read(out / "0"), expected)
    multiscale = ome_multiscale(out)
    scale = multiscale["datasets"][0]["coordinateTransformations"][0]
    assert scale == {"type": "scale", "scale": [10.0, 10.0, 10.0]}
    assert [a["unit"] for a in multiscale["axes"]] == ["nanometer"] * 3
    assert [a["name"] for a in multiscale["axes"]] == ["z", "y", "x"]
    provenance = open_volume(str(out)).attrs["ssn_deploy"]
    assert provenance["source"] == f"{medulla_250}:{RAW}"
    assert provenance["version"]
    assert sha256(medulla_250) == before


def test_convert_console_script_medulla_labels(medulla_250: Path, tmp_path: Path) -> None:
    before = sha256(medulla_250)
    out = tmp_path / "labels.zarr"
    script = Path(sys.executable).parent / "ssn-deploy"
    proc = subprocess.run(
        [str(script), "convert", f"{medulla_250}:{LABELS}", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "uint64" in proc.stdout and "chunks (64, 64, 64)" in proc.stdout
    expected = h5_read(medulla_250, LABELS)
    from_ts = ts_read(out / "0")
    assert from_ts.dtype == np.uint64
    np.testing.assert_array_equal(from_ts, expected)
    np.testing.assert_array_equal(zarr.open_array(str(out / "0"), mode="r")[:], expected)
    assert open_volume(str(out)).voxel_size == (10.0, 10.0, 10.0)
    assert sha256(medulla_250) == before


def test_convert_help_explains_specs() -> None:
    result = run_cli("convert", "--help")
    assert result.exit_code == 0
    assert "ssn-deploy convert data.hdf:volumes/raw raw.zarr" in result.output
    assert "FILE.hdf:DATASET" in result.output and "--voxel-size" in result.output


def test_convert_vnc_chooses_anisotropic_chunks(vnc: Path, tmp_path: Path) -> None:
    before = sha256(vnc)
    out = convert(f"{vnc}:{RAW}", str(tmp_path / "vnc.zarr"), progress=False)
    assert out.voxel_size == (50.0, 4.6, 4.6)
    z, y, x = out.chunks
    assert z < y == x and z <= 20
    scale = ome_multiscale(tmp_path / "vnc.zarr")["datasets"][0]["coordinateTransformations"][0]
    assert scale["scale"] == [50.0, 4.6, 4.6]
    np.testing.assert_array_equal(out.read(), h5_read(vnc, RAW))
    assert sha256(vnc) == before


def test_convert_blockwise_copies_exactly(tiny_train: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(volumes, "COPY_BLOCK_BYTES", 16 * 32 * 32 * 8)
    out = convert(f"{tiny_train}:{LABELS}", str(tmp_path / "l.zarr"), chunks=(16, 32, 32))
    assert out.chunks == (16, 32, 32)
    np.testing.assert_array_equal(out.read(), h5_read(tiny_train, LABELS))


def test_an_interrupted_convert_is_refused_as_input(tiny_train: Path, tmp_path, monkeypatch):
    """A convert killed after its first blocks leaves a volume that is mostly zeros: reading
    it is refused (one line) until convert is rerun with --overwrite."""
    monkeypatch.setattr(volumes, "COPY_BLOCK_BYTES", 16 * 32 * 32 * 8)
    out = str(tmp_path / "l.zarr")
    calls = {"n": 0}
    original = volumes._tile

    def dying_tile(*args):
        for box in original(*args):
            calls["n"] += 1
            if calls["n"] > 2:
                raise KeyboardInterrupt  # like Ctrl-C or a kill between blocks
            yield box

    monkeypatch.setattr(volumes, "_tile", dying_tile)
    with pytest.raises(KeyboardInterrupt):
        convert(f"{tiny_train}:{LABELS}", out, chunks=(16, 32, 32))
    with pytest.raises(CorruptDataError, match=r"incomplete: the ssn-deploy convert .*--overwrite"):
        open_volume(out)
    monkeypatch.setattr(volumes, "_tile", original)
    done = convert(f"{tiny_train}:{LABELS}", out, chunks=(16, 32, 32), overwrite=True)
    np.testing.assert_array_equal(done.read(), h5_read(tiny_train, LABELS))
    assert open_volume(out).attrs["ssn_deploy"]["complete"] is True


def test_copy_blocks_tile_chunk_aligned_within_budget() -> None:
    shape, chunks, budget = (50, 100, 200), (16, 32, 32), 16 * 32 * 96
    seen = np.zeros(shape, int)
    block_shape = volumes._copy_block_shape(shape, chunks, 1, budget)
    assert block_shape == (16, 32, 96)
    for block in volumes._tile(shape, block_shape):
        seen[block] += 1
        assert all(s.start % c == 0 for s, c in zip(block, chunks, strict=True))
        assert np.prod([s.stop - s.start for s in block]) <= budget
    assert (seen == 1).all()


def test_convert_overwrite(tiny_train: Path, tmp_path: Path) -> None:
    before = sha256(tiny_train)
    out = tmp_path / "o.zarr"
    assert run_cli("convert", f"{tiny_train}:{RAW}", str(out), "--no-progress").exit_code == 0
    result = run_cli("convert", f"{tiny_train}:{LABELS}", str(out), "--no-progress")
    assert_cli_error(result, f"{out} already exists; pass --overwrite to replace it")
    result = run_cli("convert", f"{tiny_train}:{LABELS}", str(out), "--overwrite", "--no-progress")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(open_volume(str(out)).read(), h5_read(tiny_train, LABELS))
    assert sha256(tiny_train) == before


def test_convert_voxel_size_and_chunks_options(tiny_train: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.zarr"
    args = ["--voxel-size", "40,4,4", "--chunks", "8,50,50", "--no-progress"]
    result = run_cli("convert", f"{tiny_train}:{RAW}", str(out), *args)
    assert result.exit_code == 0, result.output
    vol = open_volume(str(out))
    assert (vol.voxel_size, vol.chunks) == ((40.0, 4.0, 4.0), (8, 50, 50))


# --- round trips through every format ---------------------------------------------------------


def test_hdf5_read_write_and_offset(tiny_train: Path, tmp_path: Path, tiny_raw) -> None:
    copy = tmp_path / "copy.hdf"
    copy.write_bytes(tiny_train.read_bytes())
    with h5py.File(copy, "r+") as f:
        f[RAW].attrs["offset"] = [100.0, 20.0, 30.0]
    with open_volume(f"{copy}:{RAW}", mode="r+") as vol:
        assert vol.offset == (100.0, 20.0, 30.0) and vol.format == "hdf5"
        vol[1:3, :5, :5] = 7
    with open_volume(f"{copy}/{RAW}") as vol:
        expected = tiny_raw.copy()
        expected[1:3, :5, :5] = 7
        np.testing.assert_array_equal(vol.read(), expected)
        with pytest.raises(PermissionError, match="read-only"):
            vol[0, 0, 0] = 1


def test_plain_zarr_round_trip(tmp_path: Path, tiny_raw) -> None:
    spec = str(tmp_path / "p.zarr")
    vol = create_volume(
        spec, tiny_raw.shape, "uint8", voxel_size=(40, 4, 4), offset=(400, 40, 40), ome=False
    )
    vol[:] = tiny_raw
    again = open_volume(spec)
    assert (again.voxel_size, again.offset) == ((40.0, 4.0, 4.0), (400.0, 40.0, 40.0))
    assert again.attrs["axes"] == ["z", "y", "x"] and again.format == "zarr"
    np.testing.assert_array_equal(again.read(), tiny_raw)


def test_plain_zarr_resolution_attribute(tmp_path: Path) -> None:
    zarr.create_array(
        str(tmp_path / "r.zarr"), shape=(2, 3, 4), dtype="u1", attributes={"resolution": [8, 4, 4]}
    )
    assert open_volume(str(tmp_path / "r.zarr")).voxel_size == (8.0, 4.0, 4.0)


def test_ome_zarr_multichannel_in_nested_group(tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((3, 10, 20, 30), dtype=np.float32)
    spec = f"{tmp_path / 'pred.zarr'}:affinities"
    vol = create_volume(
        spec,
        data.shape,
        "float32",
        voxel_size=(10, 10, 10),
        offset=(5, 0, 0),
        attrs={"model": "unet"},
    )
    vol[:] = data
    for s in (spec, f"{tmp_path / 'pred.zarr'}/affinities"):
        again = open_volume(s)
        assert (again.voxel_size, again.offset) == ((10.0, 10.0, 10.0), (5.0, 0.0, 0.0))
        assert again.chunks[0] == 3 and again.attrs["model"] == "unet"
        np.testing.assert_array_equal(again.read(), data)
    axes = ome_multiscale(tmp_path / "pred.zarr" / "affinities")["axes"]
    assert axes[0] == {"name": "c", "type": "channel"}
    np.testing.assert_array_equal(ts_read(tmp_path / "pred.zarr" / "affinities" / "0"), data)


def test_ngff_04_top_level_multiscales_in_micrometers(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "v04.zarr"), mode="w", zarr_format=2)
    group.create_array("s0", shape=(4, 5, 6), dtype="u1")
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    transforms = [
        {"type": "scale", "scale": [0.05, 0.004, 0.004]},
        {"type": "translation", "translation": [1.0, 0.0, 0.0]},
    ]
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": axes,
            "datasets": [{"path": "s0", "coordinateTransformations": transforms}],
        }
    ]
    vol = open_volume(str(tmp_path / "v04.zarr"))
    assert (vol.shape, vol.format) == ((4, 5, 6), "ome-zarr")
    assert (vol.voxel_size, vol.offset) == ((50.0, 4.0, 4.0), (1000.0, 0.0, 0.0))


def write_n5(container: Path, data: np.ndarray, attrs: dict) -> None:
    """An N5 dataset as Java tools write it: dimensions and attributes in x,y,z order."""
    store = ts.open(
        {
            "driver": "n5",
            "kvstore": {"driver": "file", "path": str(container)},
            "path": "volumes/raw",
            "metadata": {
                "dimensions": list(data.shape[::-1]),
                "blockSize": [64, 32, 8],
                "dataType": str(data.dtype),
                "compression": {"type": "gzip"},
            },
        },
        create=True,
    ).result()
    store.write(data.T).result()
    meta_file = container / "volumes" / "raw" / "attributes.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), **attrs}))


@pytest.mark.parametrize(
    "attrs",
    [
        {"pixelResolution": {"dimensions": [4.0, 5.0, 40.0], "unit": "nm"}},
        {"resolution": [4.0, 5.0, 40.0]},
    ],
)
def test_n5_read_write(tmp_path: Path, tiny_raw, attrs: dict) -> None:
    write_n5(tmp_path / "x.n5", tiny_raw, attrs)
    vol = open_volume(f"{tmp_path / 'x.n5'}:volumes/raw", mode="r+")
    assert (vol.shape, vol.voxel_size, vol.chunks) == (
        tiny_raw.shape,
        (40.0, 5.0, 4.0),
        (8, 32, 64),
    )
    np.testing.assert_array_equal(vol.read(), tiny_raw)
    np.testing.assert_array_equal(vol[-3:, 5, -80:], tiny_raw[-3:, 5, -80:])
    vol[0, :2, :2] = 9
    assert (open_volume(f"{tmp_path / 'x.n5'}:volumes/raw")[0, :2, :2] == 9).all()


def test_tiff_stack_and_directory(tmp_path: Path, tiny_raw) -> None:
    tifffile.imwrite(tmp_path / "stack.tif", tiny_raw)
    sections = tmp_path / "sections"
    sections.mkdir()
    for z, section in enumerate(tiny_raw[:12]):
        tifffile.imwrite(sections / f"s{z}.tif", section)
    before = sha256(tmp_path)
    stack = open_volume(str(tmp_path / "stack.tif"), voxel_size=(40, 4, 4))
    assert stack.voxel_size == (40.0, 4.0, 4.0) and stack.chunks == (1, 100, 200)
    np.testing.assert_array_equal(stack.read(), tiny_raw)
    np.testing.assert_array_equal(stack[7, 3:9, -5:], tiny_raw[7, 3:9, -5:])
    directory = open_volume(str(sections))
    assert directory.voxel_size is None
    np.testing.assert_array_equal(directory.read(), tiny_raw[:12])  # s10 sorts after s9
    np.testing.assert_array_equal(directory[2:11:3, 1], tiny_raw[2:11:3, 1])
    assert sha256(tmp_path) == before


def test_tiff_convert_needs_voxel_size(tmp_path: Path, tiny_raw) -> None:
    tifffile.imwrite(tmp_path / "stack.tif", tiny_raw)
    before = sha256(tmp_path / "stack.tif")
    src, out = str(tmp_path / "stack.tif"), str(tmp_path / "o.zarr")
    with pytest.raises(VoxelSizeError) as err:
        convert(src, out, progress=False)
    assert str(err.value) == f"{src} has no voxel size; pass --voxel-size Z,Y,X (nm)"
    assert_cli_error(run_cli("convert", src, out), str(err.value))
    result = run_cli("convert", src, out, "--voxel-size", "50,4.6,4.6", "--no-progress")
    assert result.exit_code == 0, result.output
    vol = open_volume(out)
    assert vol.voxel_size == (50.0, 4.6, 4.6)
    np.testing.assert_array_equal(vol.read(), tiny_raw)
    assert sha256(tmp_path / "stack.tif") == before


def test_fsspec_memory_and_file_urls(tiny_train: Path, tmp_path: Path, tiny_raw) -> None:
    out = convert(f"{tiny_train}:{RAW}", "memory://ssn-test/raw.zarr", progress=False)
    assert out.voxel_size == (10.0, 10.0, 10.0)
    np.testing.assert_array_equal(open_volume("memory://ssn-test/raw.zarr").read(), tiny_raw)
    with pytest.raises(OutputExistsError):
        convert(f"{tiny_train}:{RAW}", "memory://ssn-test/raw.zarr", progress=False)
    url = f"file://{tmp_path / 'f.zarr'}"
    create_volume(url, (2, 3, 4), "uint16", voxel_size=(1, 1, 1))[:] = 5
    assert (open_volume(url).read() == 5).all()


def test_box_indexing_dask_and_pickle(tiny_train: Path, tmp_path: Path, tiny_raw) -> None:
    vol = convert(
        f"{tiny_train}:{RAW}", str(tmp_path / "b.zarr"), chunks=(16, 32, 64), progress=False
    )
    box = Box((3, 10, 20), (5, 40, 60))
    np.testing.assert_array_equal(vol[box], tiny_raw[3:8, 10:50, 20:80])
    vol[box] = 0
    assert not vol[box].any() and vol[2, 10, 20] == tiny_raw[2, 10, 20]
    with pytest.raises(IndexError, match="outside"):
        vol[Box((-1, 0, 0), (2, 2, 2))]
    lazy = vol.to_dask()
    assert lazy.chunksize == (16, 32, 64)
    np.testing.assert_array_equal(lazy.compute(), vol.read())
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(vol)).read(), vol.read())


def test_box_on_channels_first_volume(tmp_path: Path) -> None:
    vol = create_volume(str(tmp_path / "a.zarr"), (3, 4, 5, 6), "float32", voxel_size=(1, 1, 1))
    vol[Box((1, 1, 1), (2, 2, 2))] = 1.0
    assert vol.read().sum() == 3 * 8 and vol[Box((0, 0, 0), (4, 5, 6))].shape == (3, 4, 5, 6)


def test_choose_chunks() -> None:
    assert choose_chunks((250, 250, 250), (10, 10, 10), np.uint8) == (128, 128, 128)
    assert choose_chunks((250, 250, 250), (10, 10, 10), np.uint64) == (64, 64, 64)
    assert choose_chunks((20, 1024, 1024), (50, 4.6, 4.6), np.uint8) == (20, 256, 256)
    assert choose_chunks((3, 500, 500, 500), (10, 10, 10), np.float32) == (3, 64, 64, 64)
    assert choose_chunks((10, 20, 30), None, np.uint8) == (10, 20, 30)
    chunks = choose_chunks((4000, 4000, 4000), (40, 4, 4), np.uint8)
    assert chunks[0] * 10 == chunks[1] * 1.25 == chunks[2] * 1.25  # 32 x 256 x 256


# --- errors -----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match=r"^.*nope\.hdf: no such file$"):
        open_volume(f"{tmp_path / 'nope.hdf'}:{RAW}")
    with pytest.raises(InputNotFoundError, match=r"nope\.zarr: no such zarr store$"):
        open_volume(str(tmp_path / "nope.zarr"))
    result = run_cli("convert", str(tmp_path / "nope.tif"), str(tmp_path / "o.zarr"))
    assert_cli_error(result, f"{tmp_path / 'nope.tif'}: no such file")


def test_missing_dataset_lists_alternatives(medulla_250: Path, tmp_path: Path) -> None:
    before = sha256(medulla_250)
    message = (
        f"{medulla_250} has no dataset 'volumes/rw'; "
        "available: volumes/labels/neuron_ids, volumes/raw"
    )
    with pytest.raises(InputNotFoundError) as err:
        open_volume(f"{medulla_250}:volumes/rw")
    assert str(err.value) == message
    assert_cli_error(
        run_cli("convert", f"{medulla_250}:volumes/rw", str(tmp_path / "o.zarr")), message
    )
    with pytest.raises(InputNotFoundError, match="needs a dataset: name it as PATH:NAME"):
        open_volume(str(medulla_250))
    store = tmp_path / "s.zarr"
    create_volume(f"{store}:raw", (2, 2, 2), "u1", voxel_size=(1, 1, 1))
    create_volume(f"{store}:labels", (2, 2, 2), "u8", voxel_size=(1, 1, 1), ome=False)
    with pytest.raises(InputNotFoundError) as err:
        open_volume(f"{store}:lables")
    assert str(err.value) == f"{store} has no dataset 'lables'; available: labels, raw"
    with pytest.raises(InputNotFoundError, match="group without OME-Zarr multiscales"):
        open_volume(str(store))
    assert sha256(medulla_250) == before


def test_wrong_rank_and_dtype(tmp_path: Path) -> None:
    flat = tmp_path / "flat.zarr"
    zarr.create_array(str(flat), shape=(4, 5), dtype="u1")
    with pytest.raises(InvalidInputError) as err:
        convert(str(flat), str(tmp_path / "o.zarr"), voxel_size=(1, 1, 1))
    assert str(err.value) == f"{flat}: expected a 3D or 4D volume, got 2D with shape (4, 5)"
    five = tmp_path / "five.zarr"
    zarr.create_array(str(five), shape=(1, 2, 3, 4, 5), dtype="u1")
    result = run_cli("convert", str(five), str(tmp_path / "o.zarr"), "--voxel-size", "1,1,1")
    assert_cli_error(
        result, f"{five}: expected a 3D or 4D volume, got 5D with shape (1, 2, 3, 4, 5)"
    )
    vol = create_volume(str(tmp_path / "f.zarr"), (2, 2, 2), "float64", voxel_size=(1, 1, 1))
    with pytest.raises(InvalidInputError) as err:
        require_volume(vol, ndim=3, dtypes=["uint8", "float32"])
    assert str(err.value) == f"{vol.spec}: expected dtype uint8 or float32, got float64"
    with pytest.raises(
        InvalidInputError, match=r"expected a 4D volume, got 3D with shape \(2, 2, 2\)"
    ):
        require_volume(vol, ndim=4)


def test_output_guards(tiny_train: Path, tmp_path: Path) -> None:
    src = f"{tiny_train}:{RAW}"
    with pytest.raises(InvalidInputError, match=r"written as zarr; name the output PATH\.zarr"):
        convert(src, str(tmp_path / "out.h5"))
    folder = tmp_path / "mine.zarr"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="is not zarr; refusing to delete it"):
        convert(src, str(folder), overwrite=True, progress=False)
    assert (folder / "notes.txt").read_text() == "precious"
    vol = convert(src, str(tmp_path / "in.zarr"), progress=False)
    with pytest.raises(InvalidInputError, match="overlaps the input"):
        convert(f"{tmp_path / 'in.zarr'}", f"{tmp_path / 'in.zarr'}:copy", overwrite=True)
    assert vol.read().any()


def test_corrupt_chunk_names_it(tiny_train: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.zarr"
    convert(f"{tiny_train}:{RAW}", str(out), chunks=(16, 32, 64), progress=False)
    (out / "0" / "c" / "1" / "2" / "0").write_bytes(b"definitely not blosc")
    vol = open_volume(str(out))
    assert vol[:16].shape == (16, 100, 200)  # other chunks still read
    with pytest.raises(CorruptDataError) as err:
        vol[10:30, 70:, :50]
    message = str(err.value)
    assert message.startswith(f"{out}: chunk c/1/2/0 ({out}/0/c/1/2/0) cannot be decoded")
    result = run_cli("convert", str(out), str(tmp_path / "d.zarr"), "--no-progress")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.stderr.splitlines()) == 1
    assert f"error: {out}: chunk c/1/2/0 ({out}/0/c/1/2/0) cannot be decoded" in result.stderr


def test_convert_roi_copies_a_region_and_shifts_the_offset(medulla_250, tmp_path):
    digest = sha256(medulla_250)
    out = tmp_path / "test_region.zarr"
    spec = f"{medulla_250}:volumes/raw"
    result = CliRunner().invoke(main, ["convert", spec, str(out), "--roi", "125:,10:20,:"])
    assert result.exit_code == 0, result.output
    vol = open_volume(str(out))
    with h5py.File(medulla_250, "r") as f:
        np.testing.assert_array_equal(vol.read(), f["volumes/raw"][125:, 10:20, :])
    assert vol.offset == (1250.0, 100.0, 0.0)
    bad = CliRunner().invoke(
        main, ["convert", spec, str(tmp_path / "x.zarr"), "--roi", "0:300,:,:"]
    )
    assert bad.exit_code == 1
    assert "outside the volume (250, 250, 250)" in bad.output
    assert sha256(medulla_250) == digest
