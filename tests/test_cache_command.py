"""`prunecxr cache list|prune`: old caches are listed and removed only when asked."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from prunecxr.data import get_schema, load_split
from tests.helpers import prunecxr


def test_caches_are_listed_and_removed_only_as_asked(tiny_nih, tmp_path):
    cache = tmp_path / "cache"
    for split in ("train", "test"):
        load_split(get_schema("nih-cxr-lt"), tiny_nih, tiny_nih, split, 32, cache_dir=cache)
    train, test = sorted(cache.glob("*_train-*.npy")) + sorted(cache.glob("*_test-*.npy"))
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    abandoned = cache / f"{test.stem}.partial-{gone.stdout.strip()}.npy"  # killed mid-build
    abandoned.write_bytes(b"half a cache")
    building = cache / f"{test.stem}.partial-{os.getpid()}.npy"  # a live build
    building.write_bytes(b"being written")
    month_ago = time.time() - 30 * 86400
    for path in (train, abandoned, building):
        os.utime(path, (month_ago, month_ago))

    listed = prunecxr("cache", "list", "--cache-dir", str(cache))
    assert listed.returncode == 0
    assert "4 files" in listed.stdout and "abandoned build" in listed.stdout
    assert listed.stdout.index(train.name) < listed.stdout.index(test.name)  # least used first

    unasked = prunecxr("cache", "prune", "--cache-dir", str(cache))
    assert unasked.returncode == 1 and "--older-than DAYS or --all" in unasked.stderr
    dry = prunecxr("cache", "prune", "--cache-dir", str(cache), "--older-than", "7", "--dry-run")
    assert dry.returncode == 0 and "would free" in dry.stdout
    assert all(path.exists() for path in (train, test, abandoned, building))

    pruned = prunecxr("cache", "prune", "--cache-dir", str(cache), "--older-than", "7")
    assert pruned.returncode == 0, pruned.stderr
    assert "removed" in pruned.stdout and "(2 files)" in pruned.stdout
    assert not train.exists() and not abandoned.exists()
    assert test.exists() and building.exists()  # used today; a build still running
    again = load_split(get_schema("nih-cxr-lt"), tiny_nih, tiny_nih, "train", 32, cache_dir=cache)
    assert len(again.images) == 96  # a removed cache is rebuilt on next use
