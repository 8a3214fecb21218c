"""OME-Zarr 0.5 metadata, built and validated by ``ome-zarr-models`` instead of hand-written dicts.

Each function returns the value of a group's ``"ome"`` attribute (plain JSON), so callers write
it with zarr and the schema lives in one well-kept library: a wrong axis order, an unsorted
scale or a non-integer label image fails here, at write time, not in a viewer. Transforms
follow the NGFF convention that coordinates name voxel *centres*: a level downsampled by ``f``
has scale ``f·voxel_size`` and is shifted by ``(f − 1)/2`` base voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

VERSION = "0.5"
SPACE_UNIT = "nanometer"


def _dump(model: Any) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def level_transform(
    voxel_size: Sequence[float], offset: Sequence[float], factor: Sequence[int]
) -> tuple[list[float], list[float]]:
    """Scale and translation (nm, z,y,x) of a level downsampled by ``factor`` per axis."""
    scale = [float(v) * f for v, f in zip(voxel_size, factor, strict=True)]
    shift = [
        float(o) + float(v) * (f - 1) / 2
        for o, v, f in zip(offset, voxel_size, factor, strict=True)
    ]
    return scale, shift


def multiscale(
    ndim: int,
    voxel_size: Sequence[float],
    offset: Sequence[float],
    factors: Sequence[Sequence[int]] = ((1, 1, 1),),
    *,
    paths: Sequence[str] | None = None,
    name: str | None = None,
    method: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Any:
    """One ``multiscales`` entry: axes (``c`` first for 4D arrays, then z,y,x in nm) and one
    dataset per level; ``factors`` are the cumulative downsampling of each level (the first
    is the full resolution), ``paths`` default to ``"0"``, ``"1"``, …"""
    from ome_zarr_models.v05.axes import Axis
    from ome_zarr_models.v05.multiscales import Dataset, Multiscale

    lead = ndim - 3
    axes = [Axis(name="c", type="channel")] * lead + [
        Axis(name=a, type="space", unit=SPACE_UNIT) for a in "zyx"
    ]
    paths = [str(i) for i in range(len(factors))] if paths is None else list(paths)
    datasets = []
    for path, factor in zip(paths, factors, strict=True):
        scale, shift = level_transform(voxel_size, offset, factor)
        datasets.append(
            Dataset.build(path=path, scale=[1.0] * lead + scale, translation=[0.0] * lead + shift)
        )
    return Multiscale(axes=axes, datasets=datasets, name=name, type=method, metadata=metadata)


def image(ms: Any) -> dict[str, Any]:
    """``"ome"`` of an image group with the multiscale ``ms``."""
    from ome_zarr_models.v05.image import ImageAttrs

    return _dump(ImageAttrs(multiscales=[ms], version=VERSION))


def label_image(ms: Any, source: str | None = "../../") -> dict[str, Any]:
    """``"ome"`` of a label image: ``ms`` plus ``image-label`` whose ``source`` is the relative
    path to the image it labels (None when there is none to point at)."""
    from ome_zarr_models.v05.image_label import ImageLabelAttrs
    from ome_zarr_models.v05.image_label_types import Label, Source

    label = Label(source=None if source is None else Source(image=source))
    return _dump(ImageLabelAttrs(multiscales=[ms], version=VERSION, **{"image-label": label}))


def labels(names: Sequence[str]) -> dict[str, Any]:
    """``"ome"`` of an image's ``labels`` group, listing its label images."""
    from ome_zarr_models.v05.labels import LabelsAttrs

    return _dump(LabelsAttrs(labels=list(names), version=VERSION))


def relocated(ms: Any, prefix: str) -> Any:
    """``ms`` with its dataset paths under ``prefix/``: a parent group showing a child's levels."""
    from ome_zarr_models.v05.multiscales import Multiscale

    data = _dump(ms)
    for dataset in data["datasets"]:
        dataset["path"] = f"{prefix}/{dataset['path']}"
    return Multiscale.model_validate(data)


def read_multiscale(attrs: dict[str, Any]) -> Any:
    """The first multiscale of a group's attributes, parsed (and so validated)."""
    from ome_zarr_models.v05.multiscales import Multiscale

    return Multiscale.model_validate(attrs["ome"]["multiscales"][0])
