"""Build a :class:`~ssn_deploy.inference.predictor.Predictor` from a model file and a backend name.

``load_predictor`` is what dask workers call (through ``functools.partial``) to build their
predictor, so its arguments must be picklable: paths and options, never live sessions. The
``triton`` backend has no model file: it runs what a Triton server serves
(:class:`~ssn_deploy.inference.triton_backend.TritonOptions` say where).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ssn_deploy.errors import ConfigError, InputNotFoundError
from ssn_deploy.geometry import anisotropy
from ssn_deploy.inference.baseline import NAME as INTENSITY
from ssn_deploy.inference.baseline import IntensityPredictor
from ssn_deploy.inference.predictor import Predictor

if TYPE_CHECKING:
    from ssn_deploy.inference.triton_backend import TritonOptions

BACKENDS = {"torch": ".ckpt", "onnxruntime": ".onnx", "tensorrt": ".plan"}
"""Backends that run a model file, and its suffix."""
TRITON = "triton"
"""The backend that runs the model a Triton server serves (no local file)."""
PACKAGED = ("torch", "onnxruntime")
DEFAULT = "default"


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped in ``ssn_deploy/assets/models/<stem>.{ckpt,onnx}``."""

    name: str
    stem: str
    voxel_size: tuple[float, float, float]
    modality: str


PACKAGED_MODELS = (
    PackagedModel("iso", "default", (10.0, 10.0, 10.0), "isotropic FIB-SEM"),
    PackagedModel("aniso", "default_aniso", (50.0, 10.0, 10.0), "anisotropic serial-section EM"),
)
"""``--model default`` picks one of these by voxel size; ``--model iso|aniso`` names one."""


def choose_packaged(voxel_size: Sequence[float] | None) -> PackagedModel:
    """The packaged model whose anisotropy (then pixel size) is nearest the volume's, in log
    ratio: a 50×4×4 nm volume gets the anisotropic model, 4×4×4 nm the isotropic one. Without a
    voxel size the isotropic model (the first) is the answer."""
    if voxel_size is None:
        return PACKAGED_MODELS[0]

    def distance(m: PackagedModel) -> tuple[float, float]:
        shape = abs(np.log(anisotropy(voxel_size) / anisotropy(m.voxel_size)))
        scale = abs(np.log(float(np.mean(voxel_size[1:])) / float(np.mean(m.voxel_size[1:]))))
        return round(shape, 6), scale

    return min(PACKAGED_MODELS, key=distance)


def packaged_model(name: str) -> PackagedModel:
    for m in PACKAGED_MODELS:
        if m.name == name:
            return m
    known = ", ".join(m.name for m in PACKAGED_MODELS)
    raise InputNotFoundError(f"no packaged model {name!r} (packaged: {known}, or {DEFAULT})")


def default_model(backend: str, name: str = "iso") -> Path:
    """The file of packaged model ``name`` for ``backend`` (``assets/models/<stem>.ckpt|.onnx``)."""
    if backend not in PACKAGED:
        raise InputNotFoundError(
            f"no packaged default model for {backend}: engines are built per GPU, with "
            "ssn-deploy export CKPT -o DIR --format tensorrt; pass the .plan it writes"
        )
    stem = packaged_model(name).stem
    path = Path(str(resources.files("ssn_deploy") / "assets" / "models" / stem))
    path = path.with_suffix(BACKENDS[backend])
    if not path.is_file():
        raise InputNotFoundError(
            f"no packaged model at {path}; pass a model file "
            f"({' or '.join(BACKENDS[b] for b in PACKAGED)})"
        )
    return path


def is_packaged_name(model: str | Path) -> bool:
    return str(model) == DEFAULT or any(str(model) == m.name for m in PACKAGED_MODELS)


AUTO = "auto"
"""``precision="auto"``: bf16 for a packaged model on torch on a CPU with native bf16 kernels,
else fp32 (:func:`resolve_precision`)."""


def fast_bf16_cpu(device: str) -> bool:
    """Whether ``device`` is a CPU whose oneDNN has native bf16 kernels (AVX512-BF16 or AMX);
    on AVX2-only CPUs bf16 is emulated and slower than fp32."""
    if device != "cpu":
        return False
    from ssn_deploy.inference.torch_backend import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


