"""``ssn-deploy view``: an infer output in neuroglancer, served from this machine.

The ``neuroglancer`` package runs the viewer's web server in this process and serves the
volumes from memory-mapped reads on demand (``LocalVolume`` reads only the chunks on screen),
so nothing is copied or converted. It binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

from ssn_deploy.errors import ConfigError, InputNotFoundError
from ssn_deploy.volumes import Volume, open_volume

log = logging.getLogger(__name__)

LAYERS = ("affinities", "segmentation", "fragments")


def _neuroglancer() -> Any:
    try:
        import neuroglancer
    except ImportError:
        raise ConfigError(
            "ssn-deploy view needs neuroglancer: pip install 'ssn-deploy[view]'"
        ) from None
    return neuroglancer


def _source(ng: Any, volume: Volume, dims: Any) -> Any:
    """The volume itself, sliced on demand: only the chunks on screen are read."""
    if volume.ndim == 4:  # affinities: channels first
        channels = ng.CoordinateSpace(names=["c^", *dims.names], units=["", *dims.units],
                                      scales=[1, *dims.scales])  # fmt: skip
        return ng.LocalVolume(data=volume, dimensions=channels)
    return ng.LocalVolume(data=volume, dimensions=dims)


def _recorded_raw(found: dict[str, Volume]) -> Volume | None:
    """The raw volume the affinities were predicted from, if it is still where it was."""
    source = found["affinities"].attrs.get("ssn_deploy", {}).get("source") if (
        "affinities" in found) else None  # fmt: skip
    if source is None:
        return None
    try:
        return open_volume(source)
    except InputNotFoundError:
        log.warning("raw volume %s (recorded by infer) not found: pass RAW to show it", source)
        return None


AFFINITY_SHADER = """#uicontrol invlerp normalized
void main() {
  emitRGB(vec3(toNormalized(getDataValue(0)), toNormalized(getDataValue(1)),
               toNormalized(getDataValue(2))));
}
"""


def open_viewer(output: str, raw: str | None = None, *, bind: str = "127.0.0.1",
                port: int = 0) -> Any:  # fmt: skip
    """A neuroglancer viewer of ``output`` (OUT.zarr) with raw (``raw``, else the volume the
    affinities record as their source), affinities, segmentation and fragments (hidden)."""
    ng = _neuroglancer()
    ng.set_server_bind_address(bind, port)
    found = {}
    for name in LAYERS:
        try:
            found[name] = open_volume(f"{output.rstrip('/')}/{name}")
        except InputNotFoundError:
            continue
    if not found:
        raise InputNotFoundError(f"{output}: no affinities, segmentation or fragments to view")
    first = next(iter(found.values()))
    raw_volume = open_volume(raw) if raw is not None else _recorded_raw(found)
    voxel = [float(v) for v in (first.voxel_size or (1.0, 1.0, 1.0))]
    dims = ng.CoordinateSpace(names=["z", "y", "x"], units="nm", scales=voxel)
    viewer = ng.Viewer()
    with viewer.txn() as state:
        state.dimensions = dims
        # neuroglancer's main (xy) panel shows the first two display dimensions: make them x, y
        # (the sections), not z, y as the volume's axis order would.
        state.display_dimensions = ["x", "y", "z"]
        if raw_volume is not None:
            state.layers["raw"] = ng.ImageLayer(source=_source(ng, raw_volume, dims))
        if "affinities" in found:
            layer = ng.ImageLayer(
                source=_source(ng, found["affinities"], dims), shader=AFFINITY_SHADER
            )
            state.layers.append(name="affinities", layer=layer, visible=raw_volume is None)
        for name in ("segmentation", "fragments"):
            if name in found:
                layer = ng.SegmentationLayer(source=_source(ng, found[name], dims))
                state.layers.append(name=name, layer=layer, visible=name == "segmentation")
    return viewer
