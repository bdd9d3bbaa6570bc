"""`prunecxr cache list|prune|verify`: old caches are listed and removed only when asked; a
build in progress is told by its lock (never by a PID), and every cache checked against its
checksums."""

from __future__ import annotations

import os
import time

from click.testing import CliRunner

from prunecxr import PrunecxrError
from prunecxr.cli.housekeeping import cache as cache_command
from prunecxr.data import get_schema, load_split
from prunecxr.processes import file_lock

NIH = get_schema("nih-cxr-lt")


def prunecxr(*args: str):
    """`prunecxr cache ARGS` in this process (the CLI's imports take seconds per process)."""
    assert args[0] == "cache"
    return CliRunner().invoke(cache_command, args[1:])


def test_caches_are_listed_and_removed_only_as_asked(tiny_nih, tmp_path):
    cache = tmp_path / "cache"
    for split in ("train", "test"):
        load_split(NIH, tiny_nih, tiny_nih, split, 32, cache_dir=cache)
    train, test = sorted(cache.glob("*_train-*.npy")) + sorted(cache.glob("*_test-*.npy"))
    abandoned = cache / f".{test.name}.4242-0badc0de.partial"  # its build was killed
    old_partial = cache / f"{test.stem}.partial-1.npy"  # prunecxr before #23, a PID-1 build
    old_listing = cache / f"{test.stem}.bad.tsv"  # prunecxr before #23: not trusted
    building = cache / ".other-32px-0123.npy.77-feedface.partial"  # a live build's
    for path in (abandoned, old_partial, old_listing, building):
        path.write_bytes(b"half a cache")
    month_ago = time.time() - 30 * 86400
    for path in (train, abandoned, old_partial, old_listing, building):
        os.utime(path, (month_ago, month_ago))

    with file_lock(cache / "other-32px-0123.lock"):  # as the live build holds it
        listed = prunecxr("cache", "list", "--cache-dir", str(cache))
        assert listed.exit_code == 0
        assert "6 files" in listed.output
        notes = _listed(listed.output)
        assert notes[abandoned.name] == notes[old_partial.name] == "(partial: abandoned build)"
        assert notes[building.name] == "(partial: being built)"
        assert notes[old_listing.name] == "(bad-image list of an older prunecxr: ignored)"
        assert notes[train.name] == notes[test.name] == ""
        assert list(notes).index(train.name) < list(notes).index(test.name)  # least used first

        unasked = prunecxr("cache", "prune", "--cache-dir", str(cache))
        assert isinstance(unasked.exception, PrunecxrError)
        assert "--older-than DAYS or --all" in str(unasked.exception)
        dry = prunecxr(
            "cache", "prune", "--cache-dir", str(cache), "--older-than", "7", "--dry-run"
        )
        assert dry.exit_code == 0 and "would free" in dry.output
        assert all(path.exists() for path in (train, test, abandoned, old_partial, building))

        pruned = prunecxr("cache", "prune", "--cache-dir", str(cache), "--older-than", "7")
        assert pruned.exit_code == 0, pruned.output
        assert "removed" in pruned.output and "(4 files)" in pruned.output
        for gone in (train, abandoned, old_partial, old_listing):
            assert not gone.exists(), gone
        assert not train.with_suffix(".sha256.json").exists()  # a cache goes with its checksums
        assert test.exists() and building.exists()  # used today; a build still running

    pruned = prunecxr("cache", "prune", "--cache-dir", str(cache), "--older-than", "7")
    assert "(1 files)" in pruned.output and not building.exists()  # its build gone: abandoned
    again = load_split(NIH, tiny_nih, tiny_nih, "train", 32, cache_dir=cache)
    assert len(again.images) == 96  # a removed cache is rebuilt on next use


def test_verify_names_each_cache_ok_or_bad_and_fails_on_a_bad_one(tiny_nih, tmp_path):
    cache = tmp_path / "cache"
    for split in ("val", "test"):
        load_split(NIH, tiny_nih, tiny_nih, split, 32, cache_dir=cache)
    val, test = sorted(cache.glob("*_val-*.npy")) + sorted(cache.glob("*_test-*.npy"))

    whole = prunecxr("cache", "verify", "--cache-dir", str(cache))
    assert whole.exit_code == 0, whole.output
    assert f"OK  {val.name}" in whole.output and f"OK  {test.name}" in whole.output
    assert "2 caches checked, 0 bad" in whole.output

    with open(test, "r+b") as file:  # a page of pixels zeroed, the size unchanged
        file.seek(test.stat().st_size // 2)
        file.write(bytes(4096))
    checked = prunecxr("cache", "verify", "--cache-dir", str(cache))
    assert checked.exit_code == 1 and isinstance(checked.exception, PrunecxrError)
    assert f"OK  {val.name}" in checked.output
    assert f"BAD  {test.name}: bytes 0-" in checked.output  # one 16 MiB chunk: the whole file
    assert "differ from its checksum" in checked.output
    assert "rebuilt from the images on its next use" in str(checked.exception)
    assert test.exists()  # verify only reports


def _listed(stdout: str) -> dict[str, str]:
    """{file name: note} from `cache list`'s lines (size, MB, date, time, name, note)."""
    fields = [line.split(maxsplit=5) for line in stdout.splitlines()[:-1]]
    return {field[4]: (field[5] if len(field) > 5 else "") for field in fields}
