"""Helpers shared by the inference benchmarks (``inference.py``, ``backends.py``).

Why one module: both scripts must measure backends the same way (same real patches, the same
interleaved timing, the same reference and the same FLOP count), or their figures would not be
comparable. It is also an importable module rather than ``__main__``, so the predictor
factories below pickle *by reference* when dask ships them to its (in-process) worker, and the
counters they update are the ones this process reads.
"""

from __future__ import annotations

import copy
import csv
import functools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssn_deploy.inference.block import normalize
from ssn_deploy.inference.loader import load_predictor
from ssn_deploy.inference.predictor import ModelSpec, Predictor, SpecGeometry

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
VALIDATION = {  # packaged model → (dataset, validation region of its training config)
    "iso": ("fib_medulla_250", "93:125,:,:"),
    "aniso": ("fib_medulla_250_aniso5", "18:25,:,:"),
}
"""Where settings are chosen: never the test regions, since a setting chosen may ship."""
THRESHOLD_SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7)


def cli(*args: str) -> str:
    """Run ``ssn-deploy ARGS`` of this environment; its stdout (raises on failure)."""
    exe = Path(sys.executable).with_name("ssn-deploy")
    return subprocess.run([str(exe), *args], check=True, capture_output=True, text=True).stdout


def validation_region(data: Path, work: Path, model: str) -> tuple[Path, Path]:
    """Raw and labels of ``model``'s validation region as zarr under ``work`` (made once)."""
    stem, roi = VALIDATION[model]
    work.mkdir(parents=True, exist_ok=True)
    raw, gt = work / "raw.zarr", work / "gt.zarr"
    for path, dataset in ((raw, "volumes/raw"), (gt, "volumes/labels/neuron_ids")):
        if not path.exists():
            cli("convert", f"{data / stem}.hdf:{dataset}", str(path), "--roi", roi, "--no-progress")
    return raw, gt


ANISO_CUTS = (1, 2, 3, 4)
"""Phases at which ``aniso``'s validation tissue (``fib_medulla_250`` z ∈ [90, 125), the
sections [18, 25) of ``fib_medulla_250_aniso5`` at phase 0) is cut again into 50 nm sections:
4 × 6 more validation sections, so seven sections' noise does not pick the model."""


def aniso_validation_cuts(data: Path, work: Path) -> list[tuple[Path, Path]]:
    """Raw and labels of ``aniso``'s validation tissue at phase 0 (its validation region) and at
    every phase of :data:`ANISO_CUTS`, as zarr under ``work`` (made once)."""
    import h5py

    from ssn_deploy.training.data import thicken

    regions = [validation_region(data, work / "cut0", "aniso")]
    with h5py.File(data / RAW_250, "r") as f:
        raw, labels = f["volumes/raw"][90:125], f["volumes/labels/neuron_ids"][90:125]
    for phase in ANISO_CUTS:
        cut = work / f"cut{phase}"
        cut.mkdir(parents=True, exist_ok=True)
        hdf = cut / "cut.hdf"
        if not hdf.exists():
            thick_raw, thick_labels = thicken(raw[phase:], labels[phase:], 5)
            with h5py.File(hdf, "w") as out:
                for name, array in (("raw", thick_raw), ("labels/neuron_ids", thick_labels)):
                    out.create_dataset(f"volumes/{name}", data=array)
                    out[f"volumes/{name}"].attrs["resolution"] = (50.0, 10.0, 10.0)
        pair = cut / "raw.zarr", cut / "gt.zarr"
        for path, dataset in zip(pair, ("volumes/raw", "volumes/labels/neuron_ids"), strict=True):
            if not path.exists():
                cli("convert", f"{hdf}:{dataset}", str(path), "--no-progress")
        regions.append(pair)
    return regions


