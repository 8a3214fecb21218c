"""Training throughput (iterations/s) and peak memory, fp32 vs bf16 autocast, in one run.

Speed: one fp32 and one bf16 trainer in the same process take alternating steps, so load from
other jobs on a shared machine hits both alike and the ratio stays meaningful. Memory: each
precision also runs a few steps in its own subprocess, so that peak RSS (``ru_maxrss``) and
``torch.cuda.max_memory_allocated`` belong to it alone. A step is a full trainer iteration
(crop, augment, targets, forward, backward, Adam) on the config's real data.

    python benchmarks/train_throughput.py [--config configs/fib_medulla_250.yaml]
        [--device cpu|cuda] [--iterations 8] [--warmup 2] [--threads N]

Prints both speeds and the bf16/fp32 ratio; writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from ssn_deploy.training import Trainer, load_config

ROOT = Path(__file__).resolve().parents[1]
MODES = {"fp32": "none", "bf16": "bf16"}


def make_trainer(config_path: str, amp: str, device: str, threads: int | None, tmp: str):
    cfg = load_config(config_path)
    training = replace(
        cfg.training, amp=amp, device=device, threads=threads or cfg.training.threads
    )
    return Trainer(replace(cfg, training=training), tmp)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(config_path: str, amp: str, device: str, threads: int | None) -> dict:
    """Child process: a few steps of one precision, then its peak memory."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(config_path, amp, device, threads, tmp)
        for _ in range(3):
            trainer.step(trainer.next_batch())
        sync(device)
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_max_allocated_mib": (
            torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
        ),
    }


def interleaved_speed(args: argparse.Namespace) -> dict:
    seconds = {name: 0.0 for name in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            name: make_trainer(args.config, amp, args.device, args.threads, f"{tmp}/{name}")
            for name, amp in MODES.items()
        }
        for step in range(args.warmup + args.iterations):
            for name, trainer in trainers.items():
                batch = trainer.next_batch()
                sync(args.device)
                start = time.perf_counter()
                trainer.step(batch)
                sync(args.device)
                if step >= args.warmup:
                    seconds[name] += time.perf_counter() - start
    some = trainers["fp32"]
    return {
        name: {
            "it_per_s": args.iterations / seconds[name],
            "s_per_it": seconds[name] / args.iterations,
            "skipped_updates": trainers[name].skipped,
        }
        for name in MODES
    } | {
        "crop": list(some.config.training.crop),
        "filters": list(some.config.model.filters),
        "parameters": sum(p.numel() for p in some.model.parameters()),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "fib_medulla_250.yaml"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: the config's)")
    parser.add_argument("--memory-of", choices=list(MODES.values()), help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/train_throughput.json"))
    args = parser.parse_args()

    if args.memory_of:  # child process
        print(json.dumps(peak_memory(args.config, args.memory_of, args.device, args.threads)))
        return

    speed = interleaved_speed(args)
    memory = {}
    for name, amp in MODES.items():
        cmd = [sys.executable, __file__, "--memory-of", amp, "--config", args.config,
               "--device", args.device]  # fmt: skip
        cmd += ["--threads", str(args.threads)] if args.threads else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        memory[name] = json.loads(out.strip().splitlines()[-1])
    report = {
        "benchmark": "train_throughput",
        "device": args.device,
        "config": os.path.relpath(Path(args.config).resolve(), ROOT),
        "iterations": args.iterations,
        "warmup": args.warmup,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "torch": torch.__version__,
        **{k: speed[k] for k in ("crop", "filters", "parameters", "threads")},
        "fp32": speed["fp32"] | memory["fp32"],
        "bf16": speed["bf16"] | memory["bf16"],
        "speedup_bf16_over_fp32": speed["bf16"]["it_per_s"] / speed["fp32"]["it_per_s"],
    }
    for name in MODES:
        r = report[name]
        cuda = r["cuda_max_allocated_mib"]
        print(f"{name}: {r['it_per_s']:.3f} it/s ({r['s_per_it']:.2f} s/it), "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB"
              + (f", CUDA peak {cuda:.0f} MiB" if cuda is not None else ""))  # fmt: skip
    print(f"bf16 / fp32 speed ratio: {report['speedup_bf16_over_fp32']:.2f}x "
          f"(crop {report['crop']}, {report['threads']} thread(s), alternating steps)")  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
