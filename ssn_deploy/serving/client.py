"""Send a float32 batch to a Triton server over HTTP or gRPC and get the affinities back.

A thin layer over ``tritonclient`` (the ``serve`` extra) that turns its many exception types
into one-line :class:`ServingError` messages: an unreachable server (a
:class:`TransientServingError`, worth retrying), a timeout, or the server's own reason for
refusing a request. Arrays are sent with their own dtype, unconverted, so the server (not the
client) decides what it accepts. A server on this host can take tensors through system shared
memory (:class:`SharedMemory`) instead of the socket.
"""

from __future__ import annotations

import json
import os
import uuid
from types import TracebackType
from typing import Any

import numpy as np

from ssn_deploy.errors import ConfigError, ServingError
from ssn_deploy.serving.repository import AFFINITY_PY

PROTOCOLS = ("grpc", "http")
UNREACHABLE = (
    "UNAVAILABLE",
    "Connection refused",
    "Connection reset",
    "failed to connect",
    "Socket closed",
    "Broken pipe",
    "Errno",
)
"""Markers of a server that is not (or no longer) listening: worth a retry, unlike a refusal."""
RESTARTING = ("is not healthy", "will be restarted")
"""Markers of a python-backend stub that died under the server (Triton restarts it)."""
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class TransientServingError(ServingError):
    """The server could not be reached or dropped the connection (it may come back)."""


def split_url(url: str) -> tuple[str, int | None]:
    """``HOST:PORT`` (with an optional scheme) → host and port (None if absent)."""
    url = url.split("://", 1)[-1].rstrip("/")
    host, sep, port = url.rpartition(":")
    if not sep or not port.isdigit() or host.endswith(":"):  # no port, or a bare IPv6 address
        return url, None
    return host, int(port)


def is_local(url: str) -> bool:
    """Whether ``url`` names this host (where system shared memory can reach the server)."""
    return split_url(url)[0].lower() in LOCAL_HOSTS


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
            return TransientServingError(
                f"cannot reach the {where}: {text}; start one with ssn-deploy serve start REPO"
            )
        if any(marker in text for marker in RESTARTING):
            return TransientServingError(f"{where} lost the process of {self.model}: {text}")
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

    def config(self) -> dict[str, Any]:
        """The served model's configuration as JSON (the same keys over HTTP and gRPC)."""
        if self.protocol == "grpc":
            return dict(self._call("get_model_config", self.model, as_json=True)["config"])
        return dict(self._call("get_model_config", self.model))

    def raw_parameters(self) -> dict[str, str]:
        """The model's ``config.pbtxt`` parameters as stored (strings)."""
        return config_parameters(self.config())

    def parameters(self) -> dict[str, Any]:
        """The model's ``config.pbtxt`` parameters, JSON-decoded (its metadata and limits)."""
        return {k: _maybe_json(v) for k, v in self.raw_parameters().items()}

    def infer(
        self,
        batch: np.ndarray,
        *,
        shared_memory: SharedMemory | None = None,
        output_shape: tuple[int, ...] | None = None,
    ) -> np.ndarray:
        """``batch`` (float32 N×1×Z×Y×X for the affinity models) → the model's output.

        With ``shared_memory`` (a server on this host) the tensors travel through its regions;
        the float32 ``output_shape`` must then be given, to size the output region.
        """
        from tritonclient.utils import np_to_triton_dtype

        batch = np.ascontiguousarray(batch)
        inp = self._module.InferInput(
            self.input_name, list(batch.shape), np_to_triton_dtype(batch.dtype)
        )
        http = {"binary_data": True} if self.protocol == "http" else {}
        out = self._module.InferRequestedOutput(self.output_name, **http)
        if shared_memory is not None:
            if output_shape is None:
                raise ValueError("shared memory needs the output shape")
            out_bytes = 4 * int(np.prod(output_shape))
            shared_memory.reserve(batch.nbytes, out_bytes)
            shared_memory.write(batch)
            inp.set_shared_memory(shared_memory.input_name, batch.nbytes)
            out.set_shared_memory(shared_memory.output_name, out_bytes)
        else:
            inp.set_data_from_numpy(batch, **http)
        result = self._call("infer", self.model, [inp], outputs=[out])
        if shared_memory is not None:
            return shared_memory.read(np.float32, _output_shape(result, self.output_name))
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


def config_parameters(config: dict[str, Any]) -> dict[str, str]:
    """The ``parameters`` of a model config (JSON, as the server reports it) as strings."""
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def _output_shape(result: Any, name: str) -> list[int]:
    """The shape the server reports for output ``name`` (protobuf over gRPC, JSON over HTTP)."""
    output = result.get_output(name)
    if output is None:
        raise ServingError(f"the server returned no {name!r}")
    shape = output["shape"] if isinstance(output, dict) else output.shape
    return [int(s) for s in shape]


class SharedMemory:
    """An input and an output region in ``/dev/shm`` registered with one server.

    Regions grow on demand (the engine's patches have one shape, so this happens once) and are
    unregistered and unlinked by :meth:`close`. Registration fails when the server cannot open
    this host's ``/dev/shm`` (e.g. it runs in a container with its own IPC namespace), which
    :meth:`reserve` reports as a :class:`ServingError`.
    """

    def __init__(self, client: TritonClient) -> None:
        from tritonclient.utils import shared_memory

        self._client, self._shm = client, shared_memory
        tag = f"ssn_deploy_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        self.input_name, self.output_name = f"{tag}_in", f"{tag}_out"
        self._handles: dict[str, Any] = {}
        self._sizes: dict[str, int] = {}

    def _region(self, name: str, nbytes: int) -> None:
        if self._sizes.get(name, -1) >= nbytes:
            return
        self._release(name)
        try:
            handle = self._shm.create_shared_memory_region(name, f"/{name}", nbytes)
        except Exception as exc:  # SharedMemoryException, OSError: /dev/shm full or absent
            raise ServingError(f"cannot create shared memory {name}: {_one_line(exc)}") from None
        self._handles[name], self._sizes[name] = handle, nbytes
        self._client._call("register_system_shared_memory", name, f"/{name}", nbytes)

    def reserve(self, input_bytes: int, output_bytes: int) -> None:
        """Regions at least this large, registered with the server."""
        self._region(self.input_name, input_bytes)
        self._region(self.output_name, output_bytes)

    def write(self, array: np.ndarray) -> None:
        self._shm.set_shared_memory_region(self._handles[self.input_name], [array])

    def read(self, dtype: Any, shape: list[int]) -> np.ndarray:
        """A copy of the output region's first ``shape`` elements (the region is reused)."""
        view = self._shm.get_contents_as_numpy(self._handles[self.output_name], dtype, shape)
        out = np.array(view, copy=True)
        del view  # a live view would keep the region from closing
        return out

    def _release(self, name: str) -> None:
        handle = self._handles.pop(name, None)
        self._sizes.pop(name, None)
        if handle is None:
            return
        try:
            self._client._call("unregister_system_shared_memory", name)
        except ServingError:
            pass  # the server is gone, and with it its registration
        try:
            self._shm.destroy_shared_memory_region(handle)
        except Exception:  # a region that cannot be unlinked must not mask the real error
            pass

    def close(self) -> None:
        for name in list(self._handles):
            self._release(name)


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
