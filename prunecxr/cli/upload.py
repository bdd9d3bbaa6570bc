"""`prunecxr upload`: send what a run kept while its tracking server was away."""

from __future__ import annotations

from pathlib import Path

import click

from prunecxr import tracking
from prunecxr.sources import rebuild_model


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--tracking-uri",
    help="Where to send it [default: the server the run was logging to]; for a server that moved.",
)
def upload(folder, tracking_uri) -> None:
    """Send what a train run kept in FOLDER while its tracking server was away (the error
    line of that run names the folder and this command)."""
    run_id, count = tracking.upload_kept(folder, rebuild_model, tracking_uri)
    click.echo(f"run {run_id}: {count} kept calls sent; {tracking.where_to_browse(run_id)}")
