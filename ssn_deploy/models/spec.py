"""What an engine must know about a model besides its weights: :class:`ModelSpec`.

Checkpoints and ONNX files both carry it, so inference, export and serving configure themselves
from the model file alone. ONNX models carry it in ``metadata_props`` under these keys (values
are JSON; written by :mod:`ssn_deploy.export`, read by the onnxruntime backend):

``ssn_deploy.offsets``        ``[[dz, dy, dx], ...]``, one per output channel
``ssn_deploy.context``        ``[z, y, x]`` voxels each side an output voxel depends on
``ssn_deploy.granularity``    ``[z, y, x]`` input sizes must be multiples of these
``ssn_deploy.normalization``  ``{"kind", "mean", "std"}`` (see ``models.Normalization``)
``ssn_deploy.voxel_size``     ``[z, y, x]`` nm of the training data, or ``null``
``ssn_deploy.threshold``      agglomeration threshold chosen on validation data, or ``null``
                              (optional: older files without it mean ``null``)

Informational keys written by the exporter (not needed to run the model): ``ssn_deploy.precision``
(``"fp32"`` or ``"fp16"``, see :mod:`ssn_deploy.export.graph_passes`), ``ssn_deploy.simplified``,
``ssn_deploy.version``, ``ssn_deploy.model`` and ``ssn_deploy.iteration``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ssn_deploy.affinities import validate_offsets
from ssn_deploy.errors import InvalidInputError
from ssn_deploy.models.normalization import Normalization

if TYPE_CHECKING:
    from ssn_deploy.models.checkpoint import Checkpoint

Triple = tuple[int, int, int]

METADATA_PREFIX = "ssn_deploy."
METADATA_KEYS = ("offsets", "context", "granularity", "normalization", "voxel_size")


def _triple(values: Sequence[Any], what: str) -> Triple:
    items = tuple(int(v) for v in values)
    if len(items) != 3 or any(v < 0 for v in items):
        raise InvalidInputError(f"{what}: expected three non-negative integers z,y,x, got {values}")
    return items  # type: ignore[return-value]


@dataclass(frozen=True)
class ModelSpec:
    """What the engine must know about a model besides its weights."""

    offsets: tuple[Triple, ...]
    granularity: Triple
    context: Triple
    normalization: Normalization
    voxel_size: tuple[float, float, float] | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        try:
            offsets = validate_offsets(self.offsets)
        except ValueError as exc:
            raise InvalidInputError(f"model offsets: {exc}") from None
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "granularity", _triple(self.granularity, "granularity"))
        object.__setattr__(self, "context", _triple(self.context, "context"))
        if min(self.granularity) < 1:
            raise InvalidInputError(f"granularity must be positive, got {self.granularity}")
        if self.voxel_size is not None:
            object.__setattr__(self, "voxel_size", tuple(float(v) for v in self.voxel_size))

    @property
    def num_channels(self) -> int:
        return len(self.offsets)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> ModelSpec:
        config = checkpoint.config
        return cls(
            offsets=config.offsets,
            granularity=config.granularity,
            context=config.context,
            normalization=checkpoint.normalization,
            voxel_size=checkpoint.voxel_size,
            threshold=checkpoint.extra.get("best", {}).get("threshold"),
        )

    def to_metadata(self) -> dict[str, str]:
        """The ONNX ``metadata_props`` entries (see the module docstring)."""
        values = {
            "offsets": [list(o) for o in self.offsets],
            "context": list(self.context),
            "granularity": list(self.granularity),
            "normalization": self.normalization.to_dict(),
            "voxel_size": None if self.voxel_size is None else list(self.voxel_size),
            "threshold": self.threshold,
        }
        return {METADATA_PREFIX + k: json.dumps(v) for k, v in values.items()}

    @classmethod
    def from_metadata(cls, props: Mapping[str, str], source: str) -> ModelSpec:
        """Parse ``metadata_props``; ``source`` names the model in error messages."""
        missing = [METADATA_PREFIX + k for k in METADATA_KEYS if METADATA_PREFIX + k not in props]
        if missing:
            raise InvalidInputError(
                f"{source}: ONNX metadata lacks {', '.join(missing)}; export the model with "
                "ssn-deploy export, or pass its ModelSpec explicitly"
            )
        try:
            values = {k: json.loads(props[METADATA_PREFIX + k]) for k in METADATA_KEYS}
            values["threshold"] = json.loads(props.get(METADATA_PREFIX + "threshold", "null"))
            values["normalization"] = Normalization.from_dict(values["normalization"])
            return cls(**values)
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(f"{source}: invalid ssn_deploy metadata ({exc})") from None
