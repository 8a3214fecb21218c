"""A Triton model repository generated from the model's own metadata.

Nothing about the model is typed twice: offsets, context, granularity, voxel size and
normalisation come from the ONNX file's ``metadata_props`` (:class:`ModelSpec`), tensor names
and channel counts from its graph. The repository holds

``affinity_py/``    backend ``python``: onnxruntime on the CPU (:mod:`.affinity_model`); the
                    model a CPU-only server (the ``nvidia-pytriton`` wheel's) can load
``affinity_onnx/``  platform ``onnxruntime_onnx`` (optional TensorRT accelerator), for the
                    NVIDIA Triton images, which bundle the onnxruntime backend
``agglomerate/``    backend ``python``: one block's affinities → segmentation
                    (:mod:`.block_models`, ssn-deploy's own agglomeration)
``segment/``        backend ``python``: a raw block → affinities (from ``affinity_py`` through
                    business logic scripting) → segmentation
``MODEL_CARD.md``   the model's card
``ssn-deploy.json`` what was built, from what, and the largest request it accepts

Configs are :class:`ModelConfig` objects rendered by small pure functions, so tests can check
them without a server.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssn_deploy.errors import ConfigError, InputNotFoundError, InvalidInputError, OutputExistsError
from ssn_deploy.export.tensorrt import file_sha256
from ssn_deploy.models.spec import METADATA_PREFIX, ModelSpec, Triple
from ssn_deploy.serving import block_models
from ssn_deploy.serving.environment import PACKAGE_VAR

AFFINITY_PY = "affinity_py"
AFFINITY_ONNX = "affinity_onnx"
AGGLOMERATE = "agglomerate"
SEGMENT = "segment"
ONNX_FILE = "model.onnx"
MANIFEST = "ssn-deploy.json"
CARD = "MODEL_CARD.md"
VERSION = "1"
TENSORRT_PRECISIONS = ("fp32", "fp16")
QUEUE_DELAY_US = 2000
"""How long the dynamic batcher waits to fill a batch: small next to a patch's inference."""


# --- typed configs and their rendering (pure)


@dataclass(frozen=True)
class TensorConfig:
    """One input or output; ``dims`` exclude the batch axis, -1 is variable."""

    name: str
    dims: tuple[int, ...]
    data_type: str = "TYPE_FP32"
    optional: bool = False
    """An input a request may leave out."""


@dataclass(frozen=True)
class ModelConfig:
    """The subset of Triton's ``ModelConfig`` this package writes."""

    name: str
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    max_batch_size: int
    backend: str | None = None
    platform: str | None = None
    instance_count: int = 1
    instance_kind: str = "KIND_CPU"
    max_queue_delay_us: int = QUEUE_DELAY_US
    parameters: Mapping[str, str] = field(default_factory=dict)
    warmup_dims: tuple[int, ...] | None = None
    """Input dims (without batch) of a zero-filled warm-up request; None for no warm-up."""
    tensorrt_precision: str | None = None
    default_model_filename: str | None = None


def pbtxt_string(value: str) -> str:
    """A protobuf text-format string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _dims(dims: Sequence[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def render_tensor(t: TensorConfig) -> str:
    lines = [f"name: {pbtxt_string(t.name)}", f"data_type: {t.data_type}", f"dims: {_dims(t.dims)}"]
    if t.optional:
        lines.append("optional: true")
    return "  {\n" + "".join(f"    {line}\n" for line in lines) + "  }"


def render_tensors(kind: str, tensors: Sequence[TensorConfig]) -> str:
    return f"{kind} [\n" + ",\n".join(render_tensor(t) for t in tensors) + "\n]"


def render_dynamic_batching(max_queue_delay_us: int) -> str:
    return f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}"


def render_instance_group(count: int, kind: str) -> str:
    return f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]"


def render_parameters(parameters: Mapping[str, str]) -> str:
    return "\n".join(
        f"parameters {{\n  key: {pbtxt_string(k)}\n"
        f"  value: {{ string_value: {pbtxt_string(v)} }}\n}}"
        for k, v in sorted(parameters.items())
    )


def render_warmup(inp: TensorConfig, dims: Sequence[int]) -> str:
    return (
        'model_warmup [\n  {\n    name: "zeros"\n    batch_size: 1\n    inputs {\n'
        f"      key: {pbtxt_string(inp.name)}\n      value {{\n"
        f"        data_type: {inp.data_type}\n        dims: {_dims(dims)}\n"
        "        zero_data: true\n      }\n    }\n  }\n]"
    )


def render_tensorrt(precision: str) -> str:
    """onnxruntime's TensorRT execution provider, for GPU servers (engines cached per GPU)."""
    return (
        "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n"
        '      {\n        name: "tensorrt"\n'
        f'        parameters {{ key: "precision_mode" value: "{precision.upper()}" }}\n'
        '        parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n'
        '        parameters { key: "trt_engine_cache_enable" value: "1" }\n'
        "      }\n    ]\n  }\n}"
    )


