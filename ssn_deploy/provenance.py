"""What every output array records about the run that wrote it, beside its stage's settings.

A file found months later says which package version wrote it, when (UTC, ISO 8601), by
which command line, and from which model (its path and SHA-256, so a retrained checkpoint
saved under the same name is told apart). These keys describe a run, not its results, so a
resumed run does not compare them (:data:`RUN_KEYS`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

RUN_KEYS = ("version", "created", "argv")
"""Keys that differ between a run and its resumption without changing what it computes."""


def run_provenance() -> dict[str, Any]:
    """Package version, the time now (UTC, seconds) and the command line (``sys.argv``)."""
    from ssn_deploy import __version__

    return {
        "version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": [str(a) for a in sys.argv],
    }


def model_provenance(affinities_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The model (path or name) and its SHA-256 that produced affinities, from their
    ``ssn_deploy`` attributes; None for affinities written elsewhere (or from an array)."""
    meta = affinities_attrs.get("ssn_deploy", {}) or {}
    settings = meta.get("settings", {}) or {}
    return {
        "model": meta.get("model", settings.get("model")),
        "model_sha256": meta.get("model_sha256", settings.get("model_sha256")),
    }
