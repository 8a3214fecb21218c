"""``ssn-deploy serve``: build a Triton model repository and run a Triton server on it.

Registered on the main group at the end of :mod:`ssn_deploy.cli`; kept in its own module so
the serving commands grow without touching the others. Errors are :class:`SsnDeployError`s,
printed as one line by the main group. Library imports happen inside the commands so that
``--help`` stays fast.
"""

from __future__ import annotations

import click

from ssn_deploy.cli_base import Group

DEFAULT_MODEL = "default"


def _positive_triple(value: str | None, name: str) -> tuple[int, int, int] | None:
    """``"Z,Y,X"`` → three positive integers."""
    if value is None:
        return None
    try:
        numbers = tuple(int(p) for p in value.split(","))
    except ValueError:
        numbers = ()
    if len(numbers) != 3 or min(numbers) < 1:
        raise click.BadParameter(
            f"expected three positive integers Z,Y,X, got {value!r}", param_hint=name
        )
    return numbers  # type: ignore[return-value]


def _onnx_path(model: str) -> str:
    """A packaged model's name (default, iso, aniso) → its ONNX file; a path stays a path."""
    from ssn_deploy.inference.loader import DEFAULT, default_model, is_packaged_name

    if is_packaged_name(model):
        return str(default_model("onnxruntime", "iso" if model == DEFAULT else model))
    return model


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
def serve() -> None:
    """Serve the model with NVIDIA Triton Inference Server.

    \b
    1. ssn-deploy serve build-repo -o repo     write a model repository
    2. ssn-deploy serve start repo             run a server on it (127.0.0.1:8000/8001/8002)

    On a machine without Docker, `start` runs the tritonserver of the nvidia-pytriton wheel
    from its own virtual environment, set up on first use (about a minute; cached under
    ~/.cache/ssn-deploy, or $SSN_DEPLOY_SERVER_ENV). That server has only the python
    backend, so it loads the CPU model `affinity_py` and the block models `agglomerate` and
    `segment`; GPU Triton images also run `affinity_onnx`.
    """