def render_config(config: ModelConfig) -> str:
    """``config.pbtxt`` text for ``config``."""
    if (config.backend is None) == (config.platform is None):
        raise ValueError("a model config names exactly one of backend and platform")
    head = [f"name: {pbtxt_string(config.name)}"]
    if config.backend:
        head.append(f"backend: {pbtxt_string(config.backend)}")
    if config.platform:
        head.append(f"platform: {pbtxt_string(config.platform)}")
    if config.default_model_filename:
        head.append(f"default_model_filename: {pbtxt_string(config.default_model_filename)}")
    head.append(f"max_batch_size: {config.max_batch_size}")
    blocks = [
        "\n".join(head),
        render_tensors("input", config.inputs),
        render_tensors("output", config.outputs),
    ]
    if config.max_batch_size > 0:  # Triton refuses a dynamic batcher without a batch axis
        blocks.append(render_dynamic_batching(config.max_queue_delay_us))
    blocks.append(render_instance_group(config.instance_count, config.instance_kind))
    if config.parameters:
        blocks.append(render_parameters(config.parameters))
    if config.warmup_dims is not None:
        blocks.append(render_warmup(config.inputs[0], config.warmup_dims))
    if config.tensorrt_precision:
        blocks.append(render_tensorrt(config.tensorrt_precision))
    return "\n\n".join(blocks) + "\n"


# --- the model as the repository sees it


@dataclass(frozen=True)
class OnnxModel:
    """What the repository is generated from, all read from the ONNX file."""

    path: Path
    spec: ModelSpec
    metadata: Mapping[str, str]
    """Every ``ssn_deploy.*`` entry of ``metadata_props``, as stored (JSON strings)."""
    input_name: str
    output_name: str
    input_dims: tuple[int, ...]
    """N, C, Z, Y, X with -1 for dynamic axes."""
    output_dims: tuple[int, ...]

    @classmethod
    def read(cls, path: str | Path) -> OnnxModel:
        import onnx

        path = Path(path)
        if not path.is_file():
            raise InputNotFoundError(f"ONNX model not found: {path}")
        if path.suffix != ".onnx":
            raise ConfigError(
                f"a model repository is built from an ONNX file, got {path}; export a "
                "checkpoint with ssn-deploy export CKPT -o DIR"
            )
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError and others for bad files
            raise InvalidInputError(f"{path}: not a readable ONNX model ({exc})") from None
        props = {p.key: p.value for p in model.metadata_props}
        spec = ModelSpec.from_metadata(props, str(path))
        initializers = {i.name for i in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in initializers]
        if len(inputs) != 1 or len(model.graph.output) != 1:
            raise InvalidInputError(f"{path}: expected one input and one output")
        input_dims, output_dims = _shape(inputs[0]), _shape(model.graph.output[0])
        if (
            len(input_dims) != 5
            or len(output_dims) != 5
            or input_dims[0] != -1
            or input_dims[1] != 1
            or output_dims[1] not in (-1, spec.num_channels)
        ):
            raise InvalidInputError(
                f"{path}: expected N×1×Z×Y×X → N×{spec.num_channels}×Z×Y×X with a dynamic batch "
                "axis, got "
                f"{list(input_dims)} → {list(output_dims)}; export it with ssn-deploy export"
            )
        return cls(
            path=path,
            spec=spec,
            metadata={k: v for k, v in props.items() if k.startswith(METADATA_PREFIX)},
            input_name=inputs[0].name,
            output_name=model.graph.output[0].name,
            input_dims=input_dims,
            output_dims=output_dims,
        )


