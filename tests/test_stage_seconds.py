"""``infer`` reports its wall time split by stage (``stage_seconds``), for benchmarks."""

from __future__ import annotations

import time

from click.testing import CliRunner

from ssn_deploy.cli import main
from ssn_deploy.inference.scheduling import recording_stages, timed_stage
from ssn_deploy.pipeline import INFER_STAGES, infer

STAGES = list(INFER_STAGES)


def test_timed_stage_adds_up_by_name_and_records_nothing_outside() -> None:
    with timed_stage("ignored"):  # no recording around it: a no-op
        pass
    seconds: dict[str, float] = {}
    with recording_stages(seconds):
        for _ in range(2):
            with timed_stage("a"):
                time.sleep(0.01)
    assert list(seconds) == ["a"] and seconds["a"] >= 0.02
    with timed_stage("b"):
        pass
    assert "b" not in seconds


def test_infer_splits_its_whole_wall_time_into_stages(tmp_path) -> None:
    assert CliRunner().invoke(main, ["sample", str(tmp_path / "s"), "-q"]).exit_code == 0
    start = time.perf_counter()
    result = infer(
        str(tmp_path / "s" / "raw.zarr"), str(tmp_path / "o.zarr"), model="intensity",
        progress=False,
    )  # fmt: skip
    wall = time.perf_counter() - start
    stages = result["stage_seconds"]
    assert list(stages) == STAGES
    assert all(v >= 0 for v in stages.values())
    assert abs(sum(stages.values()) - wall) < 0.05
    assert set(result["timings"]) == {"affinities_s", "segmentation_s"}  # unchanged
