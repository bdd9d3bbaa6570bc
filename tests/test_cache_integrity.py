"""The image cache under many processes and broken files (#23): two containers building one
cache at once, a corrupt or truncated cache, bad-image lists that a file name cannot break,
system errors that are not bad images, decompression bombs."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from prunecxr import PrunecxrError
from prunecxr.data import get_schema, load_split
from prunecxr.data.cache import BadImages, decode_image, load_images
from tests.helpers import PROJECT_ROOT, wait_for

NIH = get_schema("nih-cxr-lt")

# Loads the images of FOLDER (sorted *.png and the FIFO gate.png) through the cache in CACHE
# and saves them to OUT; says when it starts (a file STARTED) and its PID.
LOAD = """
import sys, numpy as np
from pathlib import Path
from prunecxr.data.cache import load_images
folder, cache, out, started = map(Path, sys.argv[1:])
paths = sorted(folder.glob("*.png"))
started.touch()
images = load_images(folder / "labels.csv", paths, 16, cache_dir=cache)
np.save(out, np.asarray(images))
import os; print("pid", os.getpid())
"""


def _images(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        paths.append(folder / f"{index:03d}.png")
        Image.fromarray(rng.integers(1, 255, (24, 24), dtype=np.uint8)).save(paths[-1])
    (folder / "labels.csv").write_text("id\n" + "".join(f"{p.name}\n" for p in paths))
    return paths


def _start_load(folder: Path, cache: Path, out: Path, *, own_pid_namespace: bool = False):
    started = out.with_suffix(".started")
    command = [sys.executable, "-c", LOAD, str(folder), str(cache), str(out), str(started)]
    if own_pid_namespace:  # PID 1 in a PID namespace of its own, as in a container
        command = ["unshare", "--pid", "--fork", "--mount-proc", *command]
    process = subprocess.Popen(
        command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return process, started


def _load_in_a_new_process(folder: Path, cache: Path, out: Path) -> tuple[np.ndarray, str]:
    """What a later run gets (a new process: nothing of this one's checks remembered)."""
    process, _ = _start_load(folder, cache, out)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    return np.load(out), stderr


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_two_containers_building_one_cache_at_once_get_the_right_pixels(tmp_path):
    folder, cache = tmp_path / "images", tmp_path / "cache"
    _images(folder, 200)
    # Image 100 is a FIFO: whichever process builds first blocks there, its first 100 images
    # written, until this test writes a PNG into it, after both processes have started. A
    # second build would block on it for ever: the other process must wait and reuse the cache.
    gate = folder / "gate.png"
    os.mkfifo(gate)
    gated = tmp_path / "gate-content.png"
    Image.fromarray(np.full((24, 24), 77, np.uint8)).save(gated)
    outs = [tmp_path / "a.npy", tmp_path / "b.npy"]
    loads = [_start_load(folder, cache, out, own_pid_namespace=True) for out in outs]
    for process, started in loads:
        wait_for(started.exists, timeout=120, process=process)
    time.sleep(1)  # both past their cache key (gate.png's mtime changes when written)
    gate.write_bytes(gated.read_bytes())
    results = [process.communicate(timeout=120) for process, _ in loads]
    for (process, _), (stdout, stderr) in zip(loads, results):
        if stderr.startswith("unshare: "):
            pytest.skip(f"cannot make PID namespaces here: {stderr.strip()}")
        assert process.returncode == 0, stderr
        assert stdout.split() == ["pid", "1"]  # both PID 1, as two containers
    assert sum("caching" in stderr for _, stderr in results) == 1  # one decoded, one waited

    gate_index = sorted(folder.glob("*.png")).index(gate)
    expected = [decode_image(path, 16) for path in sorted(folder.glob("*.png")) if path != gate]
    expected.insert(gate_index, decode_image(gated, 16))
    for out in outs:
        images = np.load(out)
        np.testing.assert_array_equal(images, np.stack(expected))
        assert images.reshape(len(images), -1).max(axis=1).min() > 0  # no zero image
    assert len(list(cache.glob("*.npy"))) == 1
    assert not [path.name for path in cache.iterdir() if path.name.endswith(".partial")]


def test_a_corrupt_or_truncated_cache_is_rebuilt_with_a_warning(tmp_path):
    folder, cache = tmp_path / "images", tmp_path / "cache"
    paths = _images(folder, 40)
    expected = np.array(load_images(folder / "labels.csv", paths, 16, cache_dir=cache))
    (built,) = cache.glob("*.npy")

    with open(built, "r+b") as file:  # zeroed pages, as a crash can leave: the same size
        file.seek(built.stat().st_size // 2)
        file.write(bytes(4096))
    images, warned = _load_in_a_new_process(folder, cache, tmp_path / "out.npy")
    assert f"image cache {built} cannot be used: bytes 0-" in warned
    assert "differ from its checksum; removing it and decoding the images again" in warned
    assert "a cache is derived data: nothing is lost" in warned
    np.testing.assert_array_equal(images, expected)

    os.truncate(built, built.stat().st_size // 2)  # once an uncaught ValueError from np.load
    images, warned = _load_in_a_new_process(folder, cache, tmp_path / "out.npy")
    assert f"image cache {built} cannot be used: {built.stat().st_size // 2} bytes" in warned
    np.testing.assert_array_equal(images, expected)

    built.with_suffix(".sha256.json").unlink()  # a cache of prunecxr before checksums
    images, warned = _load_in_a_new_process(folder, cache, tmp_path / "out.npy")
    assert "it has no checksum file" in warned and "caching" in warned
    np.testing.assert_array_equal(images, expected)

    images, warned = _load_in_a_new_process(folder, cache, tmp_path / "out.npy")
    assert warned == "" and len(list(cache.glob("*.npy"))) == 1  # whole again: just used


def test_bad_image_list_keeps_paths_with_newlines_and_tabs(tmp_path):
    folder, cache = tmp_path / "images", tmp_path / "cache"
    paths = _images(folder, 3)
    odd = folder / "a\nb\tc.png"
    odd.write_bytes(b"not a png")
    paths.append(odd)
    with pytest.raises(BadImages) as first:
        load_images(folder / "labels.csv", paths, 16, cache_dir=cache)
    assert first.value.bad == {odd: "cannot identify image file " + repr(str(odd))}
    (listing,) = cache.glob("*.bad.jsonl")
    assert [json.loads(line)["path"] for line in listing.read_text().splitlines()] == [str(odd)]
    with pytest.raises(BadImages) as again:  # read back from the list
        load_images(folder / "labels.csv", paths, 16, cache_dir=cache)
    assert again.value.bad == first.value.bad


def test_a_system_error_reading_an_image_is_an_error_not_a_bad_image(tmp_path):
    folder, cache = tmp_path / "images", tmp_path / "cache"
    paths = _images(folder, 3)
    paths[1].unlink()
    paths[1].mkdir()  # reading it: EISDIR, an OS error that says nothing about an image
    for preprocess in ("default", "original"):
        with pytest.raises(PrunecxrError) as error:
            load_images(folder / "labels.csv", paths, 16, cache_dir=cache, preprocess=preprocess)
        assert not isinstance(error.value, BadImages)
        assert str(error.value) == (
            f"cannot read image {paths[1]}: Is a directory (EISDIR); a system error, not a bad "
            f"image: not listed as bad, fix it and run again"
        )
    assert not list(cache.glob("*.bad.jsonl")) and not list(cache.glob("*.npy"))


def _decompression_bomb() -> bytes:
    """A 66-byte PNG whose header claims 20000 x 20000 pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # 8-bit grey
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("preprocess", ["default", "original"])
def test_a_decompression_bomb_is_a_bad_image_and_skipped_when_asked(preprocess, tiny_nih, tmp_path):
    if preprocess == "original":
        pytest.importorskip("cv2")
    data = tmp_path / "data"
    shutil.copytree(tiny_nih, data)
    bomb = data / pd.read_csv(data / NIH.label_file("val"))["id"][5]
    bomb.write_bytes(_decompression_bomb())
    load = dict(cache_dir=tmp_path / "cache", preprocess=preprocess)
    with pytest.raises(BadImages) as error:
        load_split(NIH, data, data, "val", 16, **load)
    assert list(error.value.bad) == [bomb]
    assert error.value.bad[bomb].startswith("decompression bomb (Image size (400000000 pixels)")
    kept = load_split(NIH, data, data, "val", 16, **load, skip_bad_images=True)
    assert kept.skipped == 1 and len(kept.images) == 47 and bomb.name not in kept.image_ids
