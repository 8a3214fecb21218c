"""ssn-deploy view: a real neuroglancer server on 127.0.0.1 serving an infer output."""

from __future__ import annotations

import io
import json
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ssn_deploy.cli import main
from ssn_deploy.volumes import open_volume

pytest.importorskip("neuroglancer")


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("view")
    runner = CliRunner()
    assert runner.invoke(main, ["sample", str(root), "-q"]).exit_code == 0
    done = runner.invoke(main, ["infer", str(root / "raw.zarr"), "-o", str(root / "o.zarr"),
                                "--model", "intensity", "-q"])  # fmt: skip
    assert done.exit_code == 0, done.output
    return root


def test_viewer_serves_every_layer_at_the_voxel_size(output: Path) -> None:
    from ssn_deploy.view import open_viewer

    viewer = open_viewer(str(output / "o.zarr"))
    url = str(viewer)
    assert url.startswith("http://127.0.0.1:")
    page = urllib.request.urlopen(url, timeout=10).read()
    assert b"neuroglancer" in page.lower()
    layers = {layer.name: layer.visible for layer in viewer.state.layers}
    # raw: the volume infer recorded as its source (an absolute path here)
    assert layers == {"raw": True, "affinities": False, "segmentation": True, "fragments": False}
    assert list(viewer.state.dimensions.scales) == pytest.approx([1e-8] * 3)  # 10 nm
    base = url.split("/v/")[0]
    token = viewer.state.layers["segmentation"].source[0].url.rstrip("/").rsplit("/", 1)[-1]
    info = json.loads(urllib.request.urlopen(f"{base}/neuroglancer/info/{token}").read())
    assert info["volumeType"] == "segmentation" and info["shape"] == [80, 160, 160]
    chunk = urllib.request.urlopen(
        f"{base}/neuroglancer/npz/{token}/1,1,1/0,0,0/16,32,32", timeout=30
    ).read()
    data = np.load(io.BytesIO(zlib.decompress(chunk)))  # neuroglancer's "npz": zlib'd .npy
    expected = open_volume(str(output / "o.zarr" / "segmentation"))[0:16, 0:32, 0:32]
    assert np.array_equal(data.reshape(expected.shape), expected)


def test_view_without_outputs_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty.zarr").mkdir()
    result = CliRunner().invoke(main, ["view", str(tmp_path / "empty.zarr")])
    assert result.exit_code == 1 and result.output.startswith("error:")


def test_export_precomputed_round_trips_labels_and_images(output: Path, tmp_path: Path) -> None:
    import tensorstore as ts

    runner = CliRunner()
    for name, kind in (("segmentation", "segmentation"), ("affinities", "image")):
        dest = tmp_path / name
        done = runner.invoke(main, ["export-precomputed", str(output / "o.zarr" / name), str(dest)])
        assert done.exit_code == 0, done.output
        info = json.loads((dest / "info").read_text())
        assert info["type"] == kind and info["scales"][0]["resolution"] == [10.0, 10.0, 10.0]
        stored = open_volume(str(output / "o.zarr" / name))
        back = ts.open({"driver": "neuroglancer_precomputed",
                        "kvstore": {"driver": "file", "path": str(dest)}}).result()  # fmt: skip
        data = np.asarray(back[...].read().result())  # x, y, z, channel
        expected = np.asarray(stored[:])
        expected = expected[None] if expected.ndim == 3 else expected
        assert np.array_equal(np.transpose(data, (3, 2, 1, 0)), expected)
    again = runner.invoke(main, ["export-precomputed", str(output / "o.zarr" / "segmentation"),
                                 str(tmp_path / "segmentation")])  # fmt: skip
    assert again.exit_code == 1 and "--overwrite" in again.output