def _shape(value_info: Any) -> tuple[int, ...]:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in dims)


# --- repository options and the pieces of each config (pure)


@dataclass(frozen=True)
class RepositoryOptions:
    """Serving limits and resources, validated against the model."""

    max_patch: Triple
    max_batch: int = 4
    instances: int = 1
    threads: int = 0
    """onnxruntime intra-op threads per python-backend instance (0: onnxruntime's default)."""
    tensorrt: str | None = None
    """Precision of the TensorRT accelerator of ``affinity_onnx`` (fp32 | fp16), or None."""
    warmup: bool = True
    max_block: Triple | None = None
    """Largest Z,Y,X block ``agglomerate`` accepts (None: infer's default block)."""
    segment_affinity_model: str = AFFINITY_PY
    """The model ``segment`` asks for affinities (``affinity_onnx`` on GPU images)."""


def default_max_patch(spec: ModelSpec) -> Triple:
    """The patch ``ssn-deploy infer`` uses for the model's own voxel size, so the engine's
    requests fit by default."""
    from ssn_deploy.pipeline import default_geometry

    class _Geometry:
        granularity = spec.granularity
        context = spec.context

    return default_geometry(_Geometry(), spec.voxel_size).patch_shape  # type: ignore[arg-type]


def default_max_block(spec: ModelSpec) -> Triple:
    """The block ``ssn-deploy infer`` uses for the model's own voxel size."""
    from ssn_deploy.pipeline import default_geometry

    class _Geometry:
        granularity = spec.granularity
        context = spec.context

    return default_geometry(_Geometry(), spec.voxel_size).block_shape  # type: ignore[arg-type]


def check_options(model: OnnxModel, options: RepositoryOptions) -> None:
    g = model.spec.granularity
    patch = options.max_patch
    if len(patch) != 3 or any(p <= 0 or p % m for p, m in zip(patch, g, strict=True)):
        raise ConfigError(f"max patch {patch} must be positive multiples of the granularity {g}")
    fixed = [(p, d) for p, d in zip(patch, model.input_dims[2:], strict=True) if d > 0]
    if any(p != d for p, d in fixed):
        raise ConfigError(
            f"{model.path} has static Z,Y,X {list(model.input_dims[2:])}: max patch must match"
        )
    for what, value in (("max batch", options.max_batch), ("instances", options.instances)):
        if value < 1:
            raise ConfigError(f"{what} must be >= 1, got {value}")
    if options.threads < 0:
        raise ConfigError(f"threads must be >= 0, got {options.threads}")
    if options.tensorrt not in (None, *TENSORRT_PRECISIONS):
        raise ConfigError(f"tensorrt precision must be one of {TENSORRT_PRECISIONS}")
    block = options.max_block
    if block is not None and (len(block) != 3 or min(block) < 1):
        raise ConfigError(f"max block {block} must be three positive sizes Z,Y,X")
    if options.segment_affinity_model not in (AFFINITY_PY, AFFINITY_ONNX):
        raise ConfigError(f"segment's affinity model must be {AFFINITY_PY} or {AFFINITY_ONNX}")


def warmup_dims(model: OnnxModel, options: RepositoryOptions) -> tuple[int, ...]:
    """A small valid patch (twice the granularity, within the maximum patch) with its channel."""
    zyx = [
        d if d > 0 else min(2 * g, m)
        for d, g, m in zip(
            model.input_dims[2:], model.spec.granularity, options.max_patch, strict=True
        )
    ]
    return (model.input_dims[1], *zyx)