@serve.command("build-repo")
@click.argument("model", default=DEFAULT_MODEL)
@click.option(
    "-o", "--output", required=True, type=click.Path(file_okay=False), help="Repository folder."
)
@click.option("--overwrite", is_flag=True, help="Replace a repository written before.")
@click.option(
    "--max-patch",
    default=None,
    help="Largest Z,Y,X a request may carry, multiples of the model's granularity "
    "[default: the patch ssn-deploy infer uses for the model's voxel size].",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Most patches per request (and per dynamic batch).",
)
@click.option(
    "--instances",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Model instances run in parallel (each its own process and onnxruntime session). "
    "On a CPU server with many clients, one per core with --threads 1 kept up with in-process "
    "onnxruntime; one instance with every core serves a single client best (README, Deploy).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="onnxruntime threads per CPU instance (0: onnxruntime's default, all cores).",
)
@click.option(
    "--tensorrt",
    type=click.Choice(["fp32", "fp16"]),
    default=None,
    help="Add the TensorRT accelerator, in this precision, to affinity_onnx (GPU servers).",
)
@click.option(
    "--max-block",
    default=None,
    help="Largest Z,Y,X block the agglomerate model takes [default: the block ssn-deploy "
    "infer uses for the model's voxel size].",
)
@click.option(
    "--segment-affinity-model",
    type=click.Choice(["affinity_py", "affinity_onnx"]),
    default="affinity_py",
    show_default=True,
    help="The model the segment model asks for affinities (affinity_onnx on GPU images).",
)
@click.option("--card", type=click.Path(exists=True, dir_okay=False), help="Model card to include.")
def build_repo(
    model: str,
    output: str,
    overwrite: bool,
    max_patch: str | None,
    max_batch: int,
    instances: int,
    threads: int,
    tensorrt: str | None,
    max_block: str | None,
    segment_affinity_model: str,
    card: str | None,
) -> None:
    """Write a Triton model repository for MODEL into OUTPUT.

    MODEL is an .onnx file written by `ssn-deploy export`, or a packaged model: default
    (= iso), iso or aniso [default: default]. Offsets, context, granularity, voxel size and
    normalisation come from the model's metadata and are carried in each config.pbtxt.

    \b
    OUTPUT/
      affinity_py/     python backend: onnxruntime on the CPU (runs on any Triton)
      affinity_onnx/   onnxruntime_onnx platform, optional TensorRT (Triton GPU images)
      agglomerate/     python backend: one block's affinities -> segmentation
      segment/         python backend: raw block -> affinities -> segmentation
      MODEL_CARD.md    the model's card
      ssn-deploy.json  source model, checksum and request limits

    Example: ssn-deploy serve build-repo -o repo --max-patch 128,128,128
    """
    from ssn_deploy.serving.repository import build_repository

    manifest = build_repository(
        _onnx_path(model),
        output,
        max_patch=_positive_triple(max_patch, "--max-patch"),
        max_batch=max_batch,
        instances=instances,
        threads=threads,
        tensorrt=tensorrt,
        card=card,
        overwrite=overwrite,
        max_block=_positive_triple(max_block, "--max-block"),
        segment_affinity_model=segment_affinity_model,
    )
    patch = "x".join(str(p) for p in manifest.max_patch)
    click.echo(
        f"wrote {output}: {', '.join(manifest.models)} from {manifest.source} "
        f"(requests up to {manifest.max_batch} x {patch} voxels)"
    )


@serve.command("start")
@click.argument("repository", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind; 0.0.0.0 exposes the server to the network.",
)
@click.option(
    "--http-port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="HTTP port (0: any free port).",
)
@click.option(
    "--grpc-port",
    type=click.IntRange(0, 65535),
    default=8001,
    show_default=True,
    help="gRPC port (0: any free port).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=8002,
    show_default=True,
    help="Prometheus metrics port (0: any free port).",
)
@click.option(
    "--log",
    "log_file",
    type=click.Path(dir_okay=False),
    default="tritonserver.log",
    show_default=True,
    help="Server log file.",
)
@click.option(
    "--env",
    "env_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Server virtual environment [default: $SSN_DEPLOY_SERVER_ENV or "
    "~/.cache/ssn-deploy/server-env-pyX.Y].",
)
@click.option(
    "--ready-timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for the server and its models to be ready.",
)
def start(
    repository: str,
    host: str,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    log_file: str,
    env_dir: str | None,
    ready_timeout: float,
) -> None:
    """Run a Triton server on REPOSITORY until Ctrl-C or SIGTERM.

    The server loads the models it can run here, answers /v2/health/ready before this
    command reports it started, and stops cleanly on SIGINT/SIGTERM (in-flight requests
    finish). Its output goes to --log.

    Example: ssn-deploy serve start repo --http-port 0 --grpc-port 0 --metrics-port 0
    """
    from ssn_deploy.serving.environment import (
        ServerEnvironment,
        default_location,
        ensure_environment,
        is_valid,
    )
    from ssn_deploy.serving.server import TritonServer
    from ssn_deploy.serving.server import serve as run_server

    root = env_dir or default_location()
    if not is_valid(ServerEnvironment.at(root)):
        click.echo(f"setting up the server environment in {root} (once; about a minute)", err=True)
    env = ensure_environment(root)
    server = TritonServer(
        repository,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        log=log_file,
        environment=env,
        ready_timeout=ready_timeout,
    )

    def announce(s: TritonServer) -> None:
        click.echo(
            f"serving {', '.join(s.models)} from {s.repository}\n"
            f"  HTTP    {s.http_url}\n  gRPC    {s.grpc_url}\n  metrics {s.metrics_url}\n"
            f"  log     {s.log}\nCtrl-C stops it."
        )

    run_server(server, on_ready=announce)
    click.echo("stopped")
