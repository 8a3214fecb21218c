"""The Docker image without Docker: the Dockerfile lints clean (hadolint) and says what the
deployment needs, and its one install script builds working environments in clean virtualenvs
(the command line with the CPU extra instead of the GPU one; the python backend's numpy<2
environment exactly as the image gets it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
INSTALL = REPO / "docker" / "install.sh"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [line.strip() for line in joined.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Instructions per build stage, by stage name."""
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for op, args in instructions(text):
        if op == "FROM":
            current = []
            result[args.split()[-1]] = current
        current.append((op, args))
    return result


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_triton_and_serves_as_a_non_root_user() -> None:
    text = DOCKERFILE.read_text()
    image = re.search(r"^ARG TRITON_IMAGE=(\S+)$", text, re.M)
    assert image and re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", image[1])
    by_stage = stages(text)
    assert list(by_stage)[-1] == "triton"  # the default target
    for target in ("triton", "cli"):
        ops = by_stage[target]
        users = [args for op, args in ops if op == "USER"]
        assert users and users[-1].split(":")[0] not in ("0", "root")
        assert any(op == "RUN" and "docker/install.sh" in args for op, args in ops)
    triton = dict(by_stage["triton"])
    assert triton["EXPOSE"].split() == ["8000", "8001", "8002"]
    assert "/v2/health/ready" in triton["HEALTHCHECK"]
    assert "--model-repository=/models" in triton["CMD"]
    assert "--from=repository" in triton["COPY"]
    repository = dict(by_stage["repository"])
    assert "ssn-deploy serve build-repo" in repository["RUN"]
    assert "gpu,serve" in dict(by_stage["cli"])["RUN"]


def test_dockerignore_keeps_the_context_to_what_is_installed() -> None:
    text = (REPO / ".dockerignore").read_text().splitlines()
    lines = [line.strip() for line in text if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"  # an allow-list
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "ssn_deploy",
        "docker/install.sh",
    }
    copied = " ".join(args for op, args in instructions(DOCKERFILE.read_text()) if op == "COPY")
    assert all(path in copied for path in allowed)


def test_compose_runs_a_server_and_workers_that_use_it() -> None:
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert services["triton"]["build"]["target"] == "triton"
    assert all(p.startswith("127.0.0.1:") for p in services["triton"]["ports"])
    worker = services["worker"]
    assert worker["build"]["target"] == "cli"
    assert worker["depends_on"]["triton"]["condition"] == "service_healthy"
    job = services["infer"]["command"]
    assert job[job.index("--url") + 1] == "triton:8001" and "--scheduler" in job


@pytest.mark.slow
def test_install_script_builds_both_environments(tmp_path: Path) -> None:
    """The full CPU set for the command line (about 75 s with a warm pip cache), and the
    python backend's environment (about 25 s)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PYTHON"] = sys.executable
    started = time.perf_counter()
    for mode, extra in (("cli", ["cpu,serve"]), ("server", [])):
        subprocess.run(
            ["bash", str(INSTALL), mode, str(tmp_path / mode), *extra],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=900,
        )
    print(f"docker/install.sh cli + server: {time.perf_counter() - started:.0f} s")
    cli = tmp_path / "cli" / "bin"
    repo = tmp_path / "models"
    built = subprocess.run(
        [str(cli / "ssn-deploy"), "serve", "build-repo", "-o", str(repo)],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == [
        "affinity_onnx",
        "affinity_py",
        "agglomerate",
        "segment",
    ]
    check = (
        "import sys, numpy, onnxruntime, ssn_deploy.agglomeration, ssn_deploy.serving.block_models;"
        "print(numpy.__version__, 'torch' in sys.modules)"
    )
    server = tmp_path / "server" / "bin" / "python"
    out = subprocess.run(
        [str(server), "-c", check], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    numpy_version, torch_imported = out.stdout.split()
    assert numpy_version.startswith("1.") and torch_imported == "False"
    no_torch = subprocess.run([str(server), "-c", "import torch"], env=env, capture_output=True)
    assert no_torch.returncode != 0
    again = subprocess.run(["bash", str(INSTALL), "cli", str(tmp_path / "cli")], env=env)
    assert again.returncode == 2  # never installs over an existing folder
