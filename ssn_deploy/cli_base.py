"""The click base classes of every command: one-line errors, and -v/-q anywhere."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from ssn_deploy.errors import SsnDeployError, StorageError


def drop_pending_writes() -> None:
    """After a failed write (a full disk), zarr's other writes of that call are still queued in
    its event loop; exiting drops them and asyncio would log each one as an error."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _verbosity_options() -> list[click.Option]:
    return [
        click.Option(["-v", "--verbose"], count=True,
                     help="More log output (-v info, -vv debug, dask included)."),
        click.Option(["-q", "--quiet"], is_flag=True,
                     help="Errors and results only: no progress bars, no warnings."),
    ]  # fmt: skip


def verbosity(ctx: click.Context) -> tuple[int, bool]:
    """-v count and --quiet, given before or after any (sub)command name."""
    verbose, quiet = 0, False
    while ctx is not None:
        verbose += ctx.params.get("verbose") or 0
        quiet = quiet or bool(ctx.params.get("quiet"))
        ctx = ctx.parent
    return verbose, quiet


def configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else logging.WARNING - 10 * min(verbose, 2)
    logging.getLogger().setLevel(level)


def quiet_dask(ctx: click.Context) -> None:
    """dask logs INFO on its own; keep it quiet unless the user asked for -vv (called by the
    commands that run dask, so that the others start without importing it)."""
    verbose, _ = ctx.meta.get("ssn_deploy.verbosity", (0, False))
    if verbose < 2:
        import distributed  # noqa: F401  (it sets its own log levels on import)

        for name in ("distributed", "dask"):
            logging.getLogger(name).setLevel(logging.ERROR)


class Command(click.Command):
    """Every command takes ``-v``/``-q`` after its name as well as before it (``ssn-deploy
    infer -v …`` = ``ssn-deploy -v infer …``); ``-q`` also hides progress bars."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        names = {p.name for p in self.params}
        self.params += [o for o in _verbosity_options() if o.name not in names]

    def invoke(self, ctx: click.Context) -> Any:
        verbose, quiet = verbosity(ctx)
        ctx.params.pop("verbose", None)
        ctx.params.pop("quiet", None)
        ctx.meta["ssn_deploy.verbosity"] = (verbose, quiet)
        if quiet and "no_progress" in ctx.params:
            ctx.params["no_progress"] = True
        configure_logging(verbose, quiet)
        return super().invoke(ctx)


class Group(click.Group):
    """A click group that turns :class:`SsnDeployError`, a command's usage errors (a bad
    option value, a missing argument) and storage errors (a full disk, a read-only directory)
    into one line on stderr and exit 1."""

    def invoke(self, ctx: click.Context):
        from ssn_deploy.storage import write_error

        try:
            return super().invoke(ctx)
        except SsnDeployError as exc:
            click.echo(f"error: {exc}", err=True)
            if isinstance(exc, StorageError):
                drop_pending_writes()
            sys.exit(1)
        except OSError as exc:
            message = write_error(exc)
            if message is None and isinstance(exc, FileNotFoundError | PermissionError):
                message = str(exc) or type(exc).__name__  # e.g. a bucket that does not exist
            if message is None:
                raise
            click.echo(f"error: {message}", err=True)
            drop_pending_writes()
            sys.exit(1)
        except click.UsageError as exc:
            hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(1)
        except Exception as exc:
            if not type(exc).__module__.startswith(REMOTE_ERROR_MODULES):
                raise
            click.echo(f"error: remote storage: {exc} ({REMOTE_CREDENTIALS})", err=True)
            sys.exit(1)


REMOTE_ERROR_MODULES = ("botocore", "aiobotocore", "google.auth", "gcsfs")
"""Errors of the object-store clients (no credentials, access denied) are the user's to fix."""
REMOTE_CREDENTIALS = (
    "credentials come from the client's environment: AWS_PROFILE or AWS_ACCESS_KEY_ID/"
    "AWS_SECRET_ACCESS_KEY for s3://, FSSPEC_S3_ENDPOINT_URL for an S3-compatible server, "
    "GOOGLE_APPLICATION_CREDENTIALS for gs://"
)


Group.command_class = Command
Group.group_class = type  # subgroups (serve) are Groups too
