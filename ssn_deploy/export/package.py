"""A model directory for deployment: weights-only checkpoint, ONNX graph and a parity report.

The parity report compares onnxruntime with torch (fp32) on a real EM block (the bundled
sample), so every exported graph ships with the evidence that it computes the same thing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssn_deploy import __version__
from ssn_deploy.errors import OutputExistsError
from ssn_deploy.export.onnx_export import DEFAULT_OPSET, INPUT_NAME, export_onnx
from ssn_deploy.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

PARITY_BLOCK = (64, 128, 128)


def _parity_input(ckpt: Checkpoint) -> np.ndarray:
    """A normalised block of the bundled sample, cropped to a multiple of the granularity."""
    from ssn_deploy.sample import load_sample

    raw = load_sample()["raw"]
    shape = [
        max(g, min(n, b) // g * g)
        for n, b, g in zip(raw.shape, PARITY_BLOCK, ckpt.config.granularity, strict=True)
    ]
    block = raw[: shape[0], : shape[1], : shape[2]]
    return ckpt.normalization(block)[None, None]


def parity_report(ckpt: Checkpoint, onnx_path: Path) -> dict[str, Any]:
    """Max/mean |onnxruntime − torch| on a real block, and each one's time."""
    import onnxruntime as ort

    x = _parity_input(ckpt)
    start = time.perf_counter()
    with torch.inference_mode():
        reference = ckpt.model.eval()(torch.from_numpy(x)).numpy()
    torch_s = time.perf_counter() - start
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    start = time.perf_counter()
    (onnx_out,) = session.run(None, {INPUT_NAME: x})
    onnx_s = time.perf_counter() - start
    diff = np.abs(onnx_out - reference)
    return {
        "input": "bundled sample (fib_medulla_250 test region crop)",
        "shape": list(x.shape),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "torch_fp32_seconds": torch_s,
        "onnxruntime_cpu_seconds": onnx_s,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
    }


def export_model(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``model.ckpt`` (weights only), ``model.onnx`` and ``parity.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    files = {name: out_dir / name for name in ("model.ckpt", "model.onnx", "parity.json")}
    existing = [str(p) for p in files.values() if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{', '.join(existing)} already exist(s); pass --overwrite")
    ckpt = load_checkpoint(checkpoint)
    extra = {k: v for k, v in ckpt.extra.items() if k in ("best", "config", "versions")}
    save_checkpoint(
        files["model.ckpt"],
        ckpt.model,
        normalization=ckpt.normalization,
        voxel_size=ckpt.voxel_size,
        iteration=ckpt.iteration,
        extra=extra | {"exported_by": f"ssn-deploy {__version__}", "source": str(checkpoint)},
    )
    export_onnx(ckpt, files["model.onnx"], opset=opset, overwrite=True)
    report = parity_report(ckpt, files["model.onnx"])
    files["parity.json"].write_text(json.dumps(report, indent=2) + "\n")
    return {name: str(path) for name, path in files.items()} | {"parity": report}
