"""The Python API: the README's example runs as written; numpy and dask inputs agree."""

from __future__ import annotations

import re
from pathlib import Path

import dask.array as da
import numpy as np

import ssn_deploy
from ssn_deploy.sample import load_sample

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys) -> None:
    text = README.read_text()
    section = text[text.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # the documented example, verbatim
    assert namespace["seg"].dtype == np.uint64 and namespace["seg"].shape == (32, 96, 96)
    # the same affinities through segment at infer's threshold: the same partition
    assert ssn_deploy.evaluate(namespace["again"], namespace["seg"])["voi"] == 0
    assert 0 < namespace["scores"]["voi"] < 2
    assert "VOI" in capsys.readouterr().out


def test_numpy_and_dask_inputs_agree_and_paths_work(tmp_path: Path) -> None:
    raw = load_sample()["raw"][:24, :64, :64]
    a = ssn_deploy.infer(raw, voxel_size=(10, 10, 10), model="intensity")
    b = ssn_deploy.infer(da.from_array(raw, chunks=(8, 32, 32)), voxel_size=(10, 10, 10),
                         model="intensity")  # fmt: skip
    assert np.array_equal(a["segmentation"], b["segmentation"])
    assert np.array_equal(a["affinities"], b["affinities"])
    written = ssn_deploy.infer(raw, str(tmp_path / "out.zarr"), voxel_size=(10, 10, 10),
                               model="intensity")  # fmt: skip
    assert Path(written["segmentation"]).exists()
    on_disk = ssn_deploy.segment(written["affinities"])
    assert np.array_equal(on_disk, a["segmentation"]), "segment repeats infer from provenance"
    scores = ssn_deploy.evaluate(written["segmentation"], a["segmentation"])
    assert scores["voi"] == 0
