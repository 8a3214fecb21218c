"""A :class:`~ssn_deploy.inference.predictor.Predictor` that sends patches to a Triton server.

Everything the engine needs (offsets, context, granularity, normalisation, voxel size, the
largest patch and batch) is read from the served model's ``config.pbtxt`` parameters, which
``ssn-deploy serve build-repo`` fills from the model's own metadata: the client needs no local
model file, and a server that serves something else is refused before any work. Requests are
split to the served maximum batch; a server that is down or drops the connection is retried
with exponential backoff, then reported in one line (the engine's finished blocks are kept, so
``--resume`` continues once the server is back). On the same host the tensors travel through
system shared memory when the server can open it
(:class:`~ssn_deploy.serving.client.SharedMemory`), else through the socket.

Predictors are cheap and hold one connection each: the engine builds one per worker thread
from a picklable ``functools.partial`` of :func:`~ssn_deploy.inference.loader.load_predictor`,
so many dask workers share one server.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ssn_deploy.errors import ConfigError, InvalidInputError, ServingError
from ssn_deploy.inference.predictor import METADATA_PREFIX, ModelSpec, SpecGeometry, Triple
from ssn_deploy.serving.repository import AFFINITY_PY

log = logging.getLogger(__name__)

DEFAULT_MODEL = AFFINITY_PY
DEFAULT_TIMEOUT = 120.0
"""Seconds one request may take (a 160³ patch on a busy CPU server takes several)."""
RETRIES = 4
BACKOFF = 0.5
"""Seconds before the first retry; doubled for each next one (0.5 + 1 + 2 + 4 = 7.5 s)."""
SHARED_MEMORY = ("auto", "on", "off")

T = TypeVar("T")


@dataclass(frozen=True)
class TritonOptions:
    """Where and how to reach the served model: the picklable half of a
    :class:`TritonPredictor` (its keyword arguments), shipped to every dask worker."""

    url: str
    protocol: str = "grpc"
    model: str = DEFAULT_MODEL
    timeout: float = DEFAULT_TIMEOUT
    retries: int = RETRIES
    backoff: float = BACKOFF
    shared_memory: str = "auto"


@dataclass(frozen=True)
class ServedModel:
    """What the engine needs from a served affinity model, checked against what it expects."""

    spec: ModelSpec
    input_name: str
    output_name: str
    max_batch: int
    max_patch: Triple | None
    parameters: Mapping[str, str]


def _dims(tensor: Mapping[str, Any]) -> list[int]:
    return [int(d) for d in tensor.get("dims", [])]  # gRPC's JSON spells int64 as strings


def _data_type(tensor: Mapping[str, Any]) -> str:
    return str(tensor.get("data_type", "")).removeprefix("TYPE_")


def served_model(config: Mapping[str, Any], where: str) -> ServedModel:
    """Parse a served model's config; a one-line :class:`ServingError` saying what does not
    match when it is not an affinity model built by ``ssn-deploy serve build-repo``."""
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    try:
        spec = ModelSpec.from_metadata(params, where)
    except InvalidInputError as exc:
        raise ServingError(
            f"{exc} (serve a repository written by ssn-deploy serve build-repo)"
        ) from None
    inputs, outputs = config.get("input", []), config.get("output", [])
    if len(inputs) != 1 or len(outputs) != 1:
        raise ServingError(
            f"{where} does not serve what the engine expects: {len(inputs)} inputs and "
            f"{len(outputs)} outputs, not one raw input and one affinity output (serve "
            f"{DEFAULT_MODEL} or affinity_onnx)"
        )
    (inp,), (out,) = inputs, outputs
    max_batch = int(config.get("max_batch_size", 0))
    problems = []
    if max_batch < 1:
        problems.append("max_batch_size 0 (the engine sends batches)")
    in_dims, out_dims = _dims(inp), _dims(out)
    if _data_type(inp) != "FP32" or len(in_dims) != 4 or in_dims[0] != 1:
        problems.append(f"input {inp.get('name')} {_data_type(inp)} {in_dims}")
    if _data_type(out) != "FP32" or len(out_dims) != 4 or out_dims[0] != spec.num_channels:
        problems.append(
            f"output {out.get('name')} {_data_type(out)} {out_dims} for {spec.num_channels} offsets"
        )
    if problems:
        raise ServingError(
            f"{where} does not serve what the engine expects (FP32 raw [1,Z,Y,X] → FP32 "
            f"affinities [{spec.num_channels},Z,Y,X], batched): {'; '.join(problems)}"
        )
    patch = params.get(METADATA_PREFIX + "max_patch")
    return ServedModel(
        spec=spec,
        input_name=str(inp["name"]),
        output_name=str(out["name"]),
        max_batch=max_batch,
        max_patch=tuple(int(v) for v in json.loads(patch)) if patch else None,  # type: ignore[arg-type]
        parameters=params,
    )


def with_retries(
    call: Callable[[], T],
    *,
    retries: int = RETRIES,
    backoff: float = BACKOFF,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call()``, retried after ``backoff``, ``2·backoff``, ... seconds while it raises
    :class:`TransientServingError`; the last such error is raised (refusals at once)."""
    from ssn_deploy.serving.client import TransientServingError

    for attempt in range(retries + 1):
        try:
            return call()
        except TransientServingError as exc:
            if retries == 0:
                raise
            if attempt == retries:
                waited = backoff * (2**retries - 1)
                raise TransientServingError(
                    f"{exc} (gave up after {retries} retries over {waited:g} s)"
                ) from None
            delay = backoff * 2**attempt
            log.info("%s; retrying in %g s", exc, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def check_patch_fits(patch_shape: Any, max_patch: Triple | None, where: str) -> None:
    """Refuse, before any work, patches the served repository would refuse one by one."""
    if max_patch is not None and any(p > m for p, m in zip(patch_shape, max_patch, strict=True)):
        raise ConfigError(
            f"patch {tuple(patch_shape)} exceeds the maximum patch {tuple(max_patch)} of {where}; "
            "pass --patch-shape within it, or rebuild the repository with "
            "ssn-deploy serve build-repo --max-patch"
        )


def _close(client: Any, shared: Any) -> None:
    """Release a predictor's shared memory and connection (also at interpreter exit)."""
    if shared is not None:
        shared.close()
    client.close()


class TritonPredictor(SpecGeometry):
    """Affinities from the model ``model`` served at ``url`` (``HOST:PORT``).

    ``protocol`` is ``grpc`` (default) or ``http``; ``timeout`` bounds each request (s);
    ``retries`` and ``backoff`` govern retries while the server is unreachable;
    ``shared_memory`` is ``auto`` (on when the server is on this host and accepts it), ``on``
    (an error if it cannot be used) or ``off``.
    """

    def __init__(
        self,
        url: str,
        *,
        protocol: str = "grpc",
        model: str = DEFAULT_MODEL,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = RETRIES,
        backoff: float = BACKOFF,
        shared_memory: str = "auto",
    ) -> None:
        from ssn_deploy.serving.client import TritonClient, is_local

        if shared_memory not in SHARED_MEMORY:
            raise ConfigError(f"shared memory: expected one of {SHARED_MEMORY}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ConfigError("timeout must be > 0, retries and backoff >= 0")
        self._retries, self._backoff = retries, backoff
        self._client = TritonClient(url, protocol=protocol, model=model, timeout=timeout)
        where = f"Triton model {model!r} at {self._client.url}"
        self.served = served_model(self._retry(self._client.config), where)
        self.spec = self.served.spec
        self._client.input_name = self.served.input_name
        self._client.output_name = self.served.output_name
        self._where = where
        self._shared = None
        if shared_memory == "on" or (shared_memory == "auto" and is_local(url)):
            self._shared = self._shared_memory(required=shared_memory == "on")
        self._finalizer = weakref.finalize(self, _close, self._client, self._shared)
        params = self.served.parameters
        self._provenance = {
            "model": f"triton:{model}",
            "backend": "triton",
            "url": self._client.url,
            "protocol": protocol,
            "precision": params.get(METADATA_PREFIX + "precision", "fp32"),
            "model_sha256": params.get(METADATA_PREFIX + "onnx_sha256"),
            "shared_memory": self._shared is not None,
        }

    def _retry(self, call: Callable[[], T]) -> T:
        return with_retries(call, retries=self._retries, backoff=self._backoff)

    def _shared_memory(self, required: bool) -> Any:
        """Registered regions (sized on the first request), or None where the server cannot
        open them; a probe request checks the round trip before it is relied on."""
        from ssn_deploy.serving.client import SharedMemory

        shared = SharedMemory(self._client)
        try:
            g = self.spec.granularity
            probe = np.zeros((1, 1, *g), np.float32)
            self._retry(
                lambda: self._client.infer(
                    probe, shared_memory=shared, output_shape=(1, self.num_channels, *g)
                )
            )
        except ServingError as exc:
            shared.close()
            if required:
                raise ServingError(f"shared memory with {self._where}: {exc}") from None
            log.info("not using shared memory with %s: %s", self._where, exc)
            return None
        return shared

    @property
    def max_batch(self) -> int:
        return self.served.max_batch

    @property
    def max_patch(self) -> Triple | None:
        return self.served.max_patch

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self._provenance)

    def _send(self, batch: np.ndarray) -> np.ndarray:
        from ssn_deploy.serving.client import TransientServingError

        shape = (len(batch), self.num_channels, *batch.shape[2:])
        try:
            out = self._retry(
                lambda: self._client.infer(batch, shared_memory=self._shared, output_shape=shape)
            )
        except TransientServingError as exc:  # in the middle of a run: say how to go on
            raise TransientServingError(
                f"{exc}; finished blocks are kept: restart the server and rerun with --resume"
            ) from None
        if out.shape != shape or out.dtype != np.float32:
            raise ServingError(
                f"{self._where} returned {out.dtype} {list(out.shape)}, expected float32 "
                f"{list(shape)}"
            )
        return out

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.check_batch(batch)
        check_patch_fits(batch.shape[2:], self.max_patch, self._where)
        step = self.max_batch
        parts = [self._send(batch[i : i + step]) for i in range(0, len(batch), step)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def close(self) -> None:
        """Unregister shared memory and close the connection (also done when collected)."""
        self._finalizer()
