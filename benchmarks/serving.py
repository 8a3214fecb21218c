"""Serving (issue 12): Triton vs in-process onnxruntime, throughput, latency and a load test.

One run, one machine, everything against a baseline measured in the same run:

1. Throughput. ``k`` clients (1 and 4) each predict real patches (the default patch of
   ``ssn-deploy infer``, from the unlabelled 520³ volume) one request at a time, as the engine's
   worker threads do. Baseline: onnxruntime in this process, one session per client with
   cores / k intra-op threads (``ssn-deploy infer --workers k``). Rows: the same ONNX file behind
   a real ``tritonserver`` (the python-backend model ``affinity_py``, one instance using every
   core, dynamic batching up to 4 patches) over gRPC and HTTP, each with and without system
   shared memory. Reported: patches/s and its ratio to the baseline at the same ``k`` (goal:
   ≥ 0.85 at 4 clients), latency p50/p99, and from the server's own statistics the mean batch
   it ran and the time per request outside the model (queue, copies, transport). Rows run in a
   rotating order, round by round, so load from other processes hits all of them alike; the
   median round is reported.
2. Load test. 4 gRPC clients send patches for 60 s without retries; it ends with the number of
   failed requests (goal: 0) and whether the server still answers.

    python benchmarks/serving.py [--quick] [--patch Z,Y,X] [--requests 2] [--rounds 2]
        [--load-seconds 60] [--threads N] [--instances 1] [--data DIR] [--output PATH]

A full run times 100 patches of 160³ (2 rounds × 5 rows × (1 + 4 clients) × 2 requests) plus
warm-ups and the load test: 15–30 min on 2 cores, where one such patch takes 6–15 s. Writes
benchmarks/results/serving.json (``--quick``: serving_quick.json, 32³ patches, 20 s).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _common as c
import numpy as np

from ssn_deploy.inference.loader import default_model
from ssn_deploy.inference.onnx_backend import OnnxPredictor
from ssn_deploy.inference.predictor import Predictor
from ssn_deploy.inference.triton_backend import TritonPredictor
from ssn_deploy.pipeline import default_geometry
from ssn_deploy.serving.repository import AFFINITY_PY, OnnxModel, build_repository
from ssn_deploy.serving.server import TritonServer

BASELINE = "onnxruntime in-process"
ROWS = ("triton grpc", "triton grpc shm", "triton http", "triton http shm")
QUICK_PATCH = (32, 32, 32)
MAX_BATCH = 4
GOAL_RATIO = 0.85


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=c.DEFAULT_DATA, help="folder of the HDF5 data")
    parser.add_argument("--model", type=Path, help="ONNX model (default: the packaged iso model)")
    parser.add_argument("--patch", help="Z,Y,X (default: ssn-deploy infer's patch for the model)")
    parser.add_argument("--clients", default="1,4", help="concurrent clients to compare")
    parser.add_argument("--requests", type=int, help="timed requests per client, row and round")
    parser.add_argument("--rounds", type=int, help="rounds of all rows, in rotating order")
    parser.add_argument("--load-seconds", type=float, help="length of the load test")
    parser.add_argument("--threads", type=int, default=c.all_cores(), help="cores to use")
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        help="python-backend instances; the cores are split between them",
    )
    parser.add_argument(
        "--max-batch", type=int, default=MAX_BATCH, help="dynamic batching up to this many patches"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny patches, to validate the script")
    parser.add_argument("--output", type=Path, help="results JSON (default: benchmarks/results)")
    args = parser.parse_args()
    args.clients = [int(k) for k in args.clients.split(",")]
    args.requests = args.requests or (1 if args.quick else 2)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.load_seconds = args.load_seconds or (5.0 if args.quick else 60.0)
    name = "serving_quick.json" if args.quick else "serving.json"
    args.output = args.output or c.RESULTS / name
    return args


# --- clients ---------------------------------------------------------------------------------


def run_clients(
    make: Callable[[], Predictor],
    batches: Sequence[np.ndarray],
    clients: int,
    *,
    requests: int | None = None,
    seconds: float | None = None,
) -> dict[str, Any]:
    """``clients`` threads, each with its own predictor (built and warmed before the clock
    starts), sending ``requests`` batches each, or as many as fit in ``seconds``. Failures are
    counted, not raised: a load test must say how many requests failed."""
    ready = threading.Barrier(clients + 1)
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        predictor = None
        try:
            predictor = make()
            predictor.predict(batches[index % len(batches)])
        except Exception as exc:  # a client that cannot start counts as failed
            with lock:
                failures.append(f"start: {type(exc).__name__}: {exc}")
        ready.wait()
        if predictor is None:
            return
        deadline = time.perf_counter() + (seconds or 0)
        done = 0
        while (requests is not None and done < requests) or (
            seconds is not None and time.perf_counter() < deadline
        ):
            batch = batches[(index + done) % len(batches)]
            start = time.perf_counter()
            try:
                predictor.predict(batch)
                with lock:
                    latencies.append(time.perf_counter() - start)
            except Exception as exc:  # counted; the load test goes on
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")
            done += 1
        close = getattr(predictor, "close", None)
        if close:
            close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    patches = len(latencies) * len(batches[0])
    return {
        "clients": clients,
        "wall_s": wall,
        "requests": len(latencies),
        "failed": len(failures),
        "first_failure": failures[0][:500] if failures else None,
        "patches_per_s": patches / wall if wall > 0 else 0.0,
        "latency_p50_s": float(np.percentile(latencies, 50)) if latencies else None,
        "latency_p99_s": float(np.percentile(latencies, 99)) if latencies else None,
    }


def onnxruntime_factory(path: Path, threads: int) -> Callable[[], Predictor]:
    return lambda: OnnxPredictor(path, threads=threads)


def triton_factory(url: str, protocol: str, shared_memory: str, retries: int = 4) -> Any:
    return lambda: TritonPredictor(
        url, protocol=protocol, shared_memory=shared_memory, retries=retries
    )


def server_stats(server: TritonServer) -> dict[str, float]:
    """Cumulative counters of ``affinity_py`` from the server (ns and counts)."""
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http_url)
    stats = client.get_inference_statistics(AFFINITY_PY)["model_stats"][0]
    infer = stats["inference_stats"]
    return {
        "requests": float(infer["success"]["count"]),
        "executions": float(stats.get("execution_count", 0)),
        "inferences": float(stats.get("inference_count", 0)),
        **{f"{k}_ns": float(infer[k]["ns"]) for k in ("queue", "compute_infer", "success")},
    }


def stats_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Mean batch the server ran, and per request: model time and everything else it saw."""
    d = {k: after[k] - before[k] for k in before}
    if not d["requests"] or not d["executions"]:
        return {"mean_batch": None, "server_model_s": None, "server_other_s": None}
    return {
        "mean_batch": d["inferences"] / d["executions"],
        "server_model_s": d["compute_infer_ns"] / d["executions"] / 1e9,
        "server_other_s": (d["success_ns"] - d["compute_infer_ns"]) / d["requests"] / 1e9,
        "server_queue_s": d["queue_ns"] / d["requests"] / 1e9,
    }


