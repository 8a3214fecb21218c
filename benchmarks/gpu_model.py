"""GPU model throughput (issue 13's petascale plan): output voxels/s of the affinity network alone.

The engine's CPU work (reading, blending, writing, fragments) is measured elsewhere; this is
the number that sizes the GPU side of a large run. Each model runs torch eager on real
patches of ``fib_medulla_250`` at the engine's default patch shape, in fp32 and under bf16 and
fp16 autocast, at batch sizes 1, 4 and 8, in one process; speed is given in *core* voxels/s
(the voxels a patch contributes after its margin is dropped) and as a ratio to fp32 at batch 1
of the same model. Peak GPU memory is ``torch.cuda.max_memory_allocated`` per setting.
Variants: ``eager`` (as the engine runs it), ``channels_last`` (NDHWC memory layout) and
``compile`` (``torch.compile``, its compile time recorded). The JSON is rewritten after every
row, so a run stopped by a time limit keeps what it measured.

    python benchmarks/gpu_model.py [--data DIR] [--repeats 10] [--output PATH]
        [--cases 0 1 2] [--precisions fp32 bf16 fp16] [--batches 1 4 8]
        [--variants eager channels_last compile]

Models: the packaged isotropic and anisotropic defaults, and the paper-sized isotropic network
[28,36,48,64,80] (random weights: speed does not depend on them). Writes
benchmarks/results/gpu_model.json. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from ssn_deploy.models.checkpoint import load_checkpoint
from ssn_deploy.models.registry import build_model
from ssn_deploy.models.unet import ModelConfig

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "ssn_deploy" / "assets" / "models"
OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
PAPER_ISO = ModelConfig(
    name="unet3d",
    filters=[28, 36, 48, 64, 80],
    poolings=[[2, 2, 2]] * 4,
    offsets=OFFSETS,
    embed_kernel=[5, 5, 5],
    skip="concat",
    norm="batch",
)
# (name, model, input file, patch, margin): patch and margin are pipeline.default_geometry's
CASES = (
    ("default (packaged, iso)", "default.ckpt", "fib_medulla_250.hdf", (160, 160, 160), (16,) * 3),
    (
        "default_aniso (packaged)",
        "default_aniso.ckpt",
        "fib_medulla_250_aniso5.hdf",
        (32, 160, 160),
        (4, 16, 16),
    ),
    ("paper-sized iso [28..80]", None, "fib_medulla_250.hdf", (160, 160, 160), (16,) * 3),
)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def patches(path: Path, shape: tuple[int, ...], count: int) -> torch.Tensor:
    """``count`` real raw patches scaled to [0, 1] (the packaged models' normalisation)."""
    with h5py.File(path, "r") as f:
        raw = f["volumes/raw"]
        rng = np.random.default_rng(0)
        out = []
        for _ in range(count):
            lo = [int(rng.integers(0, n - s + 1)) for n, s in zip(raw.shape, shape, strict=True)]
            box = tuple(slice(a, a + s) for a, s in zip(lo, shape, strict=True))
            out.append(raw[box].astype(np.float32) / 255.0)
    return torch.from_numpy(np.stack(out)[:, None])


@torch.no_grad()
def time_model(model, x: torch.Tensor, dtype, repeats: int) -> tuple[float, float]:
    """Median seconds per call (CUDA events around each call after 3 warm-ups), and the
    seconds of the first call (which includes any compilation)."""
    times = []
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        model(x)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for i in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            model(x)
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1000)
    return float(np.median(times)), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--cases", type=int, nargs="+", default=list(range(len(CASES))))
    parser.add_argument(
        "--precisions", nargs="+", choices=list(PRECISIONS), default=["fp32", "bf16", "fp16"]
    )
    parser.add_argument(
        "--variants", nargs="+", choices=["eager", "channels_last", "compile"], default=["eager"]
    )
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks/results/gpu_model.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_model.py needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    rows: list[dict] = []
    for case in args.cases:
        name, ckpt, data, patch, margin = CASES[case]
        model = load_checkpoint(MODELS / ckpt).model if ckpt else build_model(PAPER_ISO)
        model = model.to(device).eval()
        params = sum(p.numel() for p in model.parameters())
        core = int(np.prod([p - 2 * m for p, m in zip(patch, margin, strict=True)]))
        x_all = patches(args.data / data, patch, max(args.batches)).to(device)
        base = None  # the first setting measured for this model
        for variant in args.variants:
            runner, x_v = model, x_all
            if variant == "channels_last":
                runner = model.to(memory_format=torch.channels_last_3d)
                x_v = x_all.contiguous(memory_format=torch.channels_last_3d)
            elif variant == "compile":
                runner = torch.compile(model.to(memory_format=torch.contiguous_format))
            for precision in args.precisions:
                for batch in args.batches:
                    torch.cuda.reset_peak_memory_stats()
                    s, first = time_model(runner, x_v[:batch], PRECISIONS[precision], args.repeats)
                    vox_s = batch * core / s
                    base = base or vox_s
                    row = {
                        "model": name,
                        "parameters": params,
                        "patch": list(patch),
                        "core_voxels": core,
                        "variant": variant,
                        "precision": precision,
                        "batch": batch,
                        "s_per_call": round(s, 5),
                        "first_call_s": round(first, 2),
                        "core_mvox_per_s": round(vox_s / 1e6, 2),
                        "ratio_to_first_setting": round(vox_s / base, 3),
                        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20),
                    }
                    rows.append(row)
                    print(
                        f"{name:26s} {variant:13s} {precision} batch {batch}: "
                        f"{row['core_mvox_per_s']:8.1f} MVox/s "
                        f"({row['ratio_to_first_setting']:.2f}x), {row['peak_gpu_mib']} MiB, "
                        f"first call {first:.1f} s",
                        flush=True,
                    )
                    write(args, rows)
        model.to(memory_format=torch.contiguous_format)
    print(f"wrote {args.output}")


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    result = {
        "benchmark": "gpu_model",
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "note": "model alone, real patches, median of "
        f"{args.repeats} calls after 3 warm-ups; core voxels exclude the patch margin; "
        "ratio_to_first_setting: against the first row of the same model in this run",
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
