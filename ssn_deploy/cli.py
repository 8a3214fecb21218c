"""The ``ssn-deploy`` command line: parse, validate, call one library function, report.

Library imports happen inside each command so that ``--help`` stays fast.
"""

from __future__ import annotations

import logging
import sys

import click

from ssn_deploy import __version__
from ssn_deploy.errors import SsnDeployError

log = logging.getLogger("ssn_deploy")


class _Group(click.Group):
    """A click group that turns :class:`SsnDeployError` into one line on stderr and exit 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SsnDeployError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


def parse_triple(value: str | None, name: str) -> tuple[float, float, float] | None:
    """Parse ``"Z,Y,X"`` into three floats (voxel sizes, offsets, shapes)."""
    if value is None:
        return None
    parts = value.replace("x", ",").split(",")
    try:
        numbers = tuple(float(p) for p in parts)
    except ValueError:
        raise click.BadParameter(f"expected three numbers Z,Y,X, got {value!r}", param_hint=name)
    if len(numbers) != 3:
        raise click.BadParameter(f"expected three numbers Z,Y,X, got {value!r}", param_hint=name)
    return numbers  # type: ignore[return-value]


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ssn-deploy")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Neuron segmentation of EM volumes: select, train, export, infer, serve, evaluate.

    Volumes are named as PATH for zarr/OME-Zarr/TIFF, or FILE:DATASET for HDF5 and N5
    (e.g. ``sample.hdf:volumes/raw``). Axes are z,y,x; voxel sizes are in nm.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --- convert (owner: volumes) -------------------------------------------------------------------

# --- evaluate (owner: metrics) ------------------------------------------------------------------

# --- train (owner: training) --------------------------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    main()