def max_abs_diffs(
    makers: dict[str, Callable[[], Predictor]], batch: np.ndarray
) -> dict[str, float | str]:
    """Every row's answer on one patch against the baseline's (a sanity check of the setup)."""
    reference = makers[BASELINE]().predict(batch)
    diffs: dict[str, float | str] = {}
    for name, make in makers.items():
        try:
            predictor = make()
            diffs[name] = float(np.abs(predictor.predict(batch) - reference).max())
            getattr(predictor, "close", lambda: None)()
        except Exception as exc:
            diffs[name] = f"failed: {type(exc).__name__}: {exc}"[:500]
    return diffs


# --- report ----------------------------------------------------------------------------------


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median round by throughput, with every round's figure kept."""
    ordered = sorted(rounds, key=lambda r: r["patches_per_s"])
    median = dict(ordered[len(ordered) // 2])
    median["rounds_patches_per_s"] = [r["patches_per_s"] for r in rounds]
    median["failed"] = sum(r["failed"] for r in rounds)
    return median


def add_ratios(rows: dict[str, dict[str, Any]]) -> None:
    for by_clients in rows.values():
        for k, row in by_clients.items():
            base = rows[BASELINE][k]["patches_per_s"]
            row["ratio_to_onnxruntime"] = row["patches_per_s"] / base if base else None


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(
        f"\nmachine: {m['cores_usable']} cores ({m['cpu']['model']}), load "
        f"{m['load_average_1min_start']:.2f} → {report['load_average_1min_end']:.2f}; "
        f"patch {report['patch_shape']}, server: {report['server']['instances']} instance(s) × "
        f"{report['server']['threads_per_instance']} threads, dynamic batching up to "
        f"{report['server']['max_batch']}"
    )
    header = "row;clients;patches/s;vs onnxruntime;p50 s;p99 s;batch;other s;failed".split(";")
    lines = []
    for name, by_clients in report["rows"].items():
        for k, r in by_clients.items():
            lines.append(
                [
                    name,
                    str(k),
                    c.fmt(r["patches_per_s"]),
                    c.fmt(r.get("ratio_to_onnxruntime"), ".2f"),
                    c.fmt(r["latency_p50_s"]),
                    c.fmt(r["latency_p99_s"]),
                    c.fmt(r.get("mean_batch"), ".2f"),
                    c.fmt(r.get("server_other_s"), ".3f"),
                    str(r["failed"]),
                ]
            )
    c.print_table(header, lines)
    load = report["load_test"]
    print(
        f"load test: {load['clients']} gRPC clients for {load['seconds']:.0f} s: "
        f"{load['requests']} requests, {load['failed']} failed, p50 {c.fmt(load['latency_p50_s'])} "
        f"s, p99 {c.fmt(load['latency_p99_s'])} s; server ready after: {load['server_ready']}"
    )
    print(f"elapsed {report['elapsed_s']:.0f} s")


def parse_patch(text: str | None, model: OnnxModel) -> tuple[int, int, int]:
    if text:
        return tuple(int(v) for v in text.split(","))  # type: ignore[return-value]
    return default_geometry(model.spec, model.spec.voxel_size).patch_shape  # type: ignore[arg-type]


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    machine = c.machine_info(args.threads, "cpu")
    onnx = args.model or default_model("onnxruntime")
    model = OnnxModel.read(onnx)
    patch = QUICK_PATCH if args.quick else parse_patch(args.patch, model)
    raw = c.read_patches(args.data, patch, 4, args.seed)
    batches = [c.engine_batch(p, model.spec.normalization) for p in raw]
    with tempfile.TemporaryDirectory(prefix="ssn-bench-serving-") as tmp:
        repo = Path(tmp) / "repo"
        build_repository(
            onnx,
            repo,
            max_patch=patch,
            max_batch=args.max_batch,
            instances=args.instances,
            threads=max(1, args.threads // args.instances),
        )
        with TritonServer(
            repo, models=[AFFINITY_PY], log=Path(tmp) / "tritonserver.log", ready_timeout=300
        ) as server:
            urls = {"grpc": server.grpc_url, "http": server.http_url}

            def makers(k: int) -> dict[str, Callable[[], Predictor]]:
                local = onnxruntime_factory(
                    repo / AFFINITY_PY / "1" / "model.onnx", max(1, args.threads // k)
                )
                rows = {BASELINE: local}
                for name in ROWS:
                    protocol = name.split()[1]
                    shm = "on" if name.endswith("shm") else "off"
                    rows[name] = triton_factory(urls[protocol], protocol, shm)
                return rows

            diffs = max_abs_diffs(makers(1), batches[0])
            measured: dict[str, dict[int, list[dict[str, Any]]]] = {}
            for r in range(args.rounds):
                for k in args.clients:
                    names = list(makers(k))
                    order = names[r % len(names) :] + names[: r % len(names)]
                    for name in order:
                        before = server_stats(server)
                        row = run_clients(makers(k)[name], batches, k, requests=args.requests)
                        if name != BASELINE:
                            row.update(stats_delta(before, server_stats(server)))
                        measured.setdefault(name, {}).setdefault(k, []).append(row)
                        print(f"round {r + 1}, {k} client(s), {name}: {row['patches_per_s']:.3g}/s")
            rows = {
                name: {k: summarise(rounds) for k, rounds in by_k.items()}
                for name, by_k in measured.items()
            }
            add_ratios(rows)
            load = run_clients(
                triton_factory(urls["grpc"], "grpc", "off", retries=0),
                batches,
                4,
                seconds=args.load_seconds,
            )
            load["seconds"] = args.load_seconds
            load["server_ready"] = server.is_ready()
    report = {
        "benchmark": "serving",
        "quick": args.quick,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seed": args.seed,
        "machine": machine,
        "model": str(onnx),
        "patch_shape": list(patch),
        "server": {
            "model": AFFINITY_PY,
            "instances": args.instances,
            "threads_per_instance": max(1, args.threads // args.instances),
            "max_batch": args.max_batch,
        },
        "requests_per_client": args.requests,
        "rounds": args.rounds,
        "max_abs_diff_to_onnxruntime": diffs,
        "rows": rows,
        "goal_ratio_at_4_clients": GOAL_RATIO,
        "load_test": load,
        "load_average_1min_end": os.getloadavg()[0],
        "elapsed_s": time.perf_counter() - start,
        "notes": "patches_per_s: the median round; ratio_to_onnxruntime: against in-process "
        "onnxruntime with the same number of clients (one session each, cores / clients "
        "threads); mean_batch, server_model_s (per execution), server_other_s (per request: "
        "the server's request time outside the model) from the server's statistics; the load "
        "test's clients do not retry",
    }
    print_report(report)
    c.write_json(args.output, report)


if __name__ == "__main__":
    main()