def threshold_sweep(
    affinities: str,
    gt: Path,
    work: Path,
    prefix: str,
    thresholds: Sequence[float] = THRESHOLD_SWEEP,
) -> dict[str, Any]:
    """``ssn-deploy segment`` of stored ``affinities`` at every threshold of the sweep, each
    scored by ``ssn-deploy evaluate``: VOI per threshold and the best."""
    sweep = {}
    for threshold in thresholds:
        swept = work / f"{prefix}_t{threshold}.zarr"
        cli("segment", affinities, "-o", str(swept), "--threshold", str(threshold),
            "--overwrite", "--no-progress")  # fmt: skip
        scores = json.loads(cli("evaluate", f"{swept}/segmentation", str(gt), "--json"))
        sweep[str(threshold)] = round(scores["voi"], 4)
    best = min(sweep, key=sweep.__getitem__)
    return {"voi_by_threshold": sweep, "best_threshold": float(best), "best_voi": sweep[best]}


CONFIG = REPO / "configs" / "fib_medulla_250.yaml"
PACKAGED_CHECKPOINT = REPO / "ssn_deploy" / "assets" / "models" / "default.ckpt"
RAW_520 = "fib_medulla_520_raw.hdf"
RAW_250 = "fib_medulla_250.hdf"
VOXEL_SIZE = (10.0, 10.0, 10.0)
CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
Triple = tuple[int, int, int]


# --- arguments and machine -----------------------------------------------------------------


