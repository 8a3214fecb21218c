"""Faults at every stage (issue: Reliability): kill -9, a full disk, a read-only directory.

Each case runs the real ``ssn-deploy`` as a subprocess on a 32×64×64 crop of real FIB-SEM
data (the intensity baseline, 16 blocks) and injects the fault through
``tests/fault_injection/sitecustomize.py`` (zarr's own writes fail or the process SIGKILLs
itself at a chosen write; nothing in ssn_deploy knows about it), or kills it from outside.
Then the output must be continued to a result bit-identical (every array) to an uninterrupted
run, or the command must have ended in one line ``error: …`` with exit status 1, and every
input file must still have its sha256.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner, Result

from ssn_deploy.cli import main
from ssn_deploy.models import ModelConfig, Normalization, build_model, save_checkpoint
from ssn_deploy.volumes import create_volume
from tests.conftest import sha256

REPO = Path(__file__).resolve().parents[1]
HOOK = REPO / "tests" / "fault_injection"
INFER = ["--model", "intensity", "--block-shape", "8,32,32", "--fragment-tile", "8,32,32",
         "--no-progress", "--no-preview"]  # fmt: skip
CONVERT = ["--chunks", "8,32,32", "--no-progress"]


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory, medulla_250: Path) -> Path:
    return workspace(tmp_path_factory, medulla_250)


def workspace(tmp_path_factory: pytest.TempPathFactory, medulla_250: Path) -> Path:
    """Inputs (an HDF5 crop and its zarr copy) and the uninterrupted outputs to compare with."""
    root = tmp_path_factory.mktemp("faults")
    with h5py.File(medulla_250, "r") as f:
        raw = f["volumes/raw"][:32, :64, :64]
    with h5py.File(root / "crop.hdf", "w") as f:
        f.create_dataset("raw", data=raw).attrs["resolution"] = [10.0, 10.0, 10.0]
    create_volume(str(root / "raw.zarr"), raw.shape, raw.dtype, voxel_size=(10, 10, 10))[...] = raw
    ok(cli(["infer", root / "raw.zarr", "-o", root / "ref.zarr", *INFER]))
    ok(cli(["convert", f"{root / 'crop.hdf'}:raw", root / "ref_convert.zarr", *CONVERT]))
    return root


@pytest.fixture
def inputs(w: Path) -> Iterator[dict[Path, str]]:
    """Every input's sha256 before the test; checked unchanged after it."""
    before = {p: sha256(p) for p in (w / "crop.hdf", w / "raw.zarr")}
    yield before
    assert {p: sha256(p) for p in before} == before, "an input changed"


def cli(args: list[object]) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="ssn-deploy")


def ok(result: Result) -> Result:
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def one_line_error(stderr: str, returncode: int, *expected: str) -> str:
    """The command failed with exactly one line ``error: …`` that contains ``expected``."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def ssn_deploy() -> list[str]:
    script = Path(sys.executable).with_name("ssn-deploy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ssn_deploy.cli"]


def fault_env(fault: str | None) -> dict[str, str]:
    """This environment plus the fault hook on PYTHONPATH, armed with ``fault``."""
    path = os.pathsep.join(filter(None, [str(HOOK), str(REPO), os.environ.get("PYTHONPATH")]))
    return os.environ | {"PYTHONPATH": path, "SSN_TEST_FAULT": fault or ""}


def spawn(args: list[object], fault: str | None, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ssn_deploy() + [str(a) for a in args], cwd=cwd, env=fault_env(fault),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def run(args: list[object], fault: str | None, cwd: Path) -> subprocess.CompletedProcess:
    process = spawn(args, fault, cwd)
    _, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, "", stderr)


def finished_blocks(out: Path, stage: str) -> int:
    """Blocks of ``stage`` marked finished so far (one marker file each)."""
    return len([p for p in out.rglob(f"{stage}/done/c/**/*") if p.is_file()])


def arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array under a zarr store by its path (attributes, e.g. creation times, left out)."""
    root = zarr.open_group(str(path), mode="r")
    return {name: node[...] for name, node in root.members(max_depth=None)
            if isinstance(node, zarr.Array)}  # fmt: skip


