"""Inference speed (issue 4): backends on real patches, engine efficiency, FLOP rate, memory.

One run, one process, everything against a baseline measured in the same run:

1. Backends. onnxruntime and torch eager (fp32 and bf16 autocast; fp16 too on a GPU) predict
   the same real patches of the default patch shape (``pipeline.default_geometry``) from the
   unlabelled 520³ volume, interleaved round by round. Reported: s/patch (best and median),
   input voxels/s, speed as a ratio to torch eager fp32, and max |Δ| to torch fp32 (whole
   patch, and the core the engine keeps).
2. FLOP rate. FLOPs per patch = 2 × MACs of every (transposed) convolution, counted with
   ``FlopCounterMode`` on the meta device at the real patch shape; GFLOP/s = that / s per patch,
   as a fraction of a ``torch.mm`` peak measured in this run (fp32 for fp32 rows, bf16 for bf16).
3. Engine efficiency. ``predict_affinities`` (the real engine: dask, zarr in and out, default
   geometry) on a real raw crop written to a temporary zarr: by default 112×224×224 from the
   centre of the 520³ volume (18 patches at the default geometry, one block: a bf16 run of
   ~2 min on 2 cores keeps the whole script under 5 min); ``--region test`` takes the
   fib_medulla_250 test region (48 patches), ``--crop 128,256,512`` spans two blocks (lattice
   overhead measured, not only counted). Patches are counted exactly as the
   engine does (``PatchGrid.cores_for`` per block): *needed* = the lattice's patches for the
   whole volume, *computed* = the sum over blocks (patches straddling block faces are computed
   by each block); the difference is the lattice overhead. efficiency = needed × per-patch
   time (median, step 1) / end-to-end time. The predictor is wrapped to time its own calls, and
   the engine also runs once with a zero-cost model, so the end-to-end time splits into model
   time and engine overhead, both measured.
4. Memory. Peak RSS per phase (sampled) and of the process (``ru_maxrss``); tracemalloc of one
   block with the zero-cost model (numpy buffers: raw, accumulator, encoding; torch/onnxruntime
   memory is invisible to tracemalloc, so it is not used for the backends).

    python benchmarks/inference.py [--quick] [--device cpu|cuda] [--checkpoint PATH]
        [--threads N] [--engine torch-bf16] [--region 520|test] [--crop Z,Y,X]
        [--patches 2] [--repeats 2] [--data DIR]

Writes benchmarks/results/inference.json (``--quick``: inference_quick.json).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import tempfile
import time
import tracemalloc
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _common as c
import numpy as np
import torch

from ssn_deploy.geometry import BlockGrid, Box
from ssn_deploy.inference import PatchGrid, predict_affinities, predict_block
from ssn_deploy.inference.engine import encode_affinities
from ssn_deploy.models import load_checkpoint
from ssn_deploy.models.spec import ModelSpec
from ssn_deploy.pipeline import default_geometry
from ssn_deploy.volumes import create_volume, open_volume

TEST_Z = (125, 250)
QUICK_PATCH = (32, 32, 32)
QUICK_BLOCK = (32, 32, 64)
QUICK_CROP = (32, 64, 64)
CROP_520 = (112, 224, 224)
ENGINES = {  # --engine → (row name, load_predictor backend, precision)
    "torch-fp32": ("torch fp32", "torch", "fp32"),
    "torch-bf16": ("torch bf16", "torch", "bf16"),
    "torch-fp16": ("torch fp16", "torch", "fp16"),
    "onnxruntime-fp32": ("onnxruntime fp32", "onnxruntime", "fp32"),
}


@dataclass(frozen=True)
class Plan:
    """The geometry under test: what ``ssn-deploy infer`` would use for this model."""

    patch_shape: c.Triple
    margin: c.Triple
    overlap: c.Triple
    block_shape: c.Triple
    granularity: c.Triple
    context: c.Triple

    def grid(self) -> PatchGrid:
        return PatchGrid.plan(self.patch_shape, self.margin, self.overlap, self.granularity)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    c.add_common_arguments(parser)
    parser.add_argument(
        "--engine",
        choices=sorted(ENGINES),
        default="torch-bf16",
        help="backend the engine runs (its per-patch time is the efficiency's model time)",
    )
    parser.add_argument(
        "--region",
        choices=["test", "520"],
        default="520",
        help="engine input: the fib_medulla_250 test region z∈[125,250) (250 px in y, x), or a "
        "--crop at the centre of fib_medulla_520_raw",
    )
    parser.add_argument(
        "--crop",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        default=CROP_520,
        help="Z,Y,X of the --region 520 crop (e.g. 128,256,512: two blocks, lattice overhead)",
    )
    parser.add_argument("--output", type=Path, help="results JSON (default: benchmarks/results)")
    args = parser.parse_args()
    args.patches = args.patches or 2
    args.repeats = args.repeats or 2
    name = "inference_quick.json" if args.quick else "inference.json"
    args.output = args.output or c.RESULTS / name
    return args


def make_plan(checkpoint: Path, quick: bool) -> Plan:
    """``default_geometry`` for this model at 10 nm (``--quick``: a tiny patch and block)."""
    ckpt = load_checkpoint(checkpoint)
    model = c.NullPredictor(ModelSpec.from_checkpoint(ckpt))
    geometry = default_geometry(model, ckpt.voxel_size)
    patch, margin, block = geometry.patch_shape, geometry.margin, geometry.block_shape
    if quick:
        patch, block = QUICK_PATCH, QUICK_BLOCK
        margin = tuple(min(x, p // 8) for x, p in zip(model.context, patch, strict=True))
    return Plan(patch, margin, geometry.overlap, block, model.granularity, model.context)


def backends_for(args: argparse.Namespace, files: c.ModelFiles, tmp: Path) -> list[c.Backend]:
    """torch fp32 (the reference), torch bf16 (and fp16 on a GPU), onnxruntime fp32."""
    dev, threads = args.device, args.threads
    rows = [
        c.torch_backend("torch fp32", files, dev, "fp32", threads),
        c.torch_backend("torch bf16", files, dev, "bf16", threads),
    ]
    if dev == "cuda":
        rows.append(c.torch_backend("torch fp16", files, dev, "fp16", threads))
    rows.append(c.onnx_backend("onnxruntime fp32", files, tmp, dev, threads))
    return rows


# --- engine ----------------------------------------------------------------------------------


def read_region(args: argparse.Namespace) -> tuple[np.ndarray, str]:
    """The raw crop the engine runs on, and a description of where it came from."""
    import h5py

    if args.region == "test":
        path = args.data / c.RAW_250
        z0, z1 = TEST_Z
        y1 = x1 = None
        if args.quick:
            z1, y1, x1 = z0 + QUICK_CROP[0], QUICK_CROP[1], QUICK_CROP[2]
        with h5py.File(path, "r") as f:
            data = f["volumes/raw"][z0:z1, :y1, :x1]
        return data, f"{path}:volumes/raw[{z0}:{z1}, :{y1 or ''}, :{x1 or ''}] (test region)"
    path = args.data / c.RAW_520
    shape = QUICK_CROP if args.quick else args.crop
    with h5py.File(path, "r") as f:
        raw = f["volumes/raw"]
        begin = [(s - n) // 2 for s, n in zip(raw.shape, shape, strict=True)]
        box = tuple(slice(b, b + n) for b, n in zip(begin, shape, strict=True))
        return raw[box], f"{path}:volumes/raw centre crop at {begin}"


def write_raw(data: np.ndarray, tmp: Path) -> str:
    """Raw as the engine meets it in production: a chunked, compressed zarr v3 volume."""
    spec = str(tmp / "raw.zarr")
    volume = create_volume(spec, data.shape, data.dtype, voxel_size=c.VOXEL_SIZE)
    volume[...] = data
    return spec


def lattice_counts(grid: PatchGrid, shape: c.Triple, block_shape: c.Triple) -> dict[str, Any]:
    """Patches the lattice needs for the volume vs. the ones the engine computes, per block."""
    blocks = BlockGrid(Box.from_shape(shape), block_shape, context=0)
    needed = len(grid.cores_for(Box.from_shape(shape)))
    computed = sum(len(grid.cores_for(b.write_box)) for b in blocks)
    patch_voxels = math.prod(grid.patch_shape)
    return {
        "volume_shape": list(shape),
        "blocks": len(blocks),
        "patches_needed": needed,
        "patches_computed": computed,
        "lattice_overhead_patches": computed - needed,
        "lattice_overhead_fraction": (computed - needed) / needed,
        "model_voxels_per_output_voxel": computed * patch_voxels / math.prod(shape),
    }


def run_engine(raw_spec: str, out_spec: str, factory: Any, plan: Plan) -> dict[str, Any]:
    """One end-to-end ``predict_affinities`` call, and what the instrumented model saw."""
    c.reset_engine_stats()
    start = time.perf_counter()
    predict_affinities(
        raw_spec,
        out_spec,
        factory,
        block_shape=plan.block_shape,
        patch_shape=plan.patch_shape,
        margin=plan.margin,
        overlap=plan.overlap,
        workers=1,
        overwrite=True,
        progress=False,
    )
    return {"end_to_end_s": time.perf_counter() - start, **c.ENGINE_STATS}


def block_numpy_memory(raw_spec: str, files: c.ModelFiles, plan: Plan) -> dict[str, Any]:
    """tracemalloc peak of the engine's numpy work for its largest block (zero-cost model)."""
    raw = open_volume(raw_spec)
    blocks = BlockGrid(Box.from_shape(raw.shape), plan.block_shape, context=0)
    block = max(blocks, key=lambda b: len(plan.grid().cores_for(b.write_box)))
    model = c.null_predictor(files.checkpoint)
    tracemalloc.start()
    try:
        aff = predict_block(raw, block.write_box, model, plan.grid())
        encoded = encode_affinities(aff, "uint8")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del encoded
    cores = plan.grid().cores_for(block.write_box)
    inputs = [plan.grid().input_box(core) for core in cores]
    lo = np.min([b.begin for b in inputs], axis=0)
    hi = np.max([b.end for b in inputs], axis=0)
    return {
        "block": list(block.write_box.shape),
        "raw_region_read": (hi - lo).tolist(),
        "raw_region_float32_mib": float(np.prod(hi - lo)) * 4 / 2**20,
        "tracemalloc_peak_mib": peak / 2**20,
        "float32_output_mib": aff.nbytes / 2**20,
        "note": "numpy only (raw region, accumulator, blend, uint8 encoding); excludes the model",
    }


