"""Open, create and convert EM volumes: the one place that knows storage formats.

Everything else in ssn-deploy sees a :class:`Volume`, which slices like numpy whatever the
backend, and carries its voxel size and offset (nm, z,y,x; spatial axes are the last three,
channels first for multi-channel arrays).

Volume specs (what users type):

``file.hdf:volumes/raw``
    HDF5 dataset (``.hdf``, ``.h5``, ``.hdf5``; ``/`` may replace ``:``), CREMI layout: voxel
    size from the dataset's ``resolution`` attribute, offset (nm) from ``offset``. Opened
    read-only unless ``mode="r+"``.
``x.zarr``, ``x.zarr/labels``, ``x.zarr:labels``, ``memory://x.zarr``, ``s3://bucket/x.zarr``
    zarr v3 (v2 is read too): an array, or an OME-Zarr multiscale group whose first
    (highest-resolution) dataset is used. Voxel size and offset come from the OME-Zarr
    ``multiscales`` metadata (NGFF 0.5 under ``"ome"``, or 0.4 at the top level; units
    converted to nm, missing units taken as nm), else from the attributes ``voxel_size`` (or
    ``resolution``) and ``offset`` of a plain array. ``file://`` URLs are local paths; other
    URLs go through fsspec (``s3://`` needs s3fs), with the options of :func:`storage_options`
    (``--storage-options``). ``http://`` and ``https://`` URLs are read-only inputs: zarr v3
    reads metadata and chunks by key, so the server need not list directories.
``x.n5:dataset``
    N5 through tensorstore (local). N5 attributes are written in Java's x,y,z order, so
    ``resolution``, ``pixelResolution.dimensions`` and ``offset`` are reversed to z,y,x, as
    are the array dimensions themselves.
``stack.tif``, ``sections/``
    A multi-page TIFF, or a directory of 2D TIFF sections in natural name order (``s2.tif``
    before ``s10.tif``). Read-only; TIFF carries no voxel size, so pass ``voxel_size=``.

A directory without a suffix is recognised by its content (``zarr.json``/``.zarray``/``.zgroup``,
``attributes.json``, ``*.tif``); ``DIR:NAME`` then names a node inside it.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ssn_deploy.errors import (
    CorruptDataError,
    InputNotFoundError,
    InvalidInputError,
    OutputExistsError,
    SsnDeployError,
    VoxelSizeError,
)
from ssn_deploy.geometry import Box
from ssn_deploy.storage import (
    READ_ONLY_SCHEMES,
    check_free_space,
    check_writable,
    refuse_read_only,
    stored_bytes,
)

if TYPE_CHECKING:
    import dask.array

log = logging.getLogger(__name__)

Triple = tuple[float, float, float]

_SUFFIXES = {".hdf": "hdf5", ".h5": "hdf5", ".hdf5": "hdf5", ".zarr": "zarr", ".n5": "n5"}
_TIFF_SUFFIXES = (".tif", ".tiff")
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
_UNITS_NM = {
    "nanometer": 1.0,
    "micrometer": 1e3,
    "millimeter": 1e6,
    "angstrom": 0.1,
    "picometer": 1e-3,
}
COPY_BLOCK_BYTES = 2**26
"""Upper bound on what :func:`convert` holds in memory at once (unless one chunk is larger)."""


# --- spec parsing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Location:
    """Where a spec points: the format, its container (file, directory, URL) and a node in it."""

    kind: str
    container: str
    inner: str


def _is_url(path: str) -> bool:
    return "://" in path


def _parse_spec(spec: str) -> _Location:
    """Split a spec into format, container and inner path (see the module docstring)."""
    spec = spec.removeprefix("file://")
    suffixes = "|".join(re.escape(s) for s in _SUFFIXES)
    match = re.match(rf"^(.*?(?:{suffixes}))(?:[:/](.*))?$", spec, flags=re.IGNORECASE)
    if match:
        container, inner = match.group(1), (match.group(2) or "").strip("/")
        return _Location(_SUFFIXES[Path(container).suffix.lower()], container, inner)
    if spec.lower().endswith(_TIFF_SUFFIXES):
        return _Location("tiff", spec, "")
    container, inner = spec, ""
    scheme_end = spec.find("://") + 3 if _is_url(spec) else 0
    if ":" in spec[scheme_end:] and not os.path.exists(spec):
        container, inner = spec.rsplit(":", 1)
    return _Location(_kind_of_directory(spec, container), container, inner.strip("/"))


def container_of(spec: str) -> str:
    """The file, directory or URL a volume spec is stored in (``data.hdf:volumes/raw`` →
    ``data.hdf``, ``s3://bucket/x.zarr/labels`` → ``s3://bucket/x.zarr``)."""
    return _parse_spec(spec).container


def _kind_of_directory(spec: str, container: str) -> str:
    if _is_url(container):
        return "zarr"
    path = Path(container)
    if not path.exists():
        raise InputNotFoundError(f"{container}: no such file or directory")
    if any((path / marker).exists() for marker in _ZARR_MARKERS):
        return "zarr"
    if (path / "attributes.json").exists():
        return "n5"
    if path.is_dir() and _tiff_files(path):
        return "tiffdir"
    raise InvalidInputError(
        f"{spec}: cannot tell the format; expected .zarr, .n5, .hdf/.h5/.hdf5 (FILE:DATASET), "
        ".tif/.tiff or a directory of TIFF sections"
    )


# --- the Volume -------------------------------------------------------------------------------


class _Array(Protocol):
    """What a backend provides: numpy-style reads and writes of normalised keys."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def __getitem__(self, key: tuple) -> Any: ...

    def __setitem__(self, key: tuple, value: Any) -> None: ...


class Volume:
    """A stored array that slices like numpy, with its voxel size and offset in nm.

    Index with a tuple of slices/ints or with a :class:`ssn_deploy.geometry.Box` (anything with
    ``.slices``), whose axes are the spatial (last) ones. Pickling reopens the spec, so a
    Volume can travel to dask workers.
    """

    def __init__(
        self,
        spec: str,
        array: _Array,
        *,
        fmt: str,
        mode: str,
        voxel_size: Triple | None,
        offset: Triple,
        chunks: tuple[int, ...],
        attrs: Mapping[str, Any],
        close: Callable[[], None] | None = None,
    ) -> None:
        self.spec = spec
        self.format = fmt
        self.mode = mode
        self.voxel_size = voxel_size
        self.offset = offset
        self.chunks = tuple(int(c) for c in chunks)
        self.attrs = attrs
        self._array = array
        self._close = close
        self._voxel_size_override: Triple | None = None
        self.storage_options: dict[str, Any] | None = None
        """fsspec options of a URL volume, as opened (they travel with its pickle)."""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self._array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._array.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return (
            f"Volume({self.spec!r}, shape={self.shape}, dtype={self.dtype}, "
            f"voxel_size={self.voxel_size}, offset={self.offset}, chunks={self.chunks})"
        )

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._array[self._index(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.mode == "r":
            raise PermissionError(f"{self.spec} is open read-only; open it with mode='r+'")
        self._array[self._index(key)] = value

    def read(self) -> np.ndarray:
        """The whole array in memory (use slices or :meth:`to_dask` for large volumes)."""
        return self[...]

    def to_dask(self) -> dask.array.Array:
        """A lazy dask array whose chunks are the storage chunks, so tasks never share one."""
        import dask.array as da
        from dask.base import tokenize

        return da.from_array(
            self,
            chunks=self.chunks,
            name=f"volume-{tokenize(self.spec, self.shape, self.dtype.str)}",
            meta=np.empty((0,) * self.ndim, dtype=self.dtype),
            asarray=True,
            fancy=False,
            lock=False,
        )

    def close(self) -> None:
        """Release the file handle (HDF5); other backends hold none."""
        if self._close is not None:
            self._close()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple:
        if self.storage_options is not None:  # a worker reopens it with the same options
            return _reopen, (self.spec, self.mode, self._voxel_size_override,
                             self.storage_options)  # fmt: skip
        return open_volume, (self.spec, self.mode, self._voxel_size_override)

    def _index(self, key: Any) -> tuple:
        """Normalise a key to one entry per axis; a Box covers the spatial (last) axes."""
        if hasattr(key, "slices"):
            return self._box_index(tuple(key.slices))
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = next(i for i, k in enumerate(key) if k is Ellipsis)
            fill = (slice(None),) * (self.ndim - len(key) + 1)
            key = key[:at] + fill + key[at + 1 :]
        if len(key) > self.ndim:
            raise IndexError(f"{len(key)} indices for {self.ndim}D volume {self.spec}")
        return key + (slice(None),) * (self.ndim - len(key))

    def _box_index(self, slices: tuple[slice, ...]) -> tuple:
        spatial = self.shape[self.ndim - len(slices) :]
        if len(slices) > self.ndim or any(
            s.start < 0 or s.stop > n for s, n in zip(slices, spatial, strict=True)
        ):
            raise IndexError(f"box {slices} lies outside {self.spec} with shape {self.shape}")
        return (slice(None),) * (self.ndim - len(slices)) + slices


def require_volume(
    vol: Volume, ndim: int | Iterable[int] = 3, dtypes: Iterable[Any] | None = None
) -> Volume:
    """Fail early (before any work) if ``vol`` has the wrong rank or dtype; returns ``vol``."""
    ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if vol.ndim not in ranks:
        expected = " or ".join(f"{r}D" for r in ranks)
        raise InvalidInputError(
            f"{vol.spec}: expected a {expected} volume, got {vol.ndim}D with shape {vol.shape}"
        )
    if dtypes is not None:
        allowed = [np.dtype(d) for d in dtypes]
        if vol.dtype not in allowed:
            expected = " or ".join(str(d) for d in allowed)
            raise InvalidInputError(f"{vol.spec}: expected dtype {expected}, got {vol.dtype}")
    return vol


# --- metadata helpers -------------------------------------------------------------------------


def _nm(values: Iterable[Any]) -> tuple[float, ...]:
    """Floats rounded to 7 significant digits: float32 storage turns 4.6 into 4.5999999."""
    return tuple(float(f"{float(v):.7g}") for v in values)


def _spatial(spec: str, values: Any, ndim: int, what: str) -> Triple | None:
    """The z,y,x part of a metadata vector; None for non-spatial (<3D) arrays or no value."""
    if values is None or ndim < 3:
        return None
    values = _nm(np.ravel(values))
    if len(values) < 3:
        raise VoxelSizeError(f"{spec}: {what} {values} has {len(values)} values; expected z,y,x")
    return values[-3:]  # type: ignore[return-value]


def _metadata(
    spec: str, attrs: Mapping[str, Any], ndim: int, keys: tuple[str, ...]
) -> tuple[Triple | None, Triple]:
    """Voxel size (first of ``keys`` present) and offset from plain attributes."""
    raw = next((attrs[k] for k in keys if k in attrs), None)
    voxel_size = _spatial(spec, raw, ndim, "voxel size")
    offset = _spatial(spec, attrs.get("offset"), ndim, "offset")
    return voxel_size, offset or (0.0, 0.0, 0.0)


def _multiscales(attrs: Mapping[str, Any]) -> dict | None:
    """The first OME-Zarr multiscale (NGFF 0.5 under "ome", or 0.4 at the top level)."""
    ome = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales") if isinstance(ome, Mapping) else None
    return multiscales[0] if multiscales else None


def _ome_transform(spec: str, multiscale: dict, ndim: int) -> tuple[Triple | None, Triple]:
    """Scale and translation of the first dataset (composed with the multiscale-level ones)."""
    scale, translation = np.ones(ndim), np.zeros(ndim)
    dataset = multiscale["datasets"][0]
    transforms = dataset.get("coordinateTransformations", []) + multiscale.get(
        "coordinateTransformations", []
    )
    for t in transforms:
        if t.get("type") == "scale":
            scale, translation = scale * t["scale"], translation * t["scale"]
        elif t.get("type") == "translation":
            translation = translation + t["translation"]
    space = _space_axes(multiscale.get("axes", []), ndim)
    if len(space) != 3 or ndim < 3:
        return None, (0.0, 0.0, 0.0)
    voxel_size = _spatial(spec, [scale[i] * f for i, f in space], ndim, "scale")
    offset = _spatial(spec, [translation[i] * f for i, f in space], ndim, "offset")
    return voxel_size, offset or (0.0, 0.0, 0.0)


def _space_axes(axes: list, ndim: int) -> list[tuple[int, float]]:
    """(index, nm per unit) of the spatial axes; without axes metadata, the last three in nm."""
    if not axes:
        return [(i, 1.0) for i in range(max(0, ndim - 3), ndim)]
    axes = [{"name": a} if isinstance(a, str) else a for a in axes]
    return [
        (i, _UNITS_NM.get(a.get("unit", "nanometer"), 1.0))
        for i, a in enumerate(axes)
        if a.get("type") == "space" or ("type" not in a and a["name"] in ("z", "y", "x"))
    ]


# --- HDF5 -------------------------------------------------------------------------------------


def _open_hdf5(spec: str, loc: _Location, mode: str) -> Volume:
    import h5py

    if not os.path.isfile(loc.container):
        raise InputNotFoundError(f"{loc.container}: no such file")
    try:
        file = h5py.File(loc.container, mode)
    except OSError as exc:
        raise InvalidInputError(f"{loc.container}: cannot open as HDF5 ({exc})") from exc
    node = file.get(loc.inner) if loc.inner else None
    if not isinstance(node, h5py.Dataset):
        names: list[str] = []
        file.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        file.close()
        raise _missing(loc, names)
    attrs = {k: _plain(v) for k, v in node.attrs.items()}
    voxel_size, offset = _metadata(spec, attrs, node.ndim, ("resolution", "voxel_size"))
    chunks = node.chunks or choose_chunks(node.shape, voxel_size, node.dtype)
    return Volume(
        spec,
        node,
        fmt="hdf5",
        mode=mode,
        voxel_size=voxel_size,
        offset=offset,
        chunks=chunks,
        attrs=attrs,
        close=file.close,
    )


def _plain(value: Any) -> Any:
    """HDF5 attribute values as JSON-like Python values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value.decode() if isinstance(value, bytes) else value


def _missing(loc: _Location, available: list[str]) -> InputNotFoundError:
    """The error for a dataset that is not there, listing those that are."""
    what = f"has no dataset '{loc.inner}'" if loc.inner else "needs a dataset: name it as PATH:NAME"
    listing = ", ".join(sorted(available)) or "none"
    return InputNotFoundError(f"{loc.container} {what}; available: {listing}")


# --- zarr -------------------------------------------------------------------------------------


class _ZarrArray:
    """A zarr array whose undecodable chunks surface as :class:`CorruptDataError`."""

    def __init__(self, array: Any, spec: str, location: str) -> None:
        self._array = array
        self._spec = spec
        self._location = location
        self.shape = array.shape
        self.dtype = array.dtype
        self.chunks = array.shards or array.chunks

    def __getitem__(self, key: tuple) -> np.ndarray:
        try:
            return self._array[key]
        except IndexError:
            raise
        except Exception as exc:
            bad = self._find_bad_chunk(key)
            if bad is None:
                raise
            name = self._array.metadata.encode_chunk_key(bad)
            raise CorruptDataError(
                f"{self._spec}: chunk {name} ({self._location}/{name}) cannot be decoded: {exc}"
            ) from exc

    def __setitem__(self, key: tuple, value: Any) -> None:
        # zarr (3.1) reads a shard and merges into it even when a write replaces all of it, so
        # a damaged shard would fail the very write that repairs it (resume after verify):
        # whole shards are deleted first. Partial writes keep zarr's read-modify-write.
        for shard in self._whole_shards(key):
            from zarr.core.sync import sync

            sync((self._array.store_path / self._array.metadata.encode_chunk_key(shard)).delete())
        self._array[key] = value

    def _whole_shards(self, key: tuple) -> Iterator[tuple[int, ...]]:
        """Coordinates of the shards ``key`` covers entirely; none unless it covers only such."""
        shards = self._array.shards
        if not shards:
            return iter(())
        ranges = []
        for k, n, s in zip(key, self.shape, shards, strict=True):
            if not isinstance(k, slice) or k.step not in (None, 1):
                return iter(())
            start, stop, _ = k.indices(n)
            if start % s or (stop % s and stop != n) or start >= stop:
                return iter(())
            ranges.append(range(start // s, -(-stop // s)))
        return itertools.product(*ranges)

    def _find_bad_chunk(self, key: tuple) -> tuple[int, ...] | None:
        """Read the selection's chunks one by one and return the first that fails to decode."""
        grids = []
        for k, n, c in zip(key, self.shape, self.chunks, strict=True):
            if isinstance(k, slice):
                start, stop, _ = k.indices(n)
                lo, hi = min(start, stop), max(start, stop)
            else:
                lo = hi = int(k) % n
            grids.append(range(lo // c, hi // c + 1))
        for coords in itertools.product(*grids):
            region = tuple(
                slice(i * c, min((i + 1) * c, n))
                for i, c, n in zip(coords, self.chunks, self.shape, strict=True)
            )
            if any(r.start >= r.stop for r in region):
                continue
            try:
                self._array[region]
            except Exception:
                return coords
        return None


def _zarr_store(container: str) -> str:
    """Local containers must exist; URLs are checked by zarr itself."""
    if not _is_url(container) and not os.path.exists(container):
        raise InputNotFoundError(f"{container}: no such zarr store")
    return container


REMOTE_EXTRA = "pip install 'ssn-deploy[remote]' (s3fs, gcsfs)"

_STORAGE_OPTIONS: dict[str, Any] = {}
"""The process's fsspec options for URL volumes (set by :func:`storage_options`)."""
_REOPEN_OPTIONS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "ssn_deploy_reopen_options", default=None
)
"""Options of a volume being unpickled (per thread, so that concurrent tasks never mix)."""


@contextlib.contextmanager
def storage_options(options: Mapping[str, Any] | None) -> Iterator[None]:
    """Open and create URL volumes with these fsspec options meanwhile (``--storage-options``):
    keyword arguments of the filesystem (``{"endpoint_url": "http://host:9000"}``), given to
    every URL, or, when every key is a protocol, options per protocol (``{"s3": {...},
    "https": {...}}``). They override fsspec's ``FSSPEC_<PROTOCOL>_<KEY>`` environment
    variables, and travel with the volumes that tasks carry to dask workers."""
    global _STORAGE_OPTIONS
    previous, _STORAGE_OPTIONS = _STORAGE_OPTIONS, dict(options or {})
    try:
        yield
    finally:
        _STORAGE_OPTIONS = previous


def url_options(url: str) -> dict[str, Any] | None:
    """The fsspec options to open ``url`` with: None for a local path or when none are set."""
    if not _is_url(url) or url.startswith("file://"):
        return None
    options = _REOPEN_OPTIONS.get()
    options = _STORAGE_OPTIONS if options is None else options
    if options and all(_is_protocol(k) and isinstance(v, Mapping) for k, v in options.items()):
        options = options.get(url.split("://", 1)[0].lower(), {})
    return dict(options) or None


def _is_protocol(name: str) -> bool:
    import fsspec

    return name in fsspec.available_protocols()


def _reopen(spec: str, mode: str, voxel_size: Triple | None, options: dict[str, Any]) -> Volume:
    """Unpickle a URL volume with the storage options it was opened with."""
    token = _REOPEN_OPTIONS.set(options)
    try:
        return open_volume(spec, mode, voxel_size)
    finally:
        _REOPEN_OPTIONS.reset(token)


def url_filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path in it; a missing filesystem package (s3fs
    for ``s3://``, gcsfs for ``gs://``) is one line saying what to install."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **(url_options(url) or {}))
    except ImportError as exc:
        raise InvalidInputError(f"{url}: {_missing_package(exc)}") from None


def _missing_package(exc: ImportError) -> str:
    # fsspec says "Install s3fs to access S3"
    what = exc.name or re.sub(r"^Install\s+", "", str(exc).strip().rstrip(".")) or "a package"
    return f"opening this URL needs {what}: {REMOTE_EXTRA}"


def _open_zarr_node(container: str, inner: str, mode: str) -> Any:
    import zarr

    try:
        return zarr.open(
            _zarr_store(container),
            mode=mode,
            path=inner or None,
            storage_options=url_options(container),
        )
    except ImportError as exc:
        raise InvalidInputError(f"{container}: {_missing_package(exc)}") from None
    except FileNotFoundError:  # zarr's NodeNotFoundError: the callers list what exists
        raise
    except (ValueError, TypeError, KeyError) as exc:  # zarr.json that is not valid metadata
        where = "/".join(p for p in (container, inner) if p)
        raise CorruptDataError(
            f"{where}: unreadable zarr metadata ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:100] if str(exc) else ''})"
        ) from None


UNLISTED = "unknown (the server lists no directories)"
"""What :func:`_zarr_listing` says of a URL store that cannot be listed (plain http)."""


def _zarr_listing(container: str) -> list[str]:
    """Arrays and OME-Zarr multiscale groups in a store (not the arrays inside the latter)."""
    import zarr

    try:
        root = zarr.open(container, mode="r", storage_options=url_options(container))
    except FileNotFoundError:
        return []
    if isinstance(root, zarr.Array):
        return ["(root array)"]
    try:
        members = list(root.members(max_depth=None))
    except (OSError, ValueError, NotImplementedError):
        if not _is_url(container):
            raise
        members = []  # listing is best effort: an http server need not index directories
    names = [
        p
        for p, node in members
        if isinstance(node, zarr.Array) or _multiscales(node.attrs.asdict())
    ]
    if not names and container.lower().startswith(READ_ONLY_SCHEMES):
        return [UNLISTED]  # an empty listing says nothing there
    return [n for n in names if not any(n.startswith(m + "/") for m in names)]


LABELS_GROUP = "labels"
"""OME-Zarr keeps an image's label images in this group beside its scale levels."""


def _label_alias(loc: _Location) -> _Location | None:
    """``OUT.zarr/segmentation`` → ``OUT.zarr/labels/segmentation`` when only the latter exists:
    label images live under ``labels/`` (OME-Zarr), while users, scripts and outputs written
    before that layout name them without it."""
    if not loc.inner or loc.inner.split("/")[0] == LABELS_GROUP:
        return None
    alias = replace(loc, inner=f"{LABELS_GROUP}/{loc.inner}")
    try:
        _open_zarr_node(alias.container, alias.inner, "r")
    except FileNotFoundError:
        return None
    return alias


def _open_zarr(spec: str, loc: _Location, mode: str) -> Volume:
    import zarr

    try:
        node = _open_zarr_node(loc.container, loc.inner, mode)
    except FileNotFoundError as exc:
        if not loc.inner:
            raise InputNotFoundError(f"{loc.container}: no such zarr array or group") from exc
        alias = _label_alias(loc)
        if alias is None:
            raise _missing(loc, _zarr_listing(loc.container)) from exc
        loc, spec = alias, f"{alias.container.rstrip('/')}/{alias.inner}"
        node = _open_zarr_node(loc.container, loc.inner, mode)
    attrs = node.attrs
    multiscale = _multiscales(attrs.asdict())
    if isinstance(node, zarr.Group):
        if multiscale is None:
            listing = ", ".join(_zarr_listing(loc.container)) or "none"
            raise InputNotFoundError(
                f"{spec} is a zarr group without OME-Zarr multiscales; name an array as "
                f"{loc.container}:NAME; available: {listing}"
            )
        inner = "/".join(p for p in (loc.inner, multiscale["datasets"][0]["path"]) if p)
        try:
            array = _open_zarr_node(loc.container, inner, mode)
        except FileNotFoundError:  # killed between writing the group and its array
            raise InputNotFoundError(f"{spec}: OME-Zarr group without its array {inner}") from None
    else:
        array, inner = node, loc.inner
    if multiscale is not None:
        voxel_size, offset = _ome_transform(spec, multiscale, array.ndim)
    else:
        voxel_size, offset = _metadata(
            spec, attrs.asdict(), array.ndim, ("voxel_size", "resolution")
        )
    location = "/".join(p for p in (loc.container.rstrip("/"), inner) if p)
    wrapped = _ZarrArray(array, spec, location)
    return Volume(
        spec,
        wrapped,
        fmt="ome-zarr" if multiscale else "zarr",
        mode=mode,
        voxel_size=voxel_size,
        offset=offset,
        chunks=wrapped.chunks,
        attrs=attrs,
    )


# --- N5 ---------------------------------------------------------------------------------------


class _TensorStoreArray:
    """A tensorstore array read and written synchronously, z,y,x order."""

    def __init__(self, store: Any, spec: str) -> None:
        self._store = store
        self._spec = spec
        self.shape = tuple(store.shape)
        self.dtype = store.dtype.numpy_dtype

    def __getitem__(self, key: tuple) -> np.ndarray:
        try:
            return self._store[self._absolute(key)].read().result()
        except ValueError as exc:
            reason = str(exc).split(" [tensorstore_spec")[0]
            raise CorruptDataError(f"{self._spec}: {reason}") from exc

    def __setitem__(self, key: tuple, value: Any) -> None:
        self._store[self._absolute(key)].write(value).result()

    def _absolute(self, key: tuple) -> tuple:
        """numpy semantics (negative indices, clipped slices), which tensorstore does not apply."""
        return tuple(
            slice(*k.indices(n)) if isinstance(k, slice) else int(k) % n
            for k, n in zip(key, self.shape, strict=True)
        )


def _n5_datasets(root: Path) -> list[str]:
    return sorted(
        str(p.parent.relative_to(root))
        for p in root.rglob("attributes.json")
        if "dimensions" in json.loads(p.read_text())
    )


def _open_n5(spec: str, loc: _Location, mode: str) -> Volume:
    import tensorstore as ts

    root = Path(loc.container)
    if not root.is_dir():
        raise InputNotFoundError(f"{loc.container}: no such N5 container")
    meta_file = root / loc.inner / "attributes.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if "dimensions" not in meta:
        raise _missing(loc, _n5_datasets(root))
    store = ts.open(
        {"driver": "n5", "kvstore": {"driver": "file", "path": str(root)}, "path": loc.inner},
        read=True,
        write=mode == "r+",
    ).result()
    ndim = len(meta["dimensions"])
    pixel = meta.get("pixelResolution")
    raw = pixel.get("dimensions") if isinstance(pixel, Mapping) else meta.get("resolution")
    voxel_size = _spatial(spec, None if raw is None else raw[::-1], ndim, "voxel size")
    offset = _spatial(spec, meta["offset"][::-1] if "offset" in meta else None, ndim, "offset")
    return Volume(
        spec,
        _TensorStoreArray(store.T, spec),
        fmt="n5",
        mode=mode,
        voxel_size=voxel_size,
        offset=offset or (0.0, 0.0, 0.0),
        chunks=tuple(meta["blockSize"][::-1]),
        attrs=meta,
    )


# --- TIFF -------------------------------------------------------------------------------------


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _tiff_files(directory: Path) -> list[Path]:
    files = [p for p in directory.iterdir() if p.suffix.lower() in _TIFF_SUFFIXES]
    return sorted(files, key=_natural_key)


class _TiffSections:
    """A z-stack of 2D TIFF pages (one multi-page file, or one file per section)."""

    def __init__(self, files: list[Path], multipage: bool) -> None:
        import tifffile

        self._files = files
        self._multipage = multipage
        with tifffile.TiffFile(files[0]) as tif:
            series = tif.series[0]
            page = series.keyframe
            if page.ndim != 2:
                raise InvalidInputError(f"{files[0]}: expected 2D sections, got {page.shape}")
            depth = len(series.pages) if multipage else len(files)
            self.shape = (depth, *page.shape)
            self.dtype = np.dtype(page.dtype)

    def __getitem__(self, key: tuple) -> np.ndarray:
        import tifffile

        z, yx = key[0], key[1:]
        indices = (
            [z % self.shape[0]]
            if isinstance(z, int | np.integer)
            else range(*z.indices(self.shape[0]))
        )
        if self._multipage:
            with tifffile.TiffFile(self._files[0]) as tif:
                pages = [tif.series[0].pages[i].asarray()[yx] for i in indices]
        else:
            pages = [self._section(i)[yx] for i in indices]
        stack = np.stack(pages) if pages else np.empty((0, *self.shape[1:]), self.dtype)[(..., *yx)]
        return stack[0] if isinstance(z, int | np.integer) else stack

    def __setitem__(self, key: tuple, value: Any) -> None:
        raise PermissionError("TIFF volumes are read-only")

    def _section(self, index: int) -> np.ndarray:
        import tifffile

        page = tifffile.imread(self._files[index])
        if page.shape != self.shape[1:] or page.dtype != self.dtype:
            raise InvalidInputError(
                f"{self._files[index]}: section is {page.shape} {page.dtype}, expected "
                f"{self.shape[1:]} {self.dtype} like {self._files[0].name}"
            )
        return page


def _open_tiff(spec: str, loc: _Location, mode: str) -> Volume:
    if mode != "r":
        raise InvalidInputError(f"{spec}: TIFF is read-only; convert it to zarr to write")
    path = Path(loc.container)
    if loc.kind == "tiff" and not path.is_file():
        raise InputNotFoundError(f"{loc.container}: no such file")
    files = [path] if loc.kind == "tiff" else _tiff_files(path)
    array = _TiffSections(files, multipage=loc.kind == "tiff")
    return Volume(
        spec,
        array,
        fmt="tiff",
        mode=mode,
        voxel_size=None,
        offset=(0.0, 0.0, 0.0),
        chunks=(1, *array.shape[1:]),
        attrs={},
    )


# --- public API -------------------------------------------------------------------------------

_OPENERS = {
    "hdf5": _open_hdf5,
    "zarr": _open_zarr,
    "n5": _open_n5,
    "tiff": _open_tiff,
    "tiffdir": _open_tiff,
}


def open_volume(spec: str, mode: str = "r", voxel_size: Iterable[float] | None = None) -> Volume:
    """Open a volume for reading (``"r"``) or for writing into it (``"r+"``).

    ``voxel_size`` (nm, z,y,x) replaces whatever the metadata says; TIFF needs it.
    """
    if mode not in ("r", "r+"):
        raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
    loc = _parse_spec(spec)
    if mode != "r":
        refuse_read_only(spec)
    vol = _OPENERS[loc.kind](spec, loc, mode)
    vol.storage_options = url_options(loc.container)
    meta = vol.attrs.get("ssn_deploy") if hasattr(vol.attrs, "get") else None
    if mode == "r" and isinstance(meta, Mapping) and meta.get("complete") is False:
        raise CorruptDataError(
            f"{spec} is incomplete: the ssn-deploy {meta.get('command', 'run')} that wrote it "
            "was interrupted; run it again with --overwrite"
        )
    if voxel_size is not None:
        override: Triple = _nm(voxel_size)  # type: ignore[assignment]
        if vol.voxel_size is not None and vol.voxel_size != override:
            log.warning(
                "%s: using voxel size %s instead of stored %s", spec, override, vol.voxel_size
            )
        vol.voxel_size = vol._voxel_size_override = override
    return vol


def choose_chunks(
    shape: Iterable[int],
    voxel_size: Iterable[float] | None,
    dtype: Any,
    target_bytes: int = 2**21,
) -> tuple[int, ...]:
    """Chunks of about ``target_bytes`` spanning about the same nm along each spatial axis.

    Equal physical extent keeps blocks useful for 3D context whatever the anisotropy (ssTEM
    gets few z-sections and wide y/x). Spatial sizes are powers of two clipped to the array
    (the budget freed by clipping goes to the other axes); leading (channel) axes are whole.
    """
    shape = tuple(max(1, int(s)) for s in shape)
    k = min(3, len(shape))
    lead, spatial = shape[: len(shape) - k], shape[len(shape) - k :]
    sizes = np.asarray(voxel_size if voxel_size is not None else (1.0,) * 3, float)[-k:]
    voxels = max(1.0, target_bytes / (np.dtype(dtype).itemsize * math.prod(lead)))
    chunks = [0] * k
    free = list(range(k))
    while free:
        extent = (voxels * np.prod(sizes[free])) ** (1 / len(free))
        clipped = [i for i in free if extent / sizes[i] >= spatial[i]]
        for i in clipped:
            chunks[i] = spatial[i]
            voxels /= spatial[i]
        if not clipped:
            for i in free:
                chunks[i] = min(spatial[i], 2 ** round(math.log2(max(1.0, extent / sizes[i]))))
        free = [i for i in free if not chunks[i]]
    return (*lead, *(max(1, c) for c in chunks))


def _ome_metadata(ndim: int, voxel_size: Triple, offset: Triple, name: str) -> dict:
    from ssn_deploy import ome

    return {"ome": ome.image(ome.multiscale(ndim, voxel_size, offset, name=name))}


INNER_CHUNK = 64
"""Inner chunks of sharded volumes: small enough that a viewer fetches little per screen."""


def _inner(shard: int, target: int) -> int:
    """The largest divisor of ``shard`` up to ``target``; the whole shard when that is tiny."""
    if shard <= target:
        return shard
    best = max(d for d in range(1, target + 1) if shard % d == 0)
    return best if best >= target // 4 else shard


def shard_layout(
    shards: Iterable[int], shape: Iterable[int], inner: int = INNER_CHUNK
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shards and inner chunks for an array written one shard per task.

    Shards are the given ones (a block grid from the origin, so each task writes whole shards
    and no two tasks read-modify-write one), clipped to the array. Spatial (last three) inner
    chunks are at most ``inner`` voxels and divide the shard; leading (channel) ones are 1.
    An axis that holds a single shard may round it up to a multiple of ``inner`` instead,
    since no other task writes there.
    """
    shape = tuple(int(n) for n in shape)
    shards = tuple(min(int(s), n) for s, n in zip(shards, shape, strict=True))
    lead = len(shape) - 3
    out_shards, chunks = list(shards[:lead]), [1] * lead
    for s, n in zip(shards[lead:], shape[lead:], strict=True):
        c = _inner(s, inner)
        if s == n and c == s and s > inner:  # one shard along the axis: pad it
            s, c = -(-n // inner) * inner, inner
        out_shards.append(s)
        chunks.append(c)
    return tuple(out_shards), tuple(chunks)


def _compressors(compressor: str | None, dtype: np.dtype) -> list:
    from zarr.codecs import BloscCodec

    if compressor is None:
        return []
    if compressor != "zstd":
        raise ValueError(f"compressor must be 'zstd' or None, got {compressor!r}")
    shuffle = "bitshuffle" if dtype.itemsize == 1 else "shuffle"
    # uint8 (raw, affinities): level 1 compresses as well as 5 (1.8x) and encodes 5x faster
    # (288 vs 54 MB/s a core: level 5 would cap a GPU run at ~15 MVox/s of affinities per
    # core); labels: level 3, 2.3x faster than 5 at ratios of 60-90 (benchmarks/postprocess.py)
    level = 1 if dtype.itemsize == 1 else 3
    return [BloscCodec(cname="zstd", clevel=level, shuffle=shuffle)]


def _output_location(spec: str, write: bool = True) -> _Location:
    """Outputs are zarr: a ``.zarr`` path (optionally ``:NODE``) or a URL (not http(s)://,
    unless only read: ``write=False``)."""
    if _is_url(spec) or re.search(r"\.zarr(?:[:/]|$)", spec, flags=re.IGNORECASE):
        if write:
            refuse_read_only(spec)
        loc = _parse_spec(spec)
        if loc.kind == "zarr":
            return loc
    raise InvalidInputError(f"{spec}: volumes are written as zarr; name the output PATH.zarr")


def _prepare_output(loc: _Location, spec: str, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; never delete what is not zarr."""
    if _is_url(loc.container):
        try:
            _open_zarr_node(loc.container, loc.inner, "r")
        except FileNotFoundError:
            return
        if not overwrite:
            raise OutputExistsError(f"{spec} already exists; pass --overwrite to replace it")
        return
    path = Path(loc.container, loc.inner)
    if not path.exists():
        return
    if not overwrite:
        raise OutputExistsError(f"{spec} already exists; pass --overwrite to replace it")
    is_zarr = any((path / m).exists() for m in _ZARR_MARKERS)
    if not is_zarr and (path.is_file() or any(path.iterdir())):
        raise OutputExistsError(f"{spec} exists and is not zarr; refusing to delete it")
    shutil.rmtree(path)


def create_volume(
    spec: str,
    shape: Iterable[int],
    dtype: Any,
    *,
    chunks: Iterable[int] | None = None,
    voxel_size: Iterable[float],
    offset: Iterable[float] = (0, 0, 0),
    overwrite: bool = False,
    attrs: Mapping[str, Any] | None = None,
    ome: bool = True,
    compressor: str | None = "zstd",
    fill_value: Any = 0,
    shards: Iterable[int] | None = None,
) -> Volume:
    """Create a zarr v3 volume (3D z,y,x or 4D c,z,y,x) and return it open for writing.

    ``ome=True`` writes an OME-Zarr group (array ``"0"`` plus NGFF 0.5 multiscales metadata and
    ``attrs``) that viewers understand; ``ome=False`` a plain array with ``voxel_size``,
    ``offset`` and ``axes`` attributes. ``shards`` (the blocks one task writes whole) makes a
    sharded array whose inner chunks come from :func:`shard_layout` unless ``chunks`` is given;
    its :attr:`Volume.chunks` are then the shards.
    """
    import zarr

    loc = _output_location(spec)
    shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
    if len(shape) not in (3, 4):
        raise InvalidInputError(f"{spec}: expected a 3D or 4D shape, got {shape}")
    if voxel_size is None:
        raise VoxelSizeError(f"{spec}: a voxel size (nm, z,y,x) is needed to create a volume")
    voxel_size, offset = _nm(voxel_size), _nm(offset)
    if shards is not None:
        shards, inner = shard_layout(shards, shape)
        chunks = tuple(chunks) if chunks is not None else inner
    chunks = tuple(chunks) if chunks is not None else choose_chunks(shape, voxel_size, dtype)
    _prepare_output(loc, spec, overwrite)
    axes = ["c", "z", "y", "x"][-len(shape) :]
    array_args = dict(
        shape=shape,
        dtype=dtype,
        chunks=chunks,
        shards=shards,
        fill_value=fill_value,
        compressors=_compressors(compressor, dtype),
        dimension_names=axes,
    )
    user = dict(attrs or {})
    if ome:
        meta = _ome_metadata(len(shape), voxel_size, offset, Path(loc.inner or loc.container).stem)
        group = zarr.create_group(
            loc.container,
            path=loc.inner or None,
            overwrite=overwrite,
            attributes={**user, **meta},
            storage_options=url_options(loc.container),
        )
        group.create_array("0", **array_args)
    else:
        meta = {"voxel_size": list(voxel_size), "offset": list(offset), "axes": axes}
        zarr.create_array(
            loc.container,
            name=loc.inner or None,
            overwrite=overwrite,
            attributes={**user, **meta},
            storage_options=url_options(loc.container),
            **array_args,
        )
    return open_volume(spec, "r+")


def open_group(spec: str, mode: str = "r") -> Any:
    """The zarr group ``spec`` names (``OUT.zarr``, ``OUT.zarr/labels``), for metadata that
    belongs to a group rather than a volume; :class:`InputNotFoundError` if there is none."""
    import zarr

    loc = _output_location(spec, write=mode != "r")
    try:
        return zarr.open_group(
            _zarr_store(loc.container),
            path=loc.inner or None,
            mode=mode,
            storage_options=url_options(loc.container),
        )
    except FileNotFoundError as exc:
        raise InputNotFoundError(f"{spec}: no such zarr group") from exc


def _copy_block_shape(
    shape: tuple[int, ...], chunks: tuple[int, ...], itemsize: int, budget: int
) -> tuple[int, ...]:
    """Whole chunks grown from the last axis up to ``budget`` bytes: each destination chunk is
    written exactly once, and memory stays bounded whatever the volume size."""
    block = [min(c, s) for c, s in zip(chunks, shape, strict=True)]
    for axis in reversed(range(len(shape))):
        rest = itemsize * math.prod(block) // block[axis]
        fit = max(1, budget // (rest * chunks[axis]))
        block[axis] = min(shape[axis], fit * chunks[axis])
        if block[axis] < shape[axis]:
            break
    return tuple(block)


def _tile(shape: tuple[int, ...], block: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    """Blocks of ``block`` voxels tiling ``shape`` in C order (the last ones clipped)."""
    starts = [range(0, s, b) for s, b in zip(shape, block, strict=True)]
    for begin in itertools.product(*starts):
        yield tuple(slice(b, min(b + n, s)) for b, n, s in zip(begin, block, shape, strict=True))


def _same_or_nested(a: _Location, b: _Location) -> bool:
    """True if two locations may overlap on disk (overwriting one would destroy the other)."""
    if _is_url(a.container) or _is_url(b.container):
        return (a.container, a.inner) == (b.container, b.inner)
    pa = os.path.realpath(os.path.join(a.container, a.inner))
    pb = os.path.realpath(os.path.join(b.container, b.inner))
    return pa == pb or pa.startswith(pb + os.sep) or pb.startswith(pa + os.sep)


def overlaps(existing: str, output: str) -> bool:
    """True if writing (or ``--overwrite`` deleting) ``output`` could touch ``existing``."""
    return _same_or_nested(_parse_spec(existing), _output_location(output))


def resolved_spec(spec: str) -> str:
    """``spec`` with its local container made absolute and symlink-free (URLs unchanged), so
    that one volume spelled two ways (relative, absolute, via a link) compares equal."""
    loc = _parse_spec(spec)
    if _is_url(loc.container):
        return spec
    container = os.path.realpath(loc.container)
    return f"{container}:{loc.inner}" if loc.inner else container


def _file_location(spec: str | os.PathLike) -> _Location:
    """Any path or volume spec as a location (a volume's container and node, else the path)."""
    text = str(spec).removeprefix("file://")
    try:
        return _parse_spec(text)
    except SsnDeployError:  # not a volume (a run directory, a JSON file, ...)
        return _Location("file", text, "")


def refuse_overlap(output: str | os.PathLike, reads: Iterable[str | os.PathLike | None],
                   what: str = "output") -> None:  # fmt: skip
    """Writing (or ``--overwrite`` deleting) ``output`` must never touch what the command
    reads: a one-line error naming the input, before anything is written."""
    out = _file_location(output)
    for spec in reads:
        if spec is not None and _same_or_nested(_file_location(spec), out):
            raise InvalidInputError(
                f"{output} would overwrite {spec}, which this command reads; choose another {what}"
            )


def convert(
    src: str,
    dst: str,
    *,
    chunks: Iterable[int] | None = None,
    voxel_size: Iterable[float] | None = None,
    roi: Sequence[slice] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Volume:
    """Copy any readable volume (or the ``roi`` of a 3D one) into OME-Zarr, chunk by chunk.

    Voxel size and world offset are kept (a ``roi`` shifts the offset by its start). Memory
    stays O(:data:`COPY_BLOCK_BYTES`) whatever the volume size. The output records the source
    spec, the roi and the ssn-deploy version under ``attrs["ssn_deploy"]``.
    """
    from tqdm import tqdm

    from ssn_deploy import __version__

    with open_volume(src, voxel_size=voxel_size) as source:
        require_volume(source, ndim=(3, 4))
        if source.voxel_size is None:
            raise VoxelSizeError(f"{src} has no voxel size; pass --voxel-size Z,Y,X (nm)")
        if _same_or_nested(_parse_spec(src), _output_location(dst)):
            raise InvalidInputError(f"{dst} overlaps the input {src}; choose another output")
        region = _check_roi(src, source, roi)
        offset = tuple(
            o + b * v
            for o, b, v in zip(source.offset, region.begin[-3:], source.voxel_size, strict=True)
        )
        provenance: dict[str, Any] = {  # "complete" turns True only after the last block
            "ssn_deploy": {
                "source": src, "version": __version__, "command": "convert", "complete": False,
            }
        }  # fmt: skip
        if roi is not None:
            provenance["ssn_deploy"]["roi"] = {
                "offset": list(region.offset),
                "shape": list(region.shape),
            }
        check_writable(dst, replace=overwrite)
        check_free_space(dst, *stored_bytes(region.shape, source.dtype))
        dest = create_volume(
            dst,
            region.shape,
            source.dtype,
            chunks=None if chunks is None else _full_chunks(chunks, region.shape),
            voxel_size=source.voxel_size,
            offset=offset,
            overwrite=overwrite,
            attrs=provenance,
        )
        block = _copy_block_shape(dest.shape, dest.chunks, dest.dtype.itemsize, COPY_BLOCK_BYTES)
        total = math.prod(-(-s // b) for s, b in zip(dest.shape, block, strict=True))
        for box in tqdm(
            _tile(dest.shape, block),
            total=total,
            desc=f"convert {src}",
            unit="block",
            disable=not progress,
        ):
            dest[box] = source[
                tuple(
                    slice(b.start + o, b.stop + o) for b, o in zip(box, region.offset, strict=True)
                )
            ]
        dest.attrs["ssn_deploy"] = provenance["ssn_deploy"] | {"complete": True}
    return dest


def _check_roi(src: str, source: Volume, roi: Sequence[slice] | None) -> Box:
    """The region of ``source`` to copy: all of it, or the ``roi`` (z,y,x slices) of a 3D one."""
    whole = Box.from_shape(source.shape)
    if roi is None:
        return whole
    if source.ndim != 3 or len(roi) != 3 or any(s.step not in (None, 1) for s in roi):
        raise InvalidInputError(f"{src}: --roi needs a 3D volume and a z,y,x region")
    begin = [0 if s.start is None else s.start for s in roi]
    end = [n if s.stop is None else s.stop for s, n in zip(roi, source.shape, strict=True)]
    roi = Box.from_bounds(begin, [max(b, e) for b, e in zip(begin, end, strict=True)])
    if roi.empty or not whole.contains(roi):
        raise InvalidInputError(
            f"{src}: region {roi.begin}..{roi.end} is empty or outside the volume {source.shape}"
        )
    return roi


def _full_chunks(chunks: Iterable[int], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Spatial chunks (z,y,x) extended by whole channel axes; must be positive integers."""
    values = tuple(chunks)
    if any(int(c) != c or c < 1 for c in values) or len(values) not in (3, len(shape)):
        raise InvalidInputError(f"chunks {values} must be 3 positive integers (z,y,x)")
    return (*shape[: len(shape) - len(values)], *(int(c) for c in values))


def _reflect(indices: np.ndarray, length: int) -> np.ndarray:
    """Mirror indices into ``[0, length)`` like ``np.pad(mode="reflect")`` (edge not repeated)."""
    if length == 1:
        return np.zeros_like(indices)
    period = 2 * (length - 1)
    indices = np.mod(indices, period)
    return np.where(indices >= length, period - indices, indices)


def reflect_read(volume: Volume, box: Box) -> np.ndarray:
    """``volume[box]``, where parts of ``box`` outside the volume mirror the volume at its faces.

    The mirror is about the *volume's* faces, whatever part of it is read, so a patch that
    sticks out of the volume sees the same padding in every block.
    """
    shape = volume.shape[-3:]
    if Box.from_shape(shape).contains(box):
        return volume[box]
    indices = [
        _reflect(np.arange(b, e), n) for b, e, n in zip(box.begin, box.end, shape, strict=True)
    ]
    lo = [int(i.min()) for i in indices]
    hi = [int(i.max()) + 1 for i in indices]
    data = volume[Box.from_bounds(lo, hi)]
    return data[np.ix_(*(i - b for i, b in zip(indices, lo, strict=True)))]
