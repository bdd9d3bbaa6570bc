"""Housekeeping commands: cache (list, remove or verify decoded-image caches)."""

from __future__ import annotations

from pathlib import Path

import click

from prunecxr import PrunecxrError
from prunecxr.data.cache import DEFAULT_CACHE_DIR


@click.group()
def cache() -> None:
    """List, remove or verify decoded-image caches (one .npy file per split and image size)."""


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
    """Remove caches (rebuilt on next use), naming each; a build in progress (one holding
    its cache's lock, in any process or container) is kept, an abandoned one removed."""
    import time

    from prunecxr.data.cache import list_caches, remove_cache_file

    if older_than is None and not remove_all:
        raise PrunecxrError("say what to remove: --older-than DAYS or --all (--dry-run to see)")
    cutoff = time.time() - 86400 * (older_than or 0) if not remove_all else float("inf")
    old = [file for file in list_caches(cache_dir) if file.last_used <= cutoff]
    chosen = [file for file in old if not file.building]
    if not dry_run:
        chosen = [file for file in chosen if remove_cache_file(file)]
    for file in chosen:
        click.echo(("would remove " if dry_run else "removed ") + _describe_cache(file))
    freed = sum(file.size for file in chosen) / 1e9
    click.echo(f"{'would free' if dry_run else 'freed'} {freed:.2f} GB ({len(chosen)} files)")


@cache.command("verify")
@cache_dir_option
def cache_verify(cache_dir) -> None:
    """Check every cache against the size and checksums written when it was built: OK or
    what is wrong, per file. A bad one is rebuilt on its next use (exit 1 if any is bad)."""
    from prunecxr.data.cache import list_caches, verify_cache

    caches = [file for file in list_caches(cache_dir) if file.path.suffix == ".npy"]
    caches = [file for file in caches if not file.partial]
    bad = 0
    for file in caches:
        problem = verify_cache(file.path)
        bad += problem is not None
        click.echo(f"{'OK' if problem is None else 'BAD'}  {file.path.name}{_why(problem)}")
    click.echo(f"{len(caches)} caches checked, {bad} bad in {cache_dir}")
    if bad:
        raise PrunecxrError(
            f"{bad} bad cache(s) in {cache_dir}: each is removed and rebuilt from the images "
            f"on its next use (or remove them now with cache prune --all)"
        )


def _why(problem: str | None) -> str:
    return "" if problem is None else f": {problem}"


def _describe_cache(file) -> str:
    import datetime

    used = datetime.datetime.fromtimestamp(file.last_used).strftime("%Y-%m-%d %H:%M")
    note = " (partial: abandoned build)" if file.abandoned else ""
    note = " (partial: being built)" if file.building else note
    note = " (bad-image list of an older prunecxr: ignored)" if file.old_listing else note
    return f"{file.size / 1e6:10.1f} MB  {used}  {file.path.name}{note}"
