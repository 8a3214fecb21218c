"""Change which affinity offsets a trained model predicts, keeping all but its head's rows.

Long-range affinities as auxiliary outputs (issue 16) need both directions: add offsets to a
trained model before training on (a new offset's head row starts as the row of the model's
nearest offset along the same axis, so it begins as that short-range affinity rather than
noise), and drop them again to ship or to score only the nearest neighbours (rows copied, so
the kept channels equal the trained model's to rounding: same weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ssn_deploy.affinities import DEFAULT_OFFSETS as NEAREST
from ssn_deploy.affinities import Offset, validate_offsets
from ssn_deploy.errors import ConfigError
from ssn_deploy.models.unet import UNet3d

__all__ = ["NEAREST", "source_row", "with_offsets"]


def _axis(offset: Offset) -> int:
    nonzero = [i for i, v in enumerate(offset) if v]
    if len(nonzero) != 1:
        raise ConfigError(f"offset {offset}: only an axis-aligned offset can borrow a head row")
    return nonzero[0]


def source_row(offset: Offset, old: Sequence[Offset]) -> int:
    """The head row ``offset`` starts from: its own, else the nearest one along its axis."""
    old = list(old)
    if offset in old:
        return old.index(offset)
    same_axis = [i for i, o in enumerate(old) if _axis(o) == _axis(offset)]
    if not same_axis:
        raise ConfigError(f"offset {offset}: the model has no offset along that axis")
    return min(same_axis, key=lambda i: abs(sum(old[i])))


def with_offsets(model: UNet3d, offsets: Sequence[Sequence[int]]) -> tuple[UNet3d, list[int]]:
    """A copy of ``model`` predicting ``offsets``, and the old head row each output came from."""
    new = validate_offsets(offsets)
    old = tuple(tuple(o) for o in model.config.offsets)
    rows = [source_row(o, old) for o in new]
    result = UNet3d(replace(model.config, offsets=new))
    state = dict(model.state_dict())
    state["head.weight"] = state["head.weight"][rows].clone()
    state["head.bias"] = state["head.bias"][rows].clone()
    result.load_state_dict(state)
    return result.train(model.training), rows