def resolve_precision(
    precision: str, backend: str, device: str = "cpu", model: str | Path = DEFAULT
) -> str:
    """``precision`` with ``auto`` decided: bf16 for a packaged model on torch on a CPU with
    native bf16, where it ran ~2× faster than onnxruntime fp32 at the same segmentation (VOI
    within 0.01 on the iso test region, ``python benchmarks/end_to_end.py``); fp32 otherwise:
    other backends run the model in the precision it was exported with, and a model file's
    bf16 segmentation is unmeasured (``--precision bf16`` asks for it)."""
    if precision != AUTO:
        return precision
    packaged = is_packaged_name(model)
    return "bf16" if backend == "torch" and packaged and fast_bf16_cpu(device) else "fp32"


def auto_backend(
    model: str | Path, precision: str = AUTO, compile: bool = False, device: str = "cpu"
) -> str:
    """The fastest backend that runs ``model`` here: the file's own for .onnx / .plan / .ckpt;
    for a packaged model torch where ``precision`` is auto and the CPU has native bf16 (bf16 in
    the folded, channels-last form: ~2× onnxruntime fp32), else its ONNX graph on onnxruntime
    (1.5–1.65× torch eager fp32, ``benchmarks/backends.py``) unless torch-only options
    (``precision`` bf16/fp16, ``compile``) are asked for or onnxruntime is not installed."""
    suffix = Path(str(model)).suffix
    for backend, ext in BACKENDS.items():
        if suffix == ext:
            return backend
    if is_packaged_name(model) and precision in ("fp32", AUTO) and not compile:
        if precision == AUTO and fast_bf16_cpu(device):
            return "torch"
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is not None:
            return "onnxruntime"
    return "torch"


def load_predictor(
    model: str | Path,
    backend: str = "torch",
    *,
    device: str = "cpu",
    precision: str = "fp32",
    compile: bool = False,
    threads: int | None = None,
    tta: str | None = None,
    triton: TritonOptions | None = None,
) -> Predictor:
    """A predictor for ``model``: a .ckpt for torch, an .onnx for onnxruntime, a .plan (built
    by ``ssn-deploy export --format tensorrt``) for TensorRT, or a packaged model's name
    ("iso", "aniso"; "default" means "iso" here: :func:`choose_packaged` picks by voxel size).

    ``precision`` (fp32 | bf16 | fp16, or auto: :func:`resolve_precision`) and ``compile``
    apply to torch; ONNX graphs and engines run in the precision they were exported with.
    ``model="intensity"`` is the no-network baseline. ``backend="triton"`` runs the model
    served where ``triton`` says (``model`` must then be "default": the server decides).
    """
    precision = resolve_precision(precision, backend, device, model)
    if backend == TRITON:
        predictor = _load_triton(model, triton, device, precision, compile)
    else:
        predictor = _load(model, backend, device, precision, compile, threads)
    if tta:
        from ssn_deploy.inference.tta import FlipAveragedPredictor

        try:
            return FlipAveragedPredictor(predictor, tta)  # type: ignore[return-value]
        except ValueError as exc:
            raise ConfigError(f"--tta: {exc}") from None
    return predictor


def _load_triton(
    model: str | Path | None,
    options: TritonOptions | None,
    device: str,
    precision: str,
    compile: bool,
) -> Predictor:
    from ssn_deploy.inference.triton_backend import TritonPredictor

    if options is None:
        raise ConfigError("the triton backend needs the server's address: pass --url HOST:PORT")
    if model not in (None, DEFAULT):
        raise ConfigError(
            f"--backend triton runs the model the server serves, not --model {model}; "
            "choose the served model with --triton-model"
        )
    if device != "cpu" or precision != "fp32" or compile:
        raise ConfigError(
            "the Triton server runs the model as it serves it: --device, --precision and "
            "--compile do not apply to --backend triton"
        )
    return TritonPredictor(**asdict(options))


def _load(
    model: str | Path,
    backend: str,
    device: str,
    precision: str,
    compile: bool,
    threads: int | None,
) -> Predictor:
    if str(model) == INTENSITY:
        return IntensityPredictor()
    if backend not in BACKENDS:
        known = sorted([*BACKENDS, TRITON])
        raise ConfigError(f"backend: expected one of {known}, got {backend!r}")
    if is_packaged_name(model):
        path = default_model(backend, "iso" if str(model) == DEFAULT else str(model))
    else:
        path = Path(model)
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
