"""The blockwise affinity engine: raw volume → affinities zarr, on any dask cluster.

Blocks tile the volume (:class:`~ssn_deploy.geometry.BlockGrid`); each dask task predicts one
block (:func:`~ssn_deploy.inference.block.predict_block`), writes its output shard (shards ==
block shape, so no two tasks write one shard; inner chunks of at most 64³ per channel keep
viewers fast) and then marks the block finished (:mod:`.done`); the last block is followed
by the scale levels (:mod:`ssn_deploy.pyramid`). Blocks are submitted lazily with at most
``max_in_flight`` pending, so the scheduler holds O(in-flight) tasks whatever the volume size.
The default cluster is an in-process ``LocalCluster`` of threads; ``scheduler="tcp://…"`` uses
a running one (its workers must import ssn_deploy and reach the volumes by the same paths or
URLs).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ssn_deploy.errors import (
    ConfigError,
    InputNotFoundError,
    InvalidInputError,
    SsnDeployError,
)
from ssn_deploy.export.tensorrt import file_sha256
from ssn_deploy.geometry import Block, BlockGrid, Box
from ssn_deploy.inference.blend import PatchGrid
from ssn_deploy.inference.block import predict_block
from ssn_deploy.inference.checks import check_raw, describe, input_identity
from ssn_deploy.inference.done import BlockMarkers, refuse_changed_settings
from ssn_deploy.inference.predictor import Predictor
from ssn_deploy.inference.scheduling import dask_client, run_blocks, timed_stage
from ssn_deploy.outputs import finish_stage
from ssn_deploy.provenance import run_provenance
from ssn_deploy.volumes import Volume, create_volume, open_volume, overlaps

log = logging.getLogger(__name__)

OUT_DTYPES = {"uint8": 255.0, "float16": 1.0, "float32": 1.0}
"""Stored dtype → scale (stored value = affinity × scale)."""

PredictorFactory = Callable[[], Predictor]

_local = threading.local()


def cached_predictor(factory: PredictorFactory) -> Predictor:
    """The predictor ``factory`` builds, built once per thread (not per block).

    Keyed by dask's token of the factory (e.g. a ``functools.partial`` of
    :func:`~ssn_deploy.inference.loader.load_predictor`), which survives the pickling each task
    goes through; a thread keeps only its latest predictor, so memory stays bounded.
    """
    from dask.base import tokenize

    key = tokenize(factory)
    if getattr(_local, "key", None) != key:
        _local.predictor, _local.key = factory(), key
    return _local.predictor


def encode_affinities(aff: np.ndarray, out_dtype: str) -> np.ndarray:
    """Affinities as stored: uint8 (×255, rounded), or float16 / float32 as they are."""
    if out_dtype == "uint8":
        return np.rint(np.clip(aff, 0.0, 1.0) * 255.0).astype(np.uint8)
    return aff.astype(out_dtype)


def _predict_and_write(
    raw: Volume,
    out: Volume,
    markers: BlockMarkers,
    factory: PredictorFactory,
    grid: PatchGrid,
    block: Block,
    batch_size: int,
) -> int | SsnDeployError:
    """One dask task: predict a block, write its chunk, then mark it; returns its voxels.

    A user error (e.g. a corrupt input chunk) is *returned*, so that the worker does not log
    it as a crash with a traceback; the client raises it (the CLI prints one line).
    """
    try:
        predictor = cached_predictor(factory)
        aff = predict_block(raw, block.write_box, predictor, grid, batch_size)
    except SsnDeployError as exc:
        return type(exc)(f"block {block.block_id} (voxels {describe(block.write_box)}): {exc}")
    stored = encode_affinities(aff, out.dtype.name)
    out[block.write_box] = stored
    markers.mark(block, stored)
    return block.write_box.size


def model_sha256(path: str) -> str | None:
    """SHA-256 of a model file (None for a model that is not a file, e.g. the baseline), so
    that a resumed run refuses a retrained checkpoint saved under the same name."""
    return file_sha256(path) if os.path.isfile(path) else None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _settings(predictor: Predictor, grid: PatchGrid, blocks: BlockGrid, out_dtype: str,
              source: Volume) -> dict:  # fmt: skip
    """What must not change between a run and its resumption (the device, or a Triton
    server's address, may): the input (:func:`input_identity`), the geometry, the stored dtype
    and the model (its file's checksum, or the one a server reports for what it serves)."""
    used = predictor.provenance
    return _jsonable(
        {
            "input": input_identity(source),
            "block_shape": blocks.block_shape,
            "patch_shape": grid.patch_shape,
            "margin": grid.margin,
            "stride": grid.stride,
            "out_dtype": out_dtype,
            "model": used["model"],
            "model_sha256": used.get("model_sha256") or model_sha256(used["model"]),
            "backend": used["backend"],
            "precision": used["precision"],
            "tta": used.get("tta", "none"),
        }
    )


def _prepare_output(
    out_spec: str,
    raw: Volume,
    predictor: Predictor,
    blocks: BlockGrid,
    settings: dict,
    *,
    resume: bool,
    overwrite: bool,
) -> tuple[Volume, BlockMarkers]:
    """Create the output and its markers, or reopen them to resume after checking settings."""
    if resume:
        try:
            out = open_volume(out_spec, "r+")
        except InputNotFoundError:
            out = None  # nothing to resume: start afresh
        if out is not None:
            stored = out.attrs.get("ssn_deploy", {}).get("settings") or {}
            refuse_changed_settings(out_spec, stored, settings)
            return out, BlockMarkers.open(out_spec, blocks)
    attrs = {
        "ssn_deploy": {
            "command": "infer",
            "stage": "affinities",
            **run_provenance(),  # version, created (UTC), argv
            "model": settings["model"],
            "model_sha256": settings["model_sha256"],
            "source": raw.spec,
            "offsets": [list(o) for o in predictor.offsets],
            "scale": OUT_DTYPES[settings["out_dtype"]],
            "settings": settings,
            "predictor": predictor.provenance,
        }
    }
    out = create_volume(
        out_spec,
        (predictor.num_channels, *raw.shape),
        settings["out_dtype"],
        shards=(predictor.num_channels, *blocks.block_shape),  # one block = one whole shard
        voxel_size=raw.voxel_size,
        offset=raw.offset,
        overwrite=overwrite or resume,  # resuming: a group a killed run left without its array
        attrs=attrs,
    )
    return out, BlockMarkers.create(out_spec, blocks, raw.voxel_size, raw.offset)


def _check_not_input(raw: Volume, out_spec: str) -> None:
    """Writing (or --overwrite deleting) the output must never touch the input."""
    if overlaps(raw.spec, out_spec):
        raise InvalidInputError(f"{out_spec} overlaps the input {raw.spec}; choose another output")


def predict_affinities(
    raw: str | Volume,
    out_spec: str,
    predictor_factory: PredictorFactory,
    *,
    block_shape: Sequence[int],
    patch_shape: Sequence[int],
    overlap: Sequence[int] | int = 0,
    margin: Sequence[int] | None = None,
    batch_size: int = 1,
    scheduler: Any = None,
    workers: int = 1,
    max_in_flight: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    out_dtype: str = "uint8",
    progress: bool = True,
) -> Volume:
    """Predict affinities of the 3D ``raw`` into the zarr ``out_spec`` (C×Z×Y×X) blockwise.

    ``predictor_factory`` is a picklable zero-argument callable (e.g.
    ``functools.partial(load_predictor, "model.ckpt", "torch", threads=1)``); each worker
    thread calls it once. Patches (``patch_shape``, multiples of the model's granularity)
    keep their core inside ``margin`` (default: the model's context) and overlap by
    ``overlap`` voxels (see :mod:`.blend`). ``scheduler``: None (in-process cluster of
    ``workers`` threads), a ``tcp://`` address or a ``distributed.Client``. ``max_in_flight``
    defaults to twice the cluster's threads. ``resume`` continues an interrupted run with the
    same settings; ``overwrite`` replaces an existing output. ``out_dtype``: uint8 (×255),
    float16 or float32.
    """
    if resume and overwrite:
        raise ConfigError("--resume continues an output and --overwrite replaces it: pick one")
    if out_dtype not in OUT_DTYPES:
        raise ConfigError(f"out dtype: expected one of {sorted(OUT_DTYPES)}, got {out_dtype!r}")
    if batch_size < 1 or workers < 1 or (max_in_flight is not None and max_in_flight < 1):
        raise ConfigError("batch size, workers and max in flight must be >= 1")
    source = open_volume(raw) if isinstance(raw, str) else raw
    predictor = cached_predictor(predictor_factory)
    check_raw(source, predictor.voxel_size)
    _check_not_input(source, out_spec)
    grid = PatchGrid.plan(
        patch_shape,
        predictor.context if margin is None else margin,
        overlap,
        predictor.granularity,
    )
    if len(block_shape) != 3 or min(block_shape) < 1:
        raise ConfigError(f"block shape: expected three positive sizes, got {tuple(block_shape)}")
    # a block larger than the volume is the volume (and its chunk): nothing scales with it
    block_shape = tuple(min(int(b), n) for b, n in zip(block_shape, source.shape, strict=True))
    try:
        blocks = BlockGrid(Box.from_shape(source.shape), block_shape, context=0)
    except ValueError as exc:
        raise ConfigError(f"block shape: {exc}") from None
    if any(m < c for m, c in zip(grid.margin, predictor.context, strict=True)):
        log.info(
            "margin %s is smaller than the model's context %s: outputs near patch borders saw "
            "padding (overlap blending hides, but does not remove, the seams)",
            grid.margin,
            predictor.context,
        )
    log.info(
        "patches %s, margin %s, stride %s: %.2f model voxels per output voxel",
        grid.patch_shape,
        grid.margin,
        grid.stride,
        grid.cost(blocks.block_shape),
    )
    settings = _settings(predictor, grid, blocks, out_dtype, source)
    out, markers = _prepare_output(
        out_spec, source, predictor, blocks, settings, resume=resume, overwrite=overwrite
    )
    if resume:
        markers.verify(blocks, [out])
    finished = markers.finished()
    if finished.any():
        log.info("skipping %d finished blocks", finished.sum())
    pending = (b for b in blocks if not finished[b.block_id])
    task = functools.partial(
        _predict_and_write, source, out, markers, predictor_factory, grid, batch_size=batch_size
    )
    with dask_client(scheduler, workers) as client:
        limit = max_in_flight or 2 * sum(client.nthreads().values())
        with timed_stage("affinities"):
            done = int(finished.sum())
            run_blocks(client, task, pending, limit, len(blocks), done, progress, "affinities")
        with timed_stage("affinity_pyramid"):
            finish_stage(out, client, label=False, progress=progress)
    return out