def all_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def add_common_arguments(parser: Any) -> None:
    """Options both scripts take, with the same meaning."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of the HDF5 data")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="model checkpoint (default: the packaged default model if present, else the "
        "default architecture with random weights; throughput does not depend on weights)",
    )
    parser.add_argument("--threads", type=int, default=all_cores(), help="intra-op threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--patches", type=int, help="distinct real patches timed per backend")
    parser.add_argument("--repeats", type=int, help="timed calls per backend (after warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, to validate the script")


def require_device(device: str) -> None:
    """Fail with one clear line (not a traceback) when CUDA is asked for but absent."""
    if device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise SystemExit(
            f"--device cuda: torch {torch.__version__} ({build}) sees no CUDA GPU; "
            "run on a GPU machine with a CUDA build of torch, or use --device cpu"
        )


def cpu_info() -> dict[str, Any]:
    """CPU model and the SIMD flags that decide fp32/bf16 speed, from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), "x86_64"):
                model = value.strip()
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": {f: f in flags for f in CPU_FLAGS}}


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def machine_info(threads: int, device: str) -> dict[str, Any]:
    """What a reader needs to judge the figures: cores, flags, versions, and current load."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_info(),
        "cores_usable": all_cores(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "load_average_1min_start": os.getloadavg()[0],
        "torch": torch.__version__,
        "onnxruntime": package_version("onnxruntime") or package_version("onnxruntime-gpu"),
        "onnxruntime_providers": onnxruntime_providers(),
        "numpy": np.__version__,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "device": device,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "memory_gib": props.total_memory / 2**30,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    return info


# --- model ---------------------------------------------------------------------------------


@dataclass
class ModelFiles:
    """The checkpoint every backend runs (and its ONNX export), and where it came from."""

    checkpoint: Path
    weights: str
    onnx: Path | None = None


def default_model_config() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(CONFIG.read_text())["model"]


def prepare_checkpoint(checkpoint: Path | None, tmp: Path, seed: int) -> ModelFiles:
    """The given checkpoint, else the packaged default, else the default config at random."""
    if checkpoint is not None:
        return ModelFiles(checkpoint, f"checkpoint {checkpoint}")
    if PACKAGED_CHECKPOINT.is_file():
        return ModelFiles(PACKAGED_CHECKPOINT, f"packaged default model {PACKAGED_CHECKPOINT}")
    from ssn_deploy.models import Normalization, build_model, save_checkpoint

    torch.manual_seed(seed)
    model = build_model(default_model_config()).eval()
    path = save_checkpoint(
        tmp / "random.ckpt", model, normalization=Normalization(), voxel_size=VOXEL_SIZE
    )
    return ModelFiles(path, f"random weights, architecture of {CONFIG.relative_to(REPO)}")


def export_onnx_once(files: ModelFiles, tmp: Path) -> Path:
    """ONNX of exactly the checkpoint under test (not a possibly stale packaged .onnx)."""
    if files.onnx is None:
        from ssn_deploy.export.onnx_export import export_onnx

        files.onnx = export_onnx(files.checkpoint, tmp / "model.onnx")
    return files.onnx


def try_export_onnx(files: ModelFiles, tmp: Path) -> None:
    """Export before timing (so no row's build time includes it); a failure is left to the
    onnxruntime rows, which retry and record the error instead of stopping the run."""
    try:
        export_onnx_once(files, tmp)
    except Exception as exc:
        print(f"ONNX export failed ({type(exc).__name__}: {exc}); onnxruntime rows will say why")


def conv_flops(checkpoint: Path, patch_shape: Sequence[int]) -> dict[str, Any]:
    """FLOPs of one patch (2 × MACs of every conv and transposed conv), counted on ``meta``.

    On the meta device no arithmetic runs, so the count is exact at the real patch shape and
    costs nothing; everything else the model does (norm, ELU, pooling) is omitted, as usual.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from ssn_deploy.models import load_checkpoint

    model = copy.deepcopy(load_checkpoint(checkpoint).model).to("meta").eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.empty((1, 1, *patch_shape), device="meta"))
    per_op = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    total = int(counter.get_total_flops())
    return {
        "flops_per_patch": total,
        "flops_per_voxel": total / math.prod(patch_shape),
        "by_op": per_op,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# --- data ----------------------------------------------------------------------------------


def read_patches(data: Path, shape: Sequence[int], count: int, seed: int) -> np.ndarray:
    """``count`` uint8 patches at seeded random places of the unlabelled 520³ volume."""
    import h5py

    path = data / RAW_520
    if not path.is_file():
        raise SystemExit(f"{path} not found; pass --data FOLDER holding {RAW_520}")
    rng = np.random.default_rng(seed)
    with h5py.File(path, "r") as f:
        raw = f["volumes/raw"]
        if any(p > s for p, s in zip(shape, raw.shape, strict=True)):
            raise SystemExit(f"patch {tuple(shape)} does not fit in {path} {raw.shape}")
        patches = []
        for _ in range(count):
            begin = [int(rng.integers(0, s - p + 1)) for p, s in zip(shape, raw.shape, strict=True)]
            patches.append(raw[tuple(slice(b, b + p) for b, p in zip(begin, shape, strict=True))])
    return np.stack(patches)


# --- memory --------------------------------------------------------------------------------


def max_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_bytes() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Peak resident memory *per phase*, sampled every few ms from /proc/self/statm.

    ``ru_maxrss`` only ever grows, so within one process it cannot tell which phase needed the
    memory; a sampler thread can (it may miss a spike shorter than its period).
    """

    def __init__(self, period_s: float = 0.005) -> None:
        self.period_s = period_s
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = _current_rss_bytes() is not None

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            rss = _current_rss_bytes() or 0
            self._peak = max(self._peak, rss)

    def __enter__(self) -> RssSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    @contextmanager
    def phase(self, into: dict[str, Any]) -> Iterator[None]:
        """Record ``rss_before_mib`` and ``rss_peak_mib`` of the enclosed code into ``into``."""
        before = _current_rss_bytes() or 0
        self._peak = before
        try:
            yield
        finally:
            self._peak = max(self._peak, _current_rss_bytes() or 0)
            if self.available:
                into["rss_before_mib"] = before / 2**20
                into["rss_peak_mib"] = self._peak / 2**20


# --- timing --------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, n: int, repeats: int, device: str) -> dict[str, Any]:
    """Best-of-``repeats`` GFLOP/s of an n×n ``torch.mm``: the attainable peak of this machine.

    Measured in the same run as the model, so the model's fraction of peak does not depend on
    what else the shared machine was doing on another day.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    torch.mm(a, b)  # warm-up (oneDNN / cuBLAS kernel selection)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - start)
    best = min(times)
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "gflops": 2 * n**3 / best / 1e9,
        "best_s": best,
        "repeats": repeats,
    }


