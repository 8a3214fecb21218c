"""The click base classes of every command: one-line errors, -v/-q anywhere, and
``--storage-options`` for the commands that read or write volumes by URL."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

import click

from ssn_deploy.errors import ConfigError, SsnDeployError, StorageError


def drop_pending_writes() -> None:
    """After a failed write (a full disk, a missing bucket), zarr's other writes of that call
    are still queued in its event loop: let them end (each fails the same way), so that exiting
    neither logs them as errors nor prints a traceback for each coroutine left unfinished."""
    from ssn_deploy.storage import settle_zarr_writes

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    settle_zarr_writes()


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


def _parse_storage_options(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        options = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(options, dict):
        raise click.BadParameter(
            'expected a JSON object, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\''
        )
    return options


def storage_options_option(f: Callable) -> Callable:
    """``--storage-options JSON``: fsspec options for every URL the command reads or writes."""
    return click.option(
        "--storage-options",
        metavar="JSON",
        default=None,
        callback=_parse_storage_options,
        help="fsspec options for the URL volumes read and written, as a JSON object, e.g. "
        '\'{"endpoint_url": "http://127.0.0.1:9000"}\' for an S3-compatible server, or per '
        'protocol: \'{"s3": {...}, "https": {...}}\'. They override FSSPEC_<PROTOCOL>_<KEY> '
        "environment variables.",
    )(f)


def agglomeration_option(default: str) -> Callable[[Callable], Callable]:
    """``--agglomeration`` of infer and segment."""
    return click.option(
        "--agglomeration",
        type=click.Choice(["auto", "global", "superblocks"]),
        default=None,
        help="global: one region graph reduced on the client (a threshold sweep from one "
        "run); superblocks: edges kept beside the fragments and merged super-block by "
        "super-block in dask tasks, so the client's memory does not grow with the volume "
        "(equal scores may be taken in another order, see the README); auto: global up to "
        f"64 Mi voxels, superblocks above [default: {default}].",
    )


class Command(click.Command):
    """Every command takes ``-v``/``-q`` after its name as well as before it (``ssn-deploy
    infer -v …`` = ``ssn-deploy -v infer …``); ``-q`` also hides progress bars. A command with
    ``--storage-options`` opens every URL volume with those options while it runs."""

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
        options = ctx.params.pop("storage_options", None)
        if not options:
            return super().invoke(ctx)
        from ssn_deploy.volumes import storage_options

        try:
            with storage_options(options):
                return super().invoke(ctx)
        except TypeError as exc:  # a key the filesystem (or its client) does not take
            unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
            if unexpected is None or unexpected.group(1) not in _keys(options):
                raise
            raise ConfigError(
                f"--storage-options: {unexpected.group(1)!r} is not an option of this URL's "
                f"filesystem ({exc})"
            ) from None


def _keys(options: dict[str, Any]) -> set[str]:
    """The keys of storage options, those of per-protocol options included."""
    nested = (v.keys() for v in options.values() if isinstance(v, dict))
    return set(options).union(*nested)


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
            hint = REMOTE_ENDPOINT if "Connect" in type(exc).__name__ else REMOTE_CREDENTIALS
            click.echo(f"error: remote storage: {exc} ({hint})", err=True)
            sys.exit(1)


REMOTE_ERROR_MODULES = ("botocore", "aiobotocore", "google.auth", "gcsfs")
"""Errors of the object-store clients (no credentials, access denied) are the user's to fix."""
REMOTE_CREDENTIALS = (
    "credentials come from the client's environment: AWS_PROFILE or AWS_ACCESS_KEY_ID/"
    "AWS_SECRET_ACCESS_KEY for s3://, FSSPEC_S3_ENDPOINT_URL or --storage-options "
    "'{\"endpoint_url\": ...}' for an S3-compatible server, GOOGLE_APPLICATION_CREDENTIALS "
    "for gs://"
)
REMOTE_ENDPOINT = (
    "no server answers there: check the endpoint, FSSPEC_S3_ENDPOINT_URL or --storage-options "
    '\'{"endpoint_url": "http://host:port"}\' for an S3-compatible server'
)


Group.command_class = Command
Group.group_class = type  # subgroups (serve) are Groups too