def assert_identical(reference: Path, output: Path) -> None:
    want, got = arrays(reference), arrays(output)
    assert sorted(got) == sorted(want)
    differ = [name for name in want if not np.array_equal(want[name], got[name])]
    assert not differ, f"arrays that differ from the uninterrupted run: {differ}"
    assert not list(output.rglob("*.partial")), "temporary files of a killed write are left"


# --- kill -9 during each stage, then --resume


STAGE_KILLS = {
    # the process SIGKILLs itself at the N-th zarr write whose path contains the pattern
    # (affinities: killed from outside, below)
    "fragments: halfway through writing a shard": "killmid:fragments/0/c/:4",
    "segmentation: block written, not yet marked": "kill:segmentation/done/c/:5",
    "segmentation: group created, array not yet": "kill:segmentation/0/zarr.json:1",
}
LATER = {"affinities": "fragments", "fragments": "segmentation", "segmentation": "preview"}


@pytest.mark.parametrize("where", list(STAGE_KILLS))
def test_kill_9_in_a_stage_then_resume_is_bit_identical(
    w: Path, inputs: dict, where: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.zarr"
    killed = run(["infer", w / "raw.zarr", "-o", out, *INFER], STAGE_KILLS[where], tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    stage = where.split(":")[0]
    assert list(out.rglob(stage)) and not list(out.rglob(LATER[stage])), "killed in its stage"
    ok(cli(["infer", w / "raw.zarr", "-o", out, *INFER, "--resume"]))
    assert_identical(w / "ref.zarr", out)


def test_resume_with_the_output_spelled_another_way_is_bit_identical(
    w: Path, inputs: dict, tmp_path: Path
) -> None:
    """Killed in the segmentation stage with a relative output path, resumed with the absolute
    one (as ``--scheduler`` makes it): same output, not a refusal over its spelling."""
    killed = run(
        ["infer", w / "raw.zarr", "-o", "out.zarr", *INFER],
        STAGE_KILLS["segmentation: block written, not yet marked"],
        tmp_path,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ok(cli(["infer", w / "raw.zarr", "-o", tmp_path / "out.zarr", *INFER, "--resume"]))
    assert_identical(w / "ref.zarr", tmp_path / "out.zarr")


def test_kill_9_from_outside_while_affinities_are_written(
    w: Path, inputs: dict, tmp_path: Path
) -> None:
    """A real ``kill -9`` from another process, at whatever point the run has reached once
    two affinity blocks are marked finished (marking is slowed down to 0.2 s per block)."""
    out = tmp_path / "out.zarr"
    slow = "slow:affinities/done/c/:0.2"
    process = spawn(["infer", w / "raw.zarr", "-o", out, *INFER], slow, tmp_path)
    deadline = time.monotonic() + 120
    while finished_blocks(out, "affinities") < 2:
        assert process.poll() is None, f"finished before the kill: {process.stderr.read()}"
        assert time.monotonic() < deadline, "the affinities stage never started"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert not list(out.rglob("fragments")), "killed in the affinities stage"
    ok(cli(["infer", w / "raw.zarr", "-o", out, *INFER, "--resume"]))
    assert_identical(w / "ref.zarr", out)


def test_kill_9_during_convert_is_refused_until_overwritten(
    w: Path, inputs: dict, tmp_path: Path
) -> None:
    dst = tmp_path / "copy.zarr"
    src = f"{w / 'crop.hdf'}:raw"
    killed = run(["convert", src, dst, *CONVERT], "killmid:copy.zarr/0/c/:3", tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    reread = cli(["infer", dst, "-o", tmp_path / "x.zarr", *INFER])
    one_line_error(reread.stderr, reread.exit_code, "incomplete", "--overwrite")
    again = cli(["convert", src, dst, *CONVERT])
    one_line_error(again.stderr, again.exit_code, "already exists", "--overwrite")
    ok(cli(["convert", src, dst, *CONVERT, "--overwrite"]))
    assert_identical(w / "ref_convert.zarr", dst)
    assert not (tmp_path / "x.zarr").exists()


# --- a full disk: one line, then a resumable output


def test_full_disk_during_infer_is_one_line_and_resumable(
    w: Path, inputs: dict, tmp_path: Path
) -> None:
    """The disk fills up at the third fragment shard: every later write fails too."""
    out = tmp_path / "out.zarr"
    full = run(["infer", w / "raw.zarr", "-o", out, *INFER], "enospc:fragments/0/c/:3", tmp_path)
    one_line_error(full.stderr, full.returncode, "no space left on device", "--resume")
    ok(cli(["infer", w / "raw.zarr", "-o", out, *INFER, "--resume"]))
    assert_identical(w / "ref.zarr", out)


def test_full_disk_during_convert_is_one_line_and_marked_incomplete(
    w: Path, inputs: dict, tmp_path: Path
) -> None:
    dst = tmp_path / "copy.zarr"
    src = f"{w / 'crop.hdf'}:raw"
    full = run(["convert", src, dst, *CONVERT], "enospc:copy.zarr/0/c/:2", tmp_path)
    one_line_error(full.stderr, full.returncode, "no space left on device", "--overwrite")
    reread = cli(["evaluate", dst, dst])
    one_line_error(reread.stderr, reread.exit_code, "incomplete")
    ok(cli(["convert", src, dst, *CONVERT, "--overwrite"]))
    assert_identical(w / "ref_convert.zarr", dst)


def test_a_failed_write_leaves_no_zarr_writes_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zarr gathers a region's chunk writes: the first ENOSPC propagates while the others are
    still pending on its I/O loop, which zarr closes at exit (each then printed a traceback
    after the one-line error, in 7 of 60 fault runs of ``convert``). The error path lets them
    finish first."""
    import asyncio
    import errno

    import zarr.storage._local as local
    from zarr.core import sync as zarr_sync

    from ssn_deploy.errors import StorageError
    from ssn_deploy.storage import storage_errors

    original = local._put

    def _put(path, value, exclusive=False):
        if "c/0/0/0" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        time.sleep(0.3)  # the other chunks are still being written when the first fails
        return original(path, value, exclusive=exclusive)

    arr = zarr.create_array(tmp_path / "a.zarr", shape=(4, 64, 64), chunks=(1, 32, 32),
                            dtype="uint8", compressors=None)  # fmt: skip
    monkeypatch.setattr(local, "_put", _put)
    with pytest.raises(StorageError, match="no space left on device"):
        with storage_errors(tmp_path / "a.zarr", "free space"):
            arr[...] = 1

    async def pending() -> int:
        return sum(not t.done() for t in asyncio.all_tasks() if t is not asyncio.current_task())

    assert zarr_sync.sync(pending()) == 0


def test_free_space_is_checked_before_any_work(
    w: Path, inputs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ssn_deploy.storage

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ssn_deploy.storage.shutil, "disk_usage",
                        lambda path: usage._replace(free=10_000))  # fmt: skip
    out, dst = tmp_path / "out.zarr", tmp_path / "copy.zarr"
    refused = cli(["infer", w / "raw.zarr", "-o", out, *INFER])
    line = one_line_error(refused.stderr, refused.exit_code, "needs at least", "SSN_DEPLOY_SPACE")
    assert "10 kB free" in line, line
    refused = cli(["convert", f"{w / 'crop.hdf'}:raw", dst, *CONVERT])
    one_line_error(refused.stderr, refused.exit_code, "needs at least")
    assert not out.exists() and not dst.exists(), "nothing is written"
    monkeypatch.setenv("SSN_DEPLOY_SPACE_CHECK", "0")
    ok(cli(["convert", f"{w / 'crop.hdf'}:raw", dst, *CONVERT]))


# --- a read-only output directory: one line, nothing written, for every command

READ_ONLY_RUNNER = """
import json, sys
from click.testing import CliRunner
from ssn_deploy.cli import main
results = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(main, args, prog_name="ssn-deploy")
    crashed = r.exception is not None and not isinstance(r.exception, SystemExit)
    crash = repr(r.exception) if crashed else None
    results.append({"args": args, "code": r.exit_code, "stderr": r.stderr, "crash": crash})
print(json.dumps(results))
"""


def _without_root_override() -> None:
    """In the child, before exec: drop the capabilities that let root ignore file modes
    (DAC override, DAC read/search, fowner) from the bounding set, so 0o555 binds root too."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _train_config(w: Path) -> Path:
    config = yaml.safe_load((REPO / "configs" / "fib_tiny_train.yaml").read_text())
    for key in ("raw", "labels"):  # absolute, so that the copied config still finds its data
        path, _, node = config["data"][key].partition(":")
        config["data"][key] = f"{(REPO / 'configs' / path).resolve()}:{node}"
    (w / "train.yaml").write_text(yaml.safe_dump(config))
    return w / "train.yaml"


def test_read_only_output_directory_is_one_line_and_writes_nothing(
    w: Path, inputs: dict, tmp_path: Path
) -> None:
    model = build_model(ModelConfig(filters=(4, 8), poolings=((2, 2, 2),), embed_kernel=(3, 3, 3)))
    save_checkpoint(tmp_path / "tiny.ckpt", model, normalization=Normalization(),
                    voxel_size=(10, 10, 10))  # fmt: skip
    config = _train_config(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    raw, seg = str(w / "raw.zarr"), str(w / "ref.zarr" / "segmentation")
    commands = [
        ["infer", raw, "-o", f"{ro}/out.zarr", *INFER],
        ["convert", f"{w / 'crop.hdf'}:raw", f"{ro}/copy.zarr"],
        ["segment", str(w / "ref.zarr" / "affinities"), "-o", f"{ro}/seg.zarr"],
        ["evaluate", seg, seg, "--output", f"{ro}/report.json"],
        ["export", str(tmp_path / "tiny.ckpt"), "-o", f"{ro}/export"],
        ["train", str(config), "-o", f"{ro}/run"],
        ["pretrain", raw, "-o", f"{ro}/pretrain"],
        ["select", raw, "-o", f"{ro}/select"],
        ["sample", f"{ro}/demo"],
    ]
    root = os.geteuid() == 0
    try:
        done = subprocess.run(
            [sys.executable, "-c", READ_ONLY_RUNNER, json.dumps(commands)], cwd=tmp_path,
            env=fault_env(None), capture_output=True, text=True, timeout=300,
            preexec_fn=_without_root_override if root else None,
        )  # fmt: skip
    finally:
        ro.chmod(0o755)
    assert done.returncode == 0, done.stderr
    for r in json.loads(done.stdout):
        assert r["crash"] is None, f"{r['args'][0]}: {r['crash']}"
        line = one_line_error(r["stderr"], r["code"], "not writable")
        assert str(ro) in line, line
    assert not list(ro.iterdir()), "nothing is written into the read-only directory"


def test_free_space_estimate_counts_every_pyramid_level() -> None:
    """infer's estimate holds the pyramids too: each level's shape is the level above divided
    by its factor, rounded up (isotropic 2×: about a seventh more; serial sections: in-plane
    only, about a third more)."""
    from ssn_deploy.pipeline import output_bytes
    from ssn_deploy.pyramid import pyramid_factors
    from ssn_deploy.storage import stored_bytes

    for shape, voxel_size in (((256, 512, 512), (10, 10, 10)), ((40, 512, 512), (50, 10, 10))):
        factors = pyramid_factors(shape, voxel_size)
        assert factors, "the example volumes have pyramids"
        level, expected = list(shape), [0, 0]
        for factor in [(1, 1, 1), *factors]:
            level = [-(-n // f) for n, f in zip(level, factor, strict=True)]
            for part in (stored_bytes((3, *level), "uint8"), *[stored_bytes(level, "uint64")] * 2):
                expected = [expected[0] + part[0], expected[1] + part[1]]
        got = output_bytes(shape, 3, "uint8", voxel_size)
        assert list(got) == expected
        level0 = stored_bytes((3, *shape), "uint8")[1] + 2 * stored_bytes(shape, "uint64")[1]
        growth = got[1] / level0
        assert (1.13 < growth < 1.15) if voxel_size[0] == 10 else (1.30 < growth < 1.34), growth
