"""``ssn-deploy verify OUT.zarr``: find output chunks damaged after their block was finished.

Every finished block's mark is the checksum of what it wrote (:mod:`.inference.done`); this
reads each stage back (affinities, fragments with their face flags, segmentation), compares,
and unmarks the blocks that no longer match, so ``ssn-deploy infer … --resume`` (or
``segment --resume``) recomputes exactly those.
"""

from __future__ import annotations

from pathlib import Path

from ssn_deploy.agglomeration.blockwise import faces_spec
from ssn_deploy.errors import InputNotFoundError
from ssn_deploy.geometry import BlockGrid, Box
from ssn_deploy.inference.done import BlockMarkers, markers_spec
from ssn_deploy.outputs import stage_specs
from ssn_deploy.volumes import open_volume

STAGES = ("affinities", "fragments", "segmentation")


def _stage_spec(out: str, stage: str) -> str:
    """The stage's array in ``out``: the OME-Zarr layout, else the one before it (no labels/)."""
    spec = stage_specs(out)[stage]
    return spec if Path(markers_spec(spec)).exists() else f"{out}/{stage}"


def verify_output(out: str, repair: bool = True) -> dict[str, dict[str, int | list[int]]]:
    """Per stage found in ``out``: blocks, finished blocks, and the ids of damaged blocks
    (unmarked unless ``repair`` is False)."""
    report: dict[str, dict[str, int | list[int]]] = {}
    for stage in STAGES:
        spec = _stage_spec(out.rstrip("/"), stage)
        if not Path(markers_spec(spec)).exists():
            continue
        markers = BlockMarkers(open_volume(markers_spec(spec), "r+" if repair else "r"))
        arrays = [open_volume(spec)]
        if stage == "fragments":
            arrays.append(open_volume(faces_spec(spec)))
        block_shape = markers.volume.attrs.get("block_shape")
        grid = BlockGrid(Box.from_shape(arrays[0].shape[-3:]), block_shape, 0)
        damaged = markers.verify(grid, arrays, repair=repair)
        report[stage] = {
            "blocks": len(grid),
            "finished": int(markers.finished().sum()) + (len(damaged) if repair else 0),
            "checked": markers.has_checksums,
            "damaged": [b.block_id for b in damaged],
        }
    if not report:
        raise InputNotFoundError(f"{out} holds no ssn-deploy stage with block markers")
    return report