def engine_section(
    args: argparse.Namespace,
    files: c.ModelFiles,
    plan: Plan,
    rows: dict[str, dict[str, Any]],
    tmp: Path,
    sampler: c.RssSampler,
) -> dict[str, Any]:
    """Engine efficiency on a real crop; model time from the backend table (same process)."""
    row_name, backend, precision = ENGINES[args.engine]
    row = rows.get(row_name, {})
    if "s_per_patch_median" not in row:
        raise SystemExit(f"--engine {args.engine}: its backend row was not measured ({row})")
    import distributed  # noqa: F401  (imported once here, not inside the first timed run)

    data, source = read_region(args)
    raw_spec = write_raw(data, tmp)
    grid = plan.grid()
    counts = lattice_counts(grid, data.shape, plan.block_shape)
    model = c.export_onnx_once(files, tmp) if backend == "onnxruntime" else files.checkpoint
    options = {"device": args.device, "threads": args.threads}
    if backend == "torch":
        options["precision"] = precision
    section: dict[str, Any] = {"backend": row_name, "source": source, **counts}
    null_run: dict[str, Any] = {}
    with sampler.phase(null_run):
        null_run.update(
            run_engine(
                raw_spec,
                str(tmp / "null.zarr"),
                functools.partial(c.null_predictor, files.checkpoint),
                plan,
            )
        )
    real_run: dict[str, Any] = {}
    with sampler.phase(real_run):
        factory = functools.partial(c.timed_predictor, model, backend, **options)
        real_run.update(run_engine(raw_spec, str(tmp / "aff.zarr"), factory, plan))
    t_patch = row["s_per_patch_median"]
    e2e = real_run["end_to_end_s"]
    in_engine = real_run["predict_s"] / max(1, real_run["patches"])
    section.update(
        s_per_patch=t_patch,
        model_s_needed=counts["patches_needed"] * t_patch,
        model_s_computed=counts["patches_computed"] * t_patch,
        end_to_end_s=e2e,
        efficiency=counts["patches_needed"] * t_patch / e2e,
        efficiency_without_lattice_overhead=counts["patches_computed"] * t_patch / e2e,
        in_engine_predict_s=real_run["predict_s"],
        in_engine_s_per_patch=in_engine,
        in_engine_vs_isolated_patch_time=in_engine / t_patch,
        non_model_s=e2e - real_run["predict_s"],
        output_mvox_per_s=data.size / e2e / 1e6,
        real_run=real_run,
        zero_cost_model_run=null_run,
        numpy_memory_per_block=block_numpy_memory(raw_spec, files, plan),
        target=0.8,
    )
    if real_run["patches"] != counts["patches_computed"]:
        section["warning"] = (
            f"the engine predicted {real_run['patches']} patches, the count says "
            f"{counts['patches_computed']}"
        )
    return section


