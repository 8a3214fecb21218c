"""The layout of ``OUT.zarr`` (``infer``, ``segment``): an OME-Zarr 0.5 image with labels.

::

    OUT.zarr/                      image group: "ome" multiscales of the affinities (paths
    │                              affinities/0, affinities/1, …), "ssn_deploy" layout
    ├── affinities/                image group (c,z,y,x; mean pyramid), provenance, settings
    │   ├── 0, 1, …                scale levels: sharded, shards = the engine's blocks
    │   └── done                   finished-block markers (level 0), not part of the image
    └── labels/                    "ome": {"labels": ["segmentation", "fragments"]}
        ├── segmentation/          label image (z,y,x; mode pyramid), "image-label" with
        │   ├── 0, 1, …            source "../../" (the affinities image), provenance
        │   └── done
        ├── fragments/             label image, as segmentation
        │   ├── 0, 1, …
        │   └── done
        └── fragments_faces/       tile-face flags (uint8) that ``segment`` reads; not a label

Why this shape: OME-Zarr puts label images under the image's ``labels`` group and lists them
there, so napari, ome-zarr-py and neuroglancer show the segmentation as labels over the
affinities. The affinities stay at ``OUT.zarr/affinities`` (an image of their own, which the
root points into), so ``ssn-deploy segment OUT.zarr/affinities`` and every existing reader keep
working. Label images had to move under ``labels/``; :func:`ssn_deploy.volumes.open_volume`
resolves ``OUT.zarr/segmentation`` (and ``…/fragments``, ``…/segmentation/done``) to them when
nothing else is there, so ``ssn-deploy evaluate OUT.zarr/segmentation GT`` works as before and
outputs written before this layout read unchanged. ``OUT.zarr/labels/segmentation`` is the
canonical spec (what the commands print). Label images stay z,y,x under a c,z,y,x image: the
spec only recommends a matching (or size-1) channel axis, and 3D labels are what ``evaluate``,
``segment`` and every user script read.

Every stage, once its last block is written, gets its pyramid (:mod:`ssn_deploy.pyramid`)
and, for label images under ``labels/``, its ``image-label`` metadata and its entry in the
``labels`` list; the metadata is built by ``ome-zarr-models`` (:mod:`ssn_deploy.ome`). The
``source`` link is written only when ``OUT.zarr`` is an image (``infer``, or ``segment`` into
an infer output); ``segment AFFS -o NEW.zarr`` writes labels without an image to point at.
Block markers and ``ssn-deploy verify`` cover level 0; the coarser levels are recomputed from
it whenever a stage runs (``--resume`` included), so they never outlive a repaired block.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

from ssn_deploy import ome
from ssn_deploy.errors import InputNotFoundError
from ssn_deploy.pyramid import write_pyramid
from ssn_deploy.volumes import LABELS_GROUP, Volume, open_group

IMAGE = "affinities"
LABELS = ("segmentation", "fragments")
"""Label images in the order the ``labels`` list names them (viewers show the first)."""


def stage_specs(out: str) -> dict[str, str]:
    """Where each stage of ``OUT.zarr`` lives (see the module docstring)."""
    out = out.rstrip("/")
    return {IMAGE: f"{out}/{IMAGE}", **{name: f"{out}/{LABELS_GROUP}/{name}" for name in LABELS}}


def finish_stage(volume: Volume, client: Any, *, label: bool, progress: bool = False) -> None:
    """After a stage's last block: its pyramid (mode for labels, mean for images), then, for a
    label image in a ``labels`` group, its ``image-label`` metadata and listing."""
    write_pyramid(volume, client, method="mode" if label else "mean", progress=progress)
    if label:
        _register_label(volume)


def _split(spec: str) -> tuple[str, str]:
    """``a.zarr/labels/seg`` (or ``a.zarr:labels/seg``) → (``a.zarr/labels``, ``seg``)."""
    spec = re.sub(r"(\.zarr):", r"\1/", spec.rstrip("/"), flags=re.IGNORECASE)
    head, _, name = spec.rpartition("/")
    return head, name


def _is_image(spec: str) -> bool:
    try:
        attrs = open_group(spec).attrs.asdict()
    except InputNotFoundError:
        return False
    return bool(attrs.get("ome", {}).get("multiscales"))


def _register_label(volume: Volume) -> None:
    parent, name = _split(volume.spec)
    if posixpath.basename(parent) != LABELS_GROUP:
        return  # a standalone label volume: nothing lists it
    root, _ = _split(parent)
    source = "../../" if _is_image(root) else None
    multiscale = ome.read_multiscale(volume.attrs.asdict())
    volume.attrs["ome"] = ome.label_image(multiscale, source)
    group = open_group(parent, "r+")
    listed = group.attrs.asdict().get("ome", {}).get("labels", [])
    names = sorted({*listed, name}, key=lambda n: (LABELS.index(n) if n in LABELS else 99, n))
    group.attrs["ome"] = ome.labels(names)


def describe_root(out: str) -> None:
    """Make ``OUT.zarr`` itself the affinities image (its levels, under ``affinities/``), so a
    viewer opening ``OUT.zarr`` finds the image and its ``labels``."""
    from ssn_deploy import __version__

    specs = stage_specs(out)
    multiscale = ome.read_multiscale(open_group(specs[IMAGE]).attrs.asdict())
    group = open_group(out, "r+")
    group.attrs.update(
        {
            "ome": ome.image(ome.relocated(multiscale, IMAGE)),
            "ssn_deploy": {
                "version": __version__,
                "layout": {k: v.removeprefix(out.rstrip("/") + "/") for k, v in specs.items()},
            },
        }
    )