def model_parameters(model: OnnxModel, options: RepositoryOptions, sha256: str) -> dict[str, str]:
    """The model's metadata plus the repository's limits, carried in ``config.pbtxt`` so that
    clients (``get_model_config``) and the python model read them from the server."""
    return {
        **model.metadata,
        METADATA_PREFIX + "max_patch": json.dumps(list(options.max_patch)),
        METADATA_PREFIX + "onnx_file": ONNX_FILE,
        METADATA_PREFIX + "onnx_sha256": sha256,
    }


def tensors(model: OnnxModel) -> tuple[TensorConfig, TensorConfig]:
    return (
        TensorConfig(model.input_name, model.input_dims[1:]),
        TensorConfig(model.output_name, (model.spec.num_channels, *model.output_dims[2:])),
    )


def python_config(model: OnnxModel, options: RepositoryOptions, sha256: str) -> ModelConfig:
    inp, out = tensors(model)
    params = model_parameters(model, options, sha256)
    params[METADATA_PREFIX + "intra_op_threads"] = str(options.threads)
    return ModelConfig(
        name=AFFINITY_PY,
        backend="python",
        inputs=(inp,),
        outputs=(out,),
        max_batch_size=options.max_batch,
        instance_count=options.instances,
        instance_kind="KIND_CPU",
        parameters=params,
        warmup_dims=warmup_dims(model, options) if options.warmup else None,
    )


def onnx_config(model: OnnxModel, options: RepositoryOptions, sha256: str) -> ModelConfig:
    """For Triton images with the onnxruntime backend; KIND_AUTO takes the GPU where there is
    one. Shape limits are not enforced by this backend (only the python model checks them)."""
    inp, out = tensors(model)
    return ModelConfig(
        name=AFFINITY_ONNX,
        platform="onnxruntime_onnx",
        default_model_filename=ONNX_FILE,
        inputs=(inp,),
        outputs=(out,),
        max_batch_size=options.max_batch,
        instance_count=options.instances,
        instance_kind="KIND_AUTO",
        parameters=model_parameters(model, options, sha256),
        warmup_dims=warmup_dims(model, options) if options.warmup else None,
        tensorrt_precision=options.tensorrt,
    )


def block_parameters(
    model: OnnxModel, options: RepositoryOptions, sha256: str, max_block: Triple
) -> dict[str, str]:
    """The model's parameters plus what agglomeration needs: the block limit and whether
    fragments are 2D per section (anisotropic voxel size, as ``ssn-deploy infer`` decides)."""
    from ssn_deploy.pipeline import is_anisotropic

    return {
        **model_parameters(model, options, sha256),
        METADATA_PREFIX + "max_block": json.dumps(list(max_block)),
        METADATA_PREFIX + "anisotropic": json.dumps(is_anisotropic(model.spec.voxel_size)),
    }


def threshold_input() -> TensorConfig:
    return TensorConfig(block_models.THRESHOLD, (1,), optional=True)


def agglomerate_config(
    model: OnnxModel, options: RepositoryOptions, sha256: str, max_block: Triple
) -> ModelConfig:
    """One block per request (no batch axis: blocks differ in shape)."""
    channels = model.spec.num_channels
    return ModelConfig(
        name=AGGLOMERATE,
        backend="python",
        inputs=(TensorConfig(block_models.AFFINITIES, (channels, -1, -1, -1)), threshold_input()),
        outputs=(TensorConfig(block_models.SEGMENTATION, (-1, -1, -1), "TYPE_UINT64"),),
        max_batch_size=0,
        instance_count=options.instances,
        parameters=block_parameters(model, options, sha256, max_block),
    )