# --- lattice at scale (analytical) -----------------------------------------------------------


def _divisor_core(
    block: int, g: int, at_least: int, at_most: int, largest: bool = True
) -> int | None:
    """The largest (or smallest) multiple of ``g`` dividing ``block`` in [at_least, at_most]."""
    options = [k for k in range(g, block + 1, g) if block % k == 0 and at_least <= k <= at_most]
    if not options:
        return None
    return max(options) if largest else min(options)


def alternatives(plan: Plan) -> list[tuple[str, c.Triple, c.Triple]]:
    """Patch/margin choices whose stride equals the core, for comparison with the default.

    The default margin (patch/8) leaves a core that is not a multiple of the granularity, so
    the stride is rounded down below the core: cores overlap by a few voxels, and every block
    face and the volume origin get an extra layer of patches. These keep the core a multiple of
    the granularity (stride == core), the last two also make it divide the block.
    """
    out = [("default", plan.patch_shape, plan.margin)]
    m1, m2, p3, m3 = [], [], [], []
    for p, m, b, g in zip(
        plan.patch_shape, plan.margin, plan.block_shape, plan.granularity, strict=True
    ):
        m1.append(m + ((p - 2 * m) % g) // 2)
        core = _divisor_core(b, g, 1, p - 2 * math.ceil(m / 2))
        m2.append((p - core) // 2 if core else m1[-1])
        core = _divisor_core(b, g, p - 2 * m, b, largest=False) or b
        patch = -(-(core + 2 * m1[-1]) // g) * g
        p3.append(patch)
        m3.append((patch - core) // 2)
    out.append(("same patch, core rounded to granularity", plan.patch_shape, tuple(m1)))
    out.append(("same patch, core divides the block", plan.patch_shape, tuple(m2)))
    out.append(("larger patch, core divides the block", tuple(p3), tuple(m3)))
    return out  # type: ignore[return-value]


def lattice_section(plan: Plan, t_patch: float, volume: c.Triple) -> list[dict[str, Any]]:
    """Patch counts of the default and alternative geometries (counted, not timed).

    Model seconds are estimated as patches × the measured default patch time × voxel ratio
    (conv time grows with voxels), for one interior block and for the whole 520³ volume.
    """
    results = []
    default_voxels = math.prod(plan.patch_shape)
    for label, patch, margin in alternatives(plan):
        try:
            grid = PatchGrid.plan(patch, margin, plan.overlap, plan.granularity)
        except Exception as exc:
            results.append({"geometry": label, "error": str(exc)})
            continue
        interior = Box(plan.block_shape, plan.block_shape)
        per_block = len(grid.cores_for(interior))
        scale = math.prod(patch) / default_voxels
        whole = lattice_counts(grid, (520, 520, 520), plan.block_shape)
        here = lattice_counts(grid, volume, plan.block_shape)
        results.append(
            {
                "geometry": label,
                "patch_shape": list(patch),
                "margin": list(margin),
                "stride": list(grid.stride),
                "core": list(grid.core_shape),
                "patches_per_interior_block": per_block,
                "model_voxels_per_output_voxel_interior": grid.cost(plan.block_shape),
                "est_model_s_per_interior_block": per_block * t_patch * scale,
                "fib_520": whole,
                "est_model_s_fib_520": whole["patches_computed"] * t_patch * scale,
                "engine_volume": here,
                "est_model_s_engine_volume": here["patches_computed"] * t_patch * scale,
            }
        )
    base = results[0]["est_model_s_per_interior_block"]
    for r in results:
        if "est_model_s_per_interior_block" in r:
            r["est_speedup_vs_default"] = base / r["est_model_s_per_interior_block"]
    return results


# --- report ----------------------------------------------------------------------------------


def print_report(report: dict[str, Any]) -> None:
    m, model, plan = report["machine"], report["model"], report["geometry"]
    flags = [f for f, on in m["cpu"]["flags"].items() if on]
    print(
        f"\nmachine: {m['cores_usable']} cores ({m['cpu']['model']}; {' '.join(flags)}), "
        f"{m['threads']} threads, load {m['load_average_1min_start']:.2f} → "
        f"{report['load_average_1min_end']:.2f} (1 min); torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}"
    )
    print(
        f"model: {model['weights']}; {model['parameters'] / 1e6:.2f} M parameters; "
        f"{model['flops_per_patch'] / 1e9:.1f} GFLOP per {plan['patch_shape']} patch "
        f"({model['flops_per_voxel'] / 1e3:.1f} kFLOP/voxel)"
    )
    peaks = report["matmul_peak"]
    rates = ", ".join(f"{k} {v['gflops']:.0f} GFLOP/s" for k, v in peaks.items())
    print(f"matmul peak: {rates} ({peaks['fp32']['n']}², best of {peaks['fp32']['repeats']})")
    print(
        f"\nbackends on {report['patches']} real patches {plan['patch_shape']}, "
        f"{report['repeats']} interleaved calls each (ratio: torch fp32 s/patch ÷ this)"
    )
    header = (
        "backend;device;s/patch best;median;Mvox/s;vs torch fp32;"
        "GFLOP/s;of peak;max|Δ|;core max|Δ|;peak RSS MiB"
    ).split(";")
    lines = []
    for name, r in report["backends"].items():
        if "s_per_patch_best" not in r:
            continue
        peak = r.get("fraction_of_peak")
        lines.append(
            [
                name,
                r["device"],
                c.fmt(r["s_per_patch_best"]),
                c.fmt(r["s_per_patch_median"]),
                c.fmt(r["model_mvox_per_s"]),
                f"{r['speed_vs_reference']:.2f}x",
                c.fmt(r["gflops"]),
                f"{peak:.0%} {r['peak']}" if peak else "-",
                c.fmt(r["max_abs_diff"], ".2g"),
                c.fmt(r["max_abs_diff_core"], ".2g"),
                c.fmt(r.get("rss_peak_mib"), ".0f"),
            ]
        )
    c.print_table(header, lines)
    missing = c.not_measured(report["backends"])
    if missing:
        print("\n".join(["not measured:", *missing]))
    e = report["engine"]
    print(
        f"\nengine ({e['backend']}, {e['source']}, volume {e['volume_shape']}, "
        f"blocks {plan['block_shape']} × {e['blocks']}, patches {plan['patch_shape']} "
        f"margin {plan['margin']} stride {plan['stride']}):"
    )
    print(
        f"  patches: needed {e['patches_needed']}, computed {e['patches_computed']}, "
        f"lattice overhead {e['lattice_overhead_patches']} "
        f"({e['lattice_overhead_fraction']:.0%}); "
        f"{e['model_voxels_per_output_voxel']:.1f} model voxels per output voxel"
    )
    print(
        f"  model time needed {e['patches_needed']} × {e['s_per_patch']:.3g} s = "
        f"{e['model_s_needed']:.1f} s; end to end {e['end_to_end_s']:.1f} s; "
        f"efficiency {e['efficiency']:.2f} (target ≥ {e['target']}); "
        f"without lattice overhead {e['efficiency_without_lattice_overhead']:.2f}"
    )
    z = e["zero_cost_model_run"]
    print(
        f"  inside the run: predict {e['in_engine_predict_s']:.1f} s "
        f"({e['in_engine_s_per_patch']:.3g} s/patch, {e['in_engine_vs_isolated_patch_time']:.2f}"
        f"× isolated), everything else {e['non_model_s']:.1f} s; the same run with a "
        f"zero-cost model: {z['end_to_end_s']:.1f} s; model loads {e['real_run']['loads']:.0f}"
        f" ({e['real_run']['load_s']:.2f} s)"
    )
    mem = e["numpy_memory_per_block"]
    print(
        f"  numpy memory of block {mem['block']}: {mem['tracemalloc_peak_mib']:.0f} MiB "
        f"(tracemalloc; raw region read {mem['raw_region_read']} = "
        f"{mem['raw_region_float32_mib']:.0f} MiB as float32; float32 output "
        f"{mem['float32_output_mib']:.0f} MiB)"
    )
    print(
        "\nlattice geometry for blocks of "
        f"{plan['block_shape']} (patch counts exact, seconds estimated from the measured "
        f"{e['backend']} patch time):"
    )
    header = (
        "geometry;patch;margin;stride;patches/block;"
        "model vox/out vox;est. s/block;speedup;520³ needed/computed;engine volume"
    ).split(";")
    lines = [
        [
            a["geometry"],
            "×".join(map(str, a["patch_shape"])),
            "×".join(map(str, a["margin"])),
            "×".join(map(str, a["stride"])),
            a["patches_per_interior_block"],
            f"{a['model_voxels_per_output_voxel_interior']:.2f}",
            f"{a['est_model_s_per_interior_block']:.1f}",
            f"{a['est_speedup_vs_default']:.2f}x",
            f"{a['fib_520']['patches_needed']}/{a['fib_520']['patches_computed']}",
            f"{a['engine_volume']['patches_computed']}",
        ]
        for a in report["lattice_alternatives"]
        if "stride" in a
    ]
    c.print_table(header, lines)
    mem = report["memory"]
    print(
        f"\npeak RSS of the process {mem['max_rss_mib']:.0f} MiB; "
        f"elapsed {report['elapsed_s']:.0f} s"
    )


def main() -> None:
    args = parse_args()
    c.require_device(args.device)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)  # the matmul peak runs with the model's thread count
    machine = c.machine_info(args.threads, args.device)
    with tempfile.TemporaryDirectory(prefix="ssn-bench-") as tmp_name, c.RssSampler() as sampler:
        tmp = Path(tmp_name)
        files = c.prepare_checkpoint(args.checkpoint, tmp, args.seed)
        plan = make_plan(files.checkpoint, args.quick)
        grid = plan.grid()
        flops = c.conv_flops(files.checkpoint, plan.patch_shape)
        peaks = c.matmul_peaks(args.device, args.quick)
        backends = backends_for(args, files, tmp)
        if any(b.name.startswith("onnxruntime") and not b.skip for b in backends):
            c.try_export_onnx(files, tmp)
        patches = c.read_patches(args.data, plan.patch_shape, args.patches, args.seed)
        rows = c.compare_backends(
            backends,
            patches,
            reference="torch fp32",
            repeats=args.repeats,
            margin=plan.margin,
            sampler=sampler,
        )
        c.add_flop_rates(rows, flops["flops_per_patch"], peaks)
        engine = engine_section(args, files, plan, rows, tmp, sampler)
    report = {
        "benchmark": "inference",
        "quick": args.quick,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seed": args.seed,
        "machine": machine,
        "model": {"weights": files.weights, **flops},
        "geometry": asdict(plan) | {"stride": list(grid.stride), "core": list(grid.core_shape)},
        "patches": args.patches,
        "repeats": args.repeats,
        "matmul_peak": peaks,
        "backends": rows,
        "engine": engine,
        "lattice_alternatives": lattice_section(
            plan, engine["s_per_patch"], tuple(engine["volume_shape"])
        ),
        "memory": {"max_rss_mib": c.max_rss_mib()},
        "load_average_1min_end": os.getloadavg()[0],
        "elapsed_s": time.perf_counter() - start,
    }
    print_report(report)
    c.write_json(args.output, report)


if __name__ == "__main__":
    main()
