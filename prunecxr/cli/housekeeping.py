"""Housekeeping commands: cache (list or remove decoded-image caches)."""

from __future__ import annotations

from pathlib import Path

import click

from prunecxr import PrunecxrError
from prunecxr.data.cache import DEFAULT_CACHE_DIR


@click.group()
def cache() -> None:
    """List or remove decoded-image caches (one .npy file per split and image size)."""


cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=str(DEFAULT_CACHE_DIR),
    show_default="$PRUNECXR_CACHE or ~/.cache/prunecxr",
)


@cache.command("list")
@cache_dir_option
def cache_list(cache_dir) -> None:
    """Every cache, least recently used first: size, last use, name."""
    from prunecxr.data.cache import list_caches

    files = list_caches(cache_dir)
    for file in files:
        click.echo(_describe_cache(file))
    total = sum(file.size for file in files)
    click.echo(f"{len(files)} files, {total / 1e9:.2f} GB in {cache_dir}")


@cache.command("prune")
@cache_dir_option
@click.option("--older-than", type=float, metavar="DAYS", help="Remove caches unused this long.")
@click.option("--all", "remove_all", is_flag=True, help="Remove every cache.")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
def cache_prune(cache_dir, older_than, remove_all, dry_run) -> None:
    """Remove caches (rebuilt on next use), naming each; a build still in progress (its
    process alive on this machine) is kept."""
    import time

    from prunecxr.data.cache import list_caches

    if older_than is None and not remove_all:
        raise PrunecxrError("say what to remove: --older-than DAYS or --all (--dry-run to see)")
    cutoff = time.time() - 86400 * (older_than or 0) if not remove_all else float("inf")
    chosen = [
        file
        for file in list_caches(cache_dir)
        if file.last_used <= cutoff and (file.building_pid is None or file.abandoned)
    ]
    for file in chosen:
        click.echo(("would remove " if dry_run else "removed ") + _describe_cache(file))
        if not dry_run:
            file.path.unlink(missing_ok=True)
    freed = sum(file.size for file in chosen) / 1e9
    click.echo(f"{'would free' if dry_run else 'freed'} {freed:.2f} GB ({len(chosen)} files)")


def _describe_cache(file) -> str:
    import datetime

    used = datetime.datetime.fromtimestamp(file.last_used).strftime("%Y-%m-%d %H:%M")
    note = " (partial: abandoned build)" if file.abandoned else ""
    note = " (partial: being built)" if file.building_pid and not file.abandoned else note
    return f"{file.size / 1e6:10.1f} MB  {used}  {file.path.name}{note}"