def segment_config(
    model: OnnxModel, options: RepositoryOptions, sha256: str, max_block: Triple
) -> ModelConfig:
    """A raw block (at most the maximum patch: one request to the affinity model)."""
    params = block_parameters(model, options, sha256, max_block)
    params[METADATA_PREFIX + "affinity_model"] = options.segment_affinity_model
    params[METADATA_PREFIX + "affinity_input"] = model.input_name
    params[METADATA_PREFIX + "affinity_output"] = model.output_name
    channels = model.spec.num_channels
    return ModelConfig(
        name=SEGMENT,
        backend="python",
        inputs=(TensorConfig(block_models.RAW, (-1, -1, -1), "TYPE_UINT8"), threshold_input()),
        outputs=(
            TensorConfig(block_models.SEGMENTATION, (-1, -1, -1), "TYPE_UINT64"),
            TensorConfig(block_models.AFFINITIES, (channels, -1, -1, -1)),
        ),
        max_batch_size=0,
        instance_count=options.instances,
        parameters=params,
    )


def shim(model_class: str) -> str:
    """``model.py`` of a block model: the class lives in ssn-deploy, the one that
    ``ssn-deploy serve start`` links (:data:`PACKAGE_VAR`), else the installed one (images)."""
    return (
        f'"""Written by ssn-deploy serve build-repo: {model_class} of '
        'ssn_deploy.serving.block_models."""\n\n'
        "import os\nimport sys\n\n"
        f'_linked = os.environ.get("{PACKAGE_VAR}")\n'
        "if _linked and _linked not in sys.path:\n"
        "    sys.path.insert(0, _linked)\n\n"
        "from ssn_deploy.serving.block_models import "
        f"{model_class} as TritonPythonModel  # noqa: E402\n\n"
        '__all__ = ["TritonPythonModel"]\n'
    )


# --- the manifest and the model card


@dataclass(frozen=True)
class Manifest:
    """``ssn-deploy.json``: what the server and clients need to know about a repository."""

    source: str
    sha256: str
    models: Mapping[str, str]
    """Model name → the backend that runs it (``python``, ``onnxruntime``)."""
    max_patch: Triple
    max_batch: int
    max_block: Triple | None = None
    """Largest block ``agglomerate`` takes (None in repositories written before it)."""

    @property
    def max_request_bytes(self) -> int:
        """The largest valid request body (float32), before protocol overhead."""
        z, y, x = self.max_patch
        return 4 * self.max_batch * z * y * x

    def to_json(self) -> str:
        data = {
            "source": self.source,
            "sha256": self.sha256,
            "models": dict(self.models),
            "max_patch": list(self.max_patch),
            "max_batch": self.max_batch,
            "max_request_bytes": self.max_request_bytes,
            "max_block": None if self.max_block is None else list(self.max_block),
        }
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def read(cls, repository: str | Path) -> Manifest | None:
        """The manifest of a repository written by :func:`build_repository`, else None."""
        path = Path(repository) / MANIFEST
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
            return cls(
                source=d["source"],
                sha256=d["sha256"],
                models=d["models"],
                max_patch=tuple(d["max_patch"]),  # type: ignore[arg-type]
                max_batch=int(d["max_batch"]),
                max_block=tuple(d["max_block"]) if d.get("max_block") else None,  # type: ignore[arg-type]
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"{path}: invalid manifest ({exc})") from None


def find_model_card(onnx_path: Path) -> Path | None:
    """The card beside the ONNX file: ``<stem>.md``, a packaged model's
    ``MODEL_CARD_<name>.md``, or ``MODEL_CARD.md``."""
    from ssn_deploy.inference.loader import PACKAGED_MODELS

    folder, stem = onnx_path.parent, onnx_path.stem
    names = [f"{stem}.md"]
    names += [f"MODEL_CARD_{m.name}.md" for m in PACKAGED_MODELS if m.stem == stem]
    names.append(CARD)
    return next((folder / n for n in names if (folder / n).is_file()), None)


def generated_card(model: OnnxModel) -> str:
    """A minimal card when the model ships none: its metadata, so the repository says what
    it serves."""
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in sorted(model.metadata.items()))
    return (
        f"# {model.path.name}\n\nNo model card was found beside the model; its metadata:\n\n"
        f"| key | value |\n| --- | --- |\n{rows}\n"
    )


# --- writing