def matmul_peaks(
    device: str, quick: bool, dtypes: set[str] | None = None
) -> dict[str, dict[str, Any]]:
    """fp32 and bf16 peaks (plus fp16 and TF32 on a GPU), keyed like the rows' ``peak``.

    ``dtypes`` limits the bf16 peak to runs that measure a bf16 row: without AVX512-BF16 a
    bf16 matmul falls back to an emulation path that takes minutes at this size.
    """
    n = 1024 if quick else (8192 if device == "cuda" else 4096)
    repeats = 3 if quick else (10 if device == "cuda" else 5)
    peaks = {"fp32": matmul_peak(torch.float32, n, repeats, device)}
    if dtypes is None or "bf16" in dtypes:
        peaks["bf16"] = matmul_peak(torch.bfloat16, n, repeats, device)
    if device == "cuda":
        peaks["fp16"] = matmul_peak(torch.float16, n, repeats, device)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            peaks["tf32"] = matmul_peak(torch.float32, n, repeats, device) | {"dtype": "tf32"}
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    return peaks


# --- backends ------------------------------------------------------------------------------


@dataclass
class Backend:
    """One row: how to build its predictor, and which matmul peak it is measured against.

    ``skip`` (a reason) marks a row that cannot run here; ``warmup`` calls precede timing (the
    first call of a compiled backend compiles, and its time is reported as the compile time).
    """

    name: str
    make: Callable[[], Predictor] | None
    peak: str
    device: str = "cpu"
    warmup: int = 1
    skip: str | None = None
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def torch_backend(
    name: str, files: ModelFiles, device: str, precision: str, threads: int, **kw: Any
) -> Backend:
    make = functools.partial(
        load_predictor,
        files.checkpoint,
        "torch",
        device=device,
        precision=precision,
        threads=threads,
        compile=kw.pop("compile", False),
    )
    return Backend(name, make, precision, device=device, **kw)


def export_fp16_once(files: ModelFiles, tmp: Path) -> Path:
    """The fp16 variant of the graph under test, as ``ssn-deploy export --fp16`` writes it."""
    path = tmp / "model.fp16.onnx"
    if not path.is_file():
        from ssn_deploy.export import export_fp16, export_onnx

        simplified = export_onnx(files.checkpoint, tmp / "model.simplified.onnx", simplify=True)
        export_fp16(simplified, path)
    return path


def onnx_backend(
    name: str, files: ModelFiles, tmp: Path, device: str, threads: int, *, fp16: bool = False
) -> Backend:
    precision = "fp16" if fp16 else "fp32"
    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[device]
    providers = onnxruntime_providers()
    if not providers:
        return Backend(name, None, precision, device, skip="onnxruntime not installed")
    if provider not in providers:
        return Backend(
            name,
            None,
            precision,
            device,
            skip=f"package not installed: onnxruntime {package_version('onnxruntime')} has no "
            f"{provider} (available: {', '.join(providers)}); install onnxruntime-gpu",
        )

    def make() -> Predictor:
        path = export_fp16_once(files, tmp) if fp16 else export_onnx_once(files, tmp)
        return load_predictor(path, "onnxruntime", device=device, threads=threads)

    return Backend(name, make, precision, device)


class _Timer:
    """Wraps a predictor; times ``predict`` with device sync; keeps the geometry."""

    def __init__(self, predictor: Predictor, device: str) -> None:
        self.predictor, self.device = predictor, device

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, float]:
        sync(self.device)
        start = time.perf_counter()
        out = self.predictor.predict(batch)
        sync(self.device)
        return out, time.perf_counter() - start


def _error_text(exc: BaseException) -> str:
    """The error as its type, message and innermost frames (enough to act on, not a wall)."""
    frames = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = "".join(frames[-3:]).strip()
    return text[-4000:]


def _max_abs(a: np.ndarray, b: np.ndarray, margin: Sequence[int]) -> tuple[float, float]:
    """Max |a − b| over the whole patch and over its core (what the engine keeps)."""
    core = (Ellipsis, *(slice(m, s - m) for m, s in zip(margin, a.shape[-3:], strict=True)))
    return float(np.abs(a - b).max()), float(np.abs(a[core] - b[core]).max())


def _cuda_peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def engine_batch(raw: np.ndarray, normalization: Any) -> np.ndarray:
    """A batch of one patch built exactly as ``predict_block`` builds it (``np.stack``, then a
    new axis): torch.compile guards on strides, even of size-1 axes, so a differently built
    array (e.g. ``x[None, None]``) would make the engine's first call recompile."""
    return np.stack([normalize(raw, normalization)])[:, None]


