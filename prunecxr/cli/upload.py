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
    help="The server to send it to [default: MLFLOW_TRACKING_URI]; never taken from FOLDER.",
)
@click.option(
    "--to-other-server",
    is_flag=True,
    help="Send it although FOLDER was kept for another server (a server that moved).",
)
def upload(folder, tracking_uri, to_other_server) -> None:
    """Send what a train run kept in FOLDER while its tracking server was away (the error
    line of that run names the folder and this command). Every record and file in FOLDER is
    checked before anything is sent."""
    run_id, count = tracking.upload_kept(
        folder, rebuild_model, tracking_uri, to_other_server=to_other_server
    )
    click.echo(f"run {run_id}: {count} kept calls sent; {tracking.where_to_browse(run_id)}")