def _prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; never delete a folder that is not a
    repository this package wrote (a mistyped ``-o $HOME``)."""
    if not out.exists():
        return
    if not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
        raise OutputExistsError(
            f"{out} is not a model repository written by ssn-deploy; refusing to replace it"
        )


def _write_model(folder: Path, config: ModelConfig, onnx_source: Path) -> None:
    (folder / VERSION).mkdir(parents=True)
    shutil.copyfile(onnx_source, folder / VERSION / ONNX_FILE)
    (folder / "config.pbtxt").write_text(render_config(config))


def build_repository(
    model: str | Path,
    out: str | Path,
    *,
    max_patch: Sequence[int] | None = None,
    max_batch: int = 4,
    instances: int = 1,
    threads: int = 0,
    tensorrt: str | None = None,
    warmup: bool = True,
    card: str | Path | None = None,
    overwrite: bool = False,
    max_block: Sequence[int] | None = None,
    segment_affinity_model: str = AFFINITY_PY,
) -> Manifest:
    """Write a Triton model repository for the ONNX ``model`` into ``out``.

    ``max_patch`` (Z,Y,X; default: the patch ``ssn-deploy infer`` uses for the model's voxel
    size) and ``max_batch`` bound requests; ``instances`` model instances run in parallel with
    ``threads`` onnxruntime threads each; ``tensorrt`` (fp32 | fp16) adds the TensorRT
    accelerator to ``affinity_onnx``. ``max_block`` (default: infer's block) bounds the blocks
    ``agglomerate`` takes; ``segment`` takes raw blocks up to ``max_patch`` and asks
    ``segment_affinity_model`` for their affinities. The repository is written beside ``out``
    and moved into place at the end, so a failed build leaves no half-written repository.
    """
    onnx_model = OnnxModel.read(model)
    out = Path(out)
    _prepare_output(out, overwrite)
    patch = default_max_patch(onnx_model.spec) if max_patch is None else max_patch
    options = RepositoryOptions(
        max_patch=tuple(int(p) for p in patch),  # type: ignore[arg-type]
        max_batch=max_batch,
        instances=instances,
        threads=threads,
        tensorrt=tensorrt,
        warmup=warmup,
        max_block=None if max_block is None else tuple(int(b) for b in max_block),  # type: ignore[arg-type]
        segment_affinity_model=segment_affinity_model,
    )
    check_options(onnx_model, options)
    block = options.max_block or default_max_block(onnx_model.spec)
    card_path = Path(card) if card is not None else find_model_card(onnx_model.path)
    if card_path is not None and not card_path.is_file():
        raise InputNotFoundError(f"model card not found: {card_path}")
    sha256 = file_sha256(onnx_model.path)

    partial = out.with_name(f".{out.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    _write_model(partial / AFFINITY_PY, python_config(onnx_model, options, sha256), onnx_model.path)
    shutil.copyfile(
        Path(__file__).with_name("affinity_model.py"), partial / AFFINITY_PY / VERSION / "model.py"
    )
    _write_model(partial / AFFINITY_ONNX, onnx_config(onnx_model, options, sha256), onnx_model.path)
    for name, config, model_class in (
        (AGGLOMERATE, agglomerate_config, "AgglomerateModel"),
        (SEGMENT, segment_config, "SegmentModel"),
    ):
        (partial / name / VERSION).mkdir(parents=True)
        (partial / name / VERSION / "model.py").write_text(shim(model_class))
        (partial / name / "config.pbtxt").write_text(
            render_config(config(onnx_model, options, sha256, block))
        )
    if card_path is not None:
        shutil.copyfile(card_path, partial / CARD)
    else:
        (partial / CARD).write_text(generated_card(onnx_model))
    manifest = Manifest(
        source=str(onnx_model.path.resolve()),
        sha256=sha256,
        models={
            AFFINITY_PY: "python",
            AFFINITY_ONNX: "onnxruntime",
            AGGLOMERATE: "python",
            SEGMENT: "python",
        },
        max_patch=options.max_patch,
        max_batch=options.max_batch,
        max_block=block,
    )
    (partial / MANIFEST).write_text(manifest.to_json())
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return manifest