def compare_backends(
    backends: Sequence[Backend],
    raw_patches: np.ndarray,
    *,
    reference: str,
    repeats: int,
    margin: Sequence[int],
    sampler: RssSampler,
    keep: dict[str, Predictor] | None = None,
) -> dict[str, dict[str, Any]]:
    """Time every backend on the same real patches, interleaved, and diff it to ``reference``.

    Warm-up runs one backend at a time (its build time, compile time, and peak memory are its
    own); timed calls then alternate between backends round by round, in a rotating order, so
    load from other processes on a shared machine hits all of them alike. Round ``r`` feeds
    patch ``r mod P`` to every backend; differences are taken against the reference backend's
    output for the same patch. ``keep``, if given, receives the warm predictors by name.
    """
    rows: dict[str, dict[str, Any]] = {}
    runners: dict[str, _Timer] = {}
    normalization = None
    for b in backends:
        row: dict[str, Any] = {"device": b.device, "peak": b.peak} | b.extra
        if b.note:
            row["note"] = b.note
        rows[b.name] = row
        if b.skip or b.make is None:
            row.update(status="not measured", reason=b.skip)
            continue
        try:
            with sampler.phase(row):
                start = time.perf_counter()
                predictor = b.make()
                row["build_s"] = time.perf_counter() - start
                normalization = normalization or predictor.normalization
                x = engine_batch(raw_patches[0], predictor.normalization)
                _cuda_peak_reset(b.device)
                timer = _Timer(predictor, b.device)
                warm = [timer(x)[1] for _ in range(b.warmup)]
            row["warmup_s"] = warm
            if b.device == "cuda":
                row["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            runners[b.name] = timer
            if keep is not None:
                keep[b.name] = predictor
            row["status"] = "measured"
        except Exception as exc:  # record, never hide, why a backend cannot run here
            row.update(status="failed", error=_error_text(exc))
    if reference not in runners:
        raise SystemExit(f"the reference backend {reference!r} failed: {rows[reference]}")
    assert normalization is not None
    inputs = [engine_batch(p, normalization) for p in raw_patches]
    times: dict[str, list[float]] = {name: [] for name in runners}
    diffs: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(repeats):
        x = inputs[r % len(inputs)]
        order = names[r % len(names) :] + names[: r % len(names)]
        outputs = {}
        for name in order:
            try:
                outputs[name], seconds = runners[name](x)
                times[name].append(seconds)
            except Exception as exc:
                rows[name].update(status="failed", error=_error_text(exc))
        if reference not in outputs:
            raise SystemExit(f"the reference backend {reference!r} failed: {rows[reference]}")
        ref = outputs[reference]
        for name, out in outputs.items():
            diffs[name].append(_max_abs(out, ref, margin))
        del outputs, ref
    voxels = math.prod(raw_patches.shape[1:])
    for name in names:
        row, t = rows[name], times[name]
        if not t:
            continue
        best, median = min(t), statistics.median(t)
        row.update(
            times_s=t,
            s_per_patch_best=best,
            s_per_patch_median=median,
            model_mvox_per_s=voxels / best / 1e6,
            model_mvox_per_s_median=voxels / median / 1e6,
            max_abs_diff=max(d[0] for d in diffs[name]),
            max_abs_diff_core=max(d[1] for d in diffs[name]),
        )
    base = rows[reference]["s_per_patch_best"]
    base_median = rows[reference]["s_per_patch_median"]
    for name in names:
        if "s_per_patch_best" in rows[name]:
            rows[name]["speed_vs_reference"] = base / rows[name]["s_per_patch_best"]
            rows[name]["speed_vs_reference_median"] = base_median / rows[name]["s_per_patch_median"]
    return rows


def add_flop_rates(
    rows: dict[str, dict[str, Any]], flops_per_patch: int, peaks: dict[str, dict[str, Any]]
) -> None:
    """Achieved GFLOP/s (best patch time) and its fraction of the row's matmul peak."""
    for row in rows.values():
        if "s_per_patch_best" not in row:
            continue
        gflops = flops_per_patch / row["s_per_patch_best"] / 1e9
        peak = peaks.get(row["peak"])
        row["gflops"] = gflops
        row["fraction_of_peak"] = gflops / peak["gflops"] if peak else None


# --- instrumented predictors for the engine -------------------------------------------------

ENGINE_STATS: dict[str, float] = {}
_STATS_LOCK = threading.Lock()


def reset_engine_stats() -> None:
    with _STATS_LOCK:
        ENGINE_STATS.clear()
        ENGINE_STATS.update(loads=0, load_s=0.0, predict_calls=0, patches=0, predict_s=0.0)


class TimedPredictor:
    """A predictor that adds its build and ``predict`` wall time to :data:`ENGINE_STATS`.

    So the engine's end-to-end time splits into model time and everything else, measured
    inside the very run, not estimated.
    """

    def __init__(self, inner: Predictor, device: str) -> None:
        self._inner, self._device = inner, device

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        sync(self._device)
        start = time.perf_counter()
        out = self._inner.predict(batch)
        sync(self._device)
        with _STATS_LOCK:
            ENGINE_STATS["predict_s"] += time.perf_counter() - start
            ENGINE_STATS["predict_calls"] += 1
            ENGINE_STATS["patches"] += len(batch)
        return out


def timed_predictor(model: Path, backend: str, **options: Any) -> TimedPredictor:
    """Picklable factory (``functools.partial`` of this) for the engine's worker threads."""
    start = time.perf_counter()
    inner = load_predictor(model, backend, **options)
    with _STATS_LOCK:
        ENGINE_STATS["loads"] += 1
        ENGINE_STATS["load_s"] += time.perf_counter() - start
    return TimedPredictor(inner, options.get("device", "cpu"))


class NullPredictor(SpecGeometry):
    """A zero-cost model with the real one's geometry: the engine's time without any model."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._out: np.ndarray | None = None

    @property
    def provenance(self) -> dict[str, Any]:
        return {"model": "null", "backend": "null", "precision": "none"}

    def predict(self, batch: np.ndarray) -> np.ndarray:
        shape = (len(batch), self.num_channels, *batch.shape[2:])
        if self._out is None or self._out.shape != shape:
            self._out = np.full(shape, 0.5, dtype=np.float32)
        with _STATS_LOCK:
            ENGINE_STATS["predict_calls"] += 1
            ENGINE_STATS["patches"] += len(batch)
        return self._out


reset_engine_stats()


def null_predictor(checkpoint: Path) -> NullPredictor:
    """Picklable factory of :class:`NullPredictor` for the checkpoint's geometry."""
    from ssn_deploy.models import load_checkpoint

    with _STATS_LOCK:
        ENGINE_STATS["loads"] += 1
    return NullPredictor(ModelSpec.from_checkpoint(load_checkpoint(checkpoint)))


# --- output --------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".3g") -> str:
    """A table cell: numbers formatted, absent values as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float | int) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def not_measured(rows: dict[str, dict[str, Any]]) -> list[str]:
    """One line per row without timings: why it was not measured, or the error's last line."""
    lines = []
    for name, r in rows.items():
        if "s_per_patch_best" in r:
            continue
        error = (r.get("error") or "").strip().splitlines()
        why = r.get("reason") or (error[-1] if error else "no timings")
        lines.append(f"  {name} ({r['device']}): {r.get('status', '')}: {why}")
    return lines


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Atomically, so an interrupted run never leaves half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(report, f, indent=2, default=str)
        f.write("\n")
    os.replace(f.name, path)
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


def validation_history(
    log_csv: Path, fields: Sequence[str] = ("voi", "arand", "threshold")
) -> list[dict[str, float]]:
    """The validation rows of a training run's ``log.csv`` (``val_`` dropped from the names)."""
    with open(log_csv, newline="") as f:
        return [
            {"iteration": int(r["iteration"])} | {k: float(r[f"val_{k}"]) for k in fields}
            for r in csv.DictReader(f)
            if r.get("val_voi")
        ]
