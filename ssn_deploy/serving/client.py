"""Send a float32 batch to a Triton server over HTTP or gRPC and get the affinities back.

A thin layer over ``tritonclient`` (the ``serve`` extra) that turns its many exception types
into one-line :class:`ServingError` messages: an unreachable server, a timeout, or the
server's own reason for refusing a request. Arrays are sent with their own dtype, unconverted,
so the server (not the client) decides what it accepts.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

import numpy as np

from ssn_deploy.errors import ConfigError, ServingError
from ssn_deploy.serving.repository import AFFINITY_PY

PROTOCOLS = ("grpc", "http")
UNREACHABLE = ("UNAVAILABLE", "Connection refused", "failed to connect", "Errno")


def _tritonclient(protocol: str) -> Any:
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError:
        raise ConfigError(
            "talking to a Triton server needs tritonclient: pip install 'ssn-deploy[serve]'"
        ) from None
    return module


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:400]


class TritonClient:
    """Requests to ``model`` on the server at ``url`` (``HOST:PORT``).

    ``timeout`` (s) bounds connecting and each request. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        *,
        protocol: str = "grpc",
        model: str = AFFINITY_PY,
        timeout: float = 60.0,
        input_name: str = "raw",
        output_name: str = "affinities",
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        url = url.removeprefix("http://").removeprefix("grpc://")
        self.url, self.protocol, self.model, self.timeout = url, protocol, model, timeout
        self.input_name, self.output_name = input_name, output_name
        self._module = _tritonclient(protocol)
        try:
            if protocol == "grpc":
                self._client = self._module.InferenceServerClient(url)
            else:
                self._client = self._module.InferenceServerClient(
                    url, connection_timeout=timeout, network_timeout=timeout
                )
        except Exception as exc:  # tritonclient validates the URL eagerly
            raise ConfigError(f"Triton URL {url!r}: {_one_line(exc)}") from None

    def _error(self, exc: BaseException) -> ServingError:
        """A one-line error saying whether the server is unreachable, slow, or said no."""
        text = _one_line(exc)
        where = f"Triton server at {self.url} ({self.protocol})"
        if (
            "DEADLINE_EXCEEDED" in text
            or "timed out" in text.lower()
            or isinstance(exc, TimeoutError)
        ):
            return ServingError(f"{where}: no answer within {self.timeout:g} s")
        if isinstance(exc, OSError) or any(marker in text for marker in UNREACHABLE):
            return ServingError(
                f"cannot reach the {where}: {text}; start one with ssn-deploy serve start REPO"
            )
        return ServingError(f"{where} refused the request to {self.model}: {text}")

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout
        try:
            return getattr(self._client, method)(*args, **kwargs)
        except Exception as exc:  # tritonclient, gevent and socket errors alike
            raise self._error(exc) from None

    def is_ready(self) -> bool:
        """Whether the server and the model are ready (False if unreachable)."""
        try:
            return bool(self._call("is_server_ready") and self._call("is_model_ready", self.model))
        except ServingError:
            return False

    def parameters(self) -> dict[str, Any]:
        """The model's ``config.pbtxt`` parameters, JSON-decoded (its metadata and limits)."""
        if self.protocol == "grpc":
            config = self._call("get_model_config", self.model, as_json=True)["config"]
        else:
            config = self._call("get_model_config", self.model)
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        return {k: _maybe_json(v) for k, v in params.items()}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """``batch`` (float32 N×1×Z×Y×X for the affinity models) → the model's output."""
        from tritonclient.utils import np_to_triton_dtype

        batch = np.ascontiguousarray(batch)
        inp = self._module.InferInput(
            self.input_name, list(batch.shape), np_to_triton_dtype(batch.dtype)
        )
        if self.protocol == "http":
            inp.set_data_from_numpy(batch, binary_data=True)
            out = self._module.InferRequestedOutput(self.output_name, binary_data=True)
        else:
            inp.set_data_from_numpy(batch)
            out = self._module.InferRequestedOutput(self.output_name)
        result = self._call("infer", self.model, [inp], outputs=[out])
        array = result.as_numpy(self.output_name)
        if array is None:
            raise ServingError(f"{self.model} at {self.url} returned no {self.output_name!r}")
        return array

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # closing a client whose server is gone must not mask the real error
            pass

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def infer(
    url: str,
    batch: np.ndarray,
    *,
    protocol: str = "grpc",
    model: str = AFFINITY_PY,
    timeout: float = 60.0,
) -> np.ndarray:
    """One request on a fresh connection (see :class:`TritonClient` to reuse one)."""
    with TritonClient(url, protocol=protocol, model=model, timeout=timeout) as client:
        return client.infer(batch)
