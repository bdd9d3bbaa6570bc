"""`prunecxr` command line: parses options and calls the library; nothing else lives here.
Options come from the settings specs (options.py); each module holds a family of commands."""

from __future__ import annotations

import logging
import signal
import sys

import click

from prunecxr import PrunecxrError, tracking
from prunecxr.cli.housekeeping import cache
from prunecxr.cli.pruning import analyze, prune, sweep
from prunecxr.cli.reader_study import reader_study
from prunecxr.cli.training import study, synth, train
from prunecxr.cli.upload import upload


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="prunecxr")
def cli() -> None:
    """Train, prune and analyze long-tailed multi-label chest X-ray classifiers, tracked in MLflow."""


for _command in (synth, train, study, prune, sweep, analyze, reader_study, upload, cache):
    cli.add_command(_command)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`docker stop`, Kubernetes, SLURM), handled like Ctrl-C: the run in progress
    ends KILLED and cleanup runs."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup short
    raise Terminated


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 1."""
    # As PID 1 in a container a process has no default action for SIGTERM: without a handler,
    # `docker stop` kills it 10 s later, its run left RUNNING.
    signal.signal(signal.SIGTERM, _terminate)
    tracking.quiet_logs()
    _show_progress_notes()
    try:
        cli.main(args=argv, prog_name="prunecxr", standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.exceptions.NoArgsIsHelpError as error:  # `prunecxr cache`: its help
        error.show()
        sys.exit(error.exit_code)
    except click.UsageError as error:  # a bad option or value: one line, like every input error
        click.echo(f"error: {error.format_message()}", err=True)
        sys.exit(1)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Abort as abort:
        if isinstance(abort.__cause__, Terminated):  # click turns it into Abort
            click.echo("terminated (SIGTERM)", err=True)
            sys.exit(128 + signal.SIGTERM)
        click.echo("aborted", err=True)
        sys.exit(130)
    except PrunecxrError as error:
        click.echo("error: " + " ".join(str(error).splitlines()), err=True)
        sys.exit(1)
    except PermissionError as error:  # e.g. an output folder mounted read-only or root-owned
        click.echo(f"error: no permission to write {error.filename}: {error.strerror}", err=True)
        sys.exit(1)
    except Exception as error:
        uri = tracking.absolute_tracking_uri()
        if tracking.server_answers(uri):
            raise
        click.echo(  # whatever failed, the cause is the server: one line, no traceback
            f"error: the tracking server {uri} stopped answering ({type(error).__name__}); run "
            f"the same command again when it is back: finished work continues",
            err=True,
        )
        sys.exit(1)


def _show_progress_notes() -> None:
    """The library's notes (which run it took, what it continues) as plain lines on stderr."""
    logger = logging.getLogger("prunecxr")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # Ray and MLflow may give the root logger a handler too
