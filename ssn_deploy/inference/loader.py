"""Build a :class:`~ssn_deploy.inference.predictor.Predictor` from a model file and a backend name.

``load_predictor`` is what dask workers call (through ``functools.partial``) to build their
predictor, so its arguments must be picklable: paths and options, never live sessions.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ssn_deploy.errors import ConfigError, InputNotFoundError
from ssn_deploy.inference.baseline import NAME as INTENSITY
from ssn_deploy.inference.baseline import IntensityPredictor
from ssn_deploy.inference.predictor import Predictor

BACKENDS = {"torch": ".ckpt", "onnxruntime": ".onnx", "tensorrt": ".plan"}
PACKAGED = ("torch", "onnxruntime")


def default_model(backend: str) -> Path:
    """The packaged model for ``backend`` (``ssn_deploy/assets/models/default.ckpt|.onnx``)."""
    if backend not in PACKAGED:
        raise InputNotFoundError(
            f"no packaged default model for {backend}: engines are built per GPU, with "
            "ssn-deploy export CKPT -o DIR --format tensorrt; pass the .plan it writes"
        )
    path = Path(str(resources.files("ssn_deploy") / "assets" / "models" / "default"))
    path = path.with_suffix(BACKENDS[backend])
    if not path.is_file():
        raise InputNotFoundError(
            f"no packaged default model at {path}; pass a model file "
            f"({' or '.join(BACKENDS[b] for b in PACKAGED)})"
        )
    return path


def load_predictor(
    model: str | Path,
    backend: str = "torch",
    *,
    device: str = "cpu",
    precision: str = "fp32",
    compile: bool = False,
    threads: int | None = None,
) -> Predictor:
    """A predictor for ``model``: a .ckpt for torch, an .onnx for onnxruntime, a .plan (built
    by ``ssn-deploy export --format tensorrt``) for TensorRT, or "default".

    ``precision`` (fp32 | bf16 | fp16) and ``compile`` apply to torch; ONNX graphs and engines
    run in the precision they were exported with. ``model="intensity"`` is the no-network
    baseline.
    """
    if str(model) == INTENSITY:
        return IntensityPredictor()
    if backend not in BACKENDS:
        raise ConfigError(f"backend: expected one of {sorted(BACKENDS)}, got {backend!r}")
    path = default_model(backend) if str(model) == "default" else Path(model)
    if path.suffix != BACKENDS[backend]:
        hint = " (engines: ssn-deploy export --format tensorrt)" if backend == "tensorrt" else ""
        raise ConfigError(
            f"the {backend} backend runs {BACKENDS[backend]} models, got {path}; "
            f"choose the backend that matches the file{hint}"
        )
    if backend == "torch":
        from ssn_deploy.inference.torch_backend import TorchPredictor

        return TorchPredictor.from_checkpoint(
            path, device=device, precision=precision, compile=compile, threads=threads
        )
    if precision != "fp32" or compile:
        raise ConfigError(
            f"{backend} runs the model as exported: --precision and --compile apply to torch "
            "(export an fp16 variant with ssn-deploy export --fp16)"
        )
    if backend == "tensorrt":
        from ssn_deploy.inference.tensorrt_backend import TensorRTPredictor

        if not device.startswith("cuda"):
            raise ConfigError("the tensorrt backend runs on a GPU: pass --device cuda")
        index = int(device.partition(":")[2] or 0)
        return TensorRTPredictor(path, device=index)
    from ssn_deploy.inference.onnx_backend import OnnxPredictor

    return OnnxPredictor(path, device=device, threads=threads)
