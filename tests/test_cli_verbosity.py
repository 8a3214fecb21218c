"""-v and -q work before or after the command name, for every command (serve's included)."""

from __future__ import annotations

import logging

import click
import pytest
from click.testing import CliRunner

from ssn_deploy.cli import main


def commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out += commands(command, (*prefix, name))
        else:
            out.append((*prefix, name))
    return out


@pytest.mark.parametrize("path", commands(main))
def test_every_command_takes_verbose_and_quiet_after_its_name(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "-v, --verbose" in result.output and "-q, --quiet" in result.output


@pytest.mark.parametrize(
    ("args", "level"),
    [([], logging.WARNING), (["-v"], logging.INFO), (["-vv"], logging.DEBUG),
     (["-q"], logging.ERROR)],
)  # fmt: skip
@pytest.mark.parametrize("where", ["before", "after"])
def test_log_level_and_progress_follow_the_flags(tmp_path, args, level, where) -> None:
    """``ssn-deploy sample`` (the quickest real command) at each verbosity, flags on either
    side of its name; -q also turns progress bars off."""
    root = logging.getLogger()
    saved = root.level
    try:
        argv = [*args, "sample", str(tmp_path / "s")] if where == "before" else [
            "sample", str(tmp_path / "s"), *args]  # fmt: skip
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 0, result.output
        assert root.level == level
    finally:
        root.setLevel(saved)


def test_quiet_turns_progress_off() -> None:
    seen = {}

    @click.command(cls=main.command_class)
    @click.option("--no-progress", is_flag=True)
    def probe(no_progress: bool) -> None:
        seen["no_progress"] = no_progress

    main.add_command(probe, "probe-quiet")
    try:
        assert CliRunner().invoke(main, ["probe-quiet", "-q"]).exit_code == 0
        assert seen["no_progress"] is True
        assert CliRunner().invoke(main, ["probe-quiet"]).exit_code == 0
        assert seen["no_progress"] is False
    finally:
        main.commands.pop("probe-quiet")


def test_infer_and_verify_print_json_for_pipelines(tmp_path) -> None:
    import json

    runner = CliRunner()
    assert runner.invoke(main, ["sample", str(tmp_path / "s"), "-q"]).exit_code == 0
    out = tmp_path / "o.zarr"
    result = runner.invoke(main, ["infer", str(tmp_path / "s" / "raw.zarr"), "-o", str(out),
                                  "--model", "intensity", "--json", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["voxels"] == 80 * 160 * 160 and report["seconds"] > 0
    assert set(report["timings"]) == {"affinities_s", "segmentation_s"}
    checked = runner.invoke(main, ["verify", str(out), "--json"])
    assert checked.exit_code == 0, checked.output
    stages = json.loads(checked.stdout)
    assert set(stages) == {"affinities", "fragments", "segmentation"}
    assert all(not r["damaged"] and r["finished"] == r["blocks"] for r in stages.values())


def test_freed_memory_goes_back_promptly_unless_the_environment_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """glibc's mmap and trim thresholds are fixed (4 MiB, 64 KiB; lower peak RSS at the same
    speed, benchmarks/scaling.py); thresholds the user set are left to glibc."""
    import ctypes.util

    from ssn_deploy.memory import trim_freed_memory_promptly

    glibc = ctypes.util.find_library("c") is not None
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert trim_freed_memory_promptly() is glibc
    monkeypatch.setenv("SSN_DEPLOY_MALLOC_TRIM", "0")
    assert trim_freed_memory_promptly() is False
    monkeypatch.delenv("SSN_DEPLOY_MALLOC_TRIM")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    assert trim_freed_memory_promptly() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert trim_freed_memory_promptly() is False
