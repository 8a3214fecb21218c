"""A :class:`~ssn_deploy.inference.predictor.Predictor` running a TensorRT engine on a GPU.

Engines come from :mod:`ssn_deploy.export.tensorrt`; the model spec and the optimisation
profile come from the engine's JSON sidecar, since a serialized engine cannot carry them. An
engine only runs on the GPU architecture and TensorRT version it was built with, and only for
input shapes inside its profile, so all three are checked up front with a one-line error
instead of TensorRT's log output. Buffers are torch CUDA tensors (torch is a core dependency),
so no pycuda or cuda-python is needed.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from ssn_deploy.errors import ConfigError, InvalidInputError
from ssn_deploy.export.graph_passes import graph_precision
from ssn_deploy.export.tensorrt import (
    Profile,
    compute_capability,
    read_sidecar,
    require_tensorrt,
)
from ssn_deploy.inference.predictor import ModelSpec, SpecGeometry


class TensorRTPredictor(SpecGeometry):
    """A deserialized engine on CUDA ``device`` with one execution context.

    An execution context holds the current input shape and buffer addresses, so ``predict`` is
    serialised by a lock (dask may call it from several threads).
    """

    def __init__(self, engine_path: str | Path, *, device: int = 0) -> None:
        path = Path(engine_path)
        sidecar = read_sidecar(path)
        self.spec = ModelSpec.from_metadata(sidecar["metadata"], str(path))
        self.profile = Profile.from_dict(sidecar["profile"]).validate(self.spec)
        trt = require_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"{path} is a TensorRT engine, which needs an NVIDIA GPU, but torch sees no CUDA "
                "device; use the onnxruntime or torch backend"
            )
        capability = compute_capability(device)
        if sidecar["capability"] != capability:
            raise ConfigError(
                f"{path} was built for {sidecar['capability']}, this GPU is {capability}; "
                "rebuild it with ssn-deploy export --format tensorrt"
            )
        if sidecar["tensorrt_version"] != trt.__version__:
            raise ConfigError(
                f"{path} was built with TensorRT {sidecar['tensorrt_version']}, this is "
                f"TensorRT {trt.__version__}; rebuild it with ssn-deploy export --format tensorrt"
            )
        self._torch = torch
        self._device = torch.device("cuda", device)
        self._lock = threading.Lock()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)  # must outlive the engine
        with torch.cuda.device(self._device):
            self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self._engine is None:
                raise InvalidInputError(
                    f"TensorRT {trt.__version__} cannot deserialize {path} (damaged file?); "
                    "rebuild it with ssn-deploy export --format tensorrt"
                )
            self._context = self._engine.create_execution_context()
        if self._context is None:
            raise ConfigError(f"TensorRT could not create an execution context for {path}")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise InvalidInputError(
                f"{path}: expected one input and one output tensor, got inputs {inputs} and "
                f"outputs {outputs}"
            )
        self._input, self._output = inputs[0], outputs[0]
        for name in names:
            if self._engine.get_tensor_dtype(name) != trt.float32:
                raise InvalidInputError(
                    f"{path}: tensor {name!r} is {self._engine.get_tensor_dtype(name)}, "
                    "expected float32 input and output"
                )
        # an fp16 ONNX graph stays fp16 in an engine built without the FP16 flag
        fp16_graph = graph_precision(sidecar["metadata"]) == "fp16"
        precision = "fp16" if sidecar["fp16"] or fp16_graph else "fp32"
        self._provenance = {
            "model": str(path),
            "backend": "tensorrt",
            "device": str(self._device),
            "precision": precision,
            "tensorrt": trt.__version__,
            "capability": capability,
            "profile": self.profile.to_dict(),
        }

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self._provenance)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.check_batch(batch)
        if not self.profile.contains(batch.shape):
            raise InvalidInputError(
                f"{self._provenance['model']} accepts inputs from {self.profile.min} to "
                f"{self.profile.max}, got {batch.shape}; lower --patch-shape/--batch-size or "
                "re-export the engine with a larger profile"
            )
        torch = self._torch
        with self._lock, torch.cuda.device(self._device), torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self._device)
            if not self._context.set_input_shape(self._input, tuple(x.shape)):
                raise InvalidInputError(
                    f"TensorRT rejected input shape {tuple(x.shape)} for "
                    f"{self._provenance['model']} (profile {self.profile})"
                )
            shape = tuple(self._context.get_tensor_shape(self._output))
            y = torch.empty(shape, dtype=torch.float32, device=self._device)
            self._context.set_tensor_address(self._input, x.data_ptr())
            self._context.set_tensor_address(self._output, y.data_ptr())
            stream = torch.cuda.current_stream(self._device)
            if not self._context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(
                    f"TensorRT failed to run {self._provenance['model']} on {batch.shape}"
                )
            stream.synchronize()
            out = y.cpu().numpy()
        if out.shape[1] != self.num_channels or out.shape[2:] != batch.shape[2:]:
            raise InvalidInputError(
                f"engine {self._provenance['model']} returned {out.shape} for input "
                f"{batch.shape}; expected {self.num_channels} channels, same Z,Y,X"
            )
        return out
