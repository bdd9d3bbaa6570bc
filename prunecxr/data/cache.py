"""Decode-once image cache: every image of a split, resized to S x S grey uint8, in one memory-mapped
.npy file. Training epochs and every sparsity of a sweep read from it instead of decoding again.

Two ways to make the pixels (`preprocess`):
- "default": Pillow, bilinear with antialiasing (a fair downscale of 1024 px radiographs).
- "original": as the original study's code, OpenCV `imread` + `resize` (INTER_LINEAR, no
  antialiasing), so its published checkpoints see the pixels they were trained on. Needs
  opencv-python-headless (`pip install 'prunecxr[original]'`)."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from prunecxr import PrunecxrError
from prunecxr.processes import process_alive

DEFAULT_CACHE_DIR = Path(os.environ.get("PRUNECXR_CACHE", Path.home() / ".cache" / "prunecxr"))
PREPROCESS = ("default", "original")
_PARTIAL = re.compile(r"\.partial-(\d+)\.npy$")  # a build in progress (or killed): see _build_cache


class UnreadableImage(PrunecxrError):
    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"cannot read image {path}: {reason}")


def decode_image(path: Path, image_size: int, preprocess: str = "default") -> np.ndarray:
    """PNG/JPEG, grey or RGB (8 or 16 bit) -> (S, S) uint8 grey."""
    if preprocess == "original":
        return _decode_like_the_original(Path(path), image_size)
    if preprocess != "default":
        raise PrunecxrError(f"unknown preprocess {preprocess!r}; valid: {', '.join(PREPROCESS)}")
    try:
        with Image.open(path) as image:
            image = _to_grey8(image)
            resized = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.array(resized, dtype=np.uint8)
    except FileNotFoundError:
        raise UnreadableImage(path, "not found") from None
    except PermissionError as error:  # the reader's rights, not the image: not remembered
        raise PrunecxrError(f"cannot read image {path}: {error.strerror}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise UnreadableImage(path, str(error)) from None


def _decode_like_the_original(path: Path, image_size: int) -> np.ndarray:
    """cv2.imread (8-bit; 16-bit images are scaled down by OpenCV) + cv2.resize INTER_LINEAR,
    as the original's datasets.py. It reads 3 equal channels for a grey radiograph; one is kept."""
    try:
        import cv2
    except ImportError:
        raise PrunecxrError(
            "--preprocess original needs OpenCV: pip install 'prunecxr[original]' "
            "(opencv-python-headless)"
        ) from None
    if not path.exists():
        raise UnreadableImage(path, "not found")
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise UnreadableImage(path, "OpenCV could not read it")
    return cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_LINEAR)


def _to_grey8(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        return Image.fromarray((array / max(array.max(), 1.0) * 255).astype(np.uint8))
    return image.convert("L")


def cache_key(
    label_file: Path, image_paths: list[Path], image_size: int, preprocess: str = "default"
) -> str:
    """Content key: the label file's bytes, every image's path, size and mtime, the size and
    how pixels are made. Stat-ing (not reading) the images keeps the check cheap on 100k-image
    datasets."""
    digest = hashlib.sha256(Path(label_file).read_bytes())
    digest.update(f"size={image_size}".encode())
    if preprocess != "default":  # default keeps the keys of caches built before this option
        digest.update(f"preprocess={preprocess}".encode())
    for path in image_paths:
        try:
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except FileNotFoundError:  # listed as bad when the cache is built
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()[:20]


class BadImages(PrunecxrError):
    """Images of a split that cannot be read; every one of them, found in one pass."""

    def __init__(self, label_file: Path, bad: dict[Path, str], listing: Path):
        self.bad = bad
        shown = "; ".join(f"{path}: {why}" for path, why in list(bad.items())[:3])
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        super().__init__(
            f"{len(bad)} unreadable image(s) listed in {label_file}: {shown}{more} (all in "
            f"{listing}); fix or remove them, or pass --skip-bad-images to train without them "
            f"(prune and sweep follow their train run's choice)"
        )


def load_images(
    label_file: Path,
    image_paths: list[Path],
    image_size: int,
    *,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    num_workers: int = 0,
    preprocess: str = "default",
) -> np.ndarray:
    """(N, S, S) uint8 memory-mapped view of the images, decoding them only on a cache miss.
    Raises BadImages listing every image that cannot be read (remembered in a `.bad.tsv` file
    beside where the cache would be, so that asking again does not decode everything again)."""
    key = cache_key(label_file, image_paths, image_size, preprocess)
    how = "" if preprocess == "default" else f"-{preprocess}"
    path = Path(cache_dir) / f"{Path(label_file).stem}-{image_size}px{how}-{key}.npy"
    listing = path.with_suffix(".bad.tsv")
    if listing.exists():
        raise BadImages(label_file, _read_listing(listing), listing)
    if not path.exists():
        decode = functools.partial(decode_image, image_size=image_size, preprocess=preprocess)
        bad = _build_cache(path, image_paths, decode, image_size, num_workers)
        if bad:
            _write_listing(listing, bad)
            raise BadImages(label_file, bad, listing)
    with contextlib.suppress(OSError):  # last use (access time; mtime stays the build's)
        os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))
    return np.load(path, mmap_mode="r")


def _write_listing(listing: Path, bad: dict[Path, str]) -> None:
    partial = listing.with_suffix(f".partial-{os.getpid()}")
    partial.write_text("".join(f"{path}\t{why}\n" for path, why in bad.items()))
    partial.replace(listing)


def _read_listing(listing: Path) -> dict[Path, str]:
    lines = listing.read_text().splitlines()
    return {Path(path): why for path, why in (line.split("\t", 1) for line in lines)}


@dataclass(frozen=True)
class CacheFile:
    path: Path
    size: int  # bytes
    last_used: float  # Unix time
    building_pid: int | None = None  # a partial file: the process that was writing it

    @property
    def abandoned(self) -> bool:
        """A partial file whose process is gone (killed mid-build): never read, only removed."""
        return self.building_pid is not None and not process_alive(self.building_pid)


def list_caches(cache_dir: Path) -> list[CacheFile]:
    """The caches (and partial builds) in `cache_dir`, least recently used first."""
    files = []
    for path in [*Path(cache_dir).glob("*.npy"), *Path(cache_dir).glob("*.bad.tsv")]:
        match = _PARTIAL.search(path.name)
        try:
            stat = path.stat()
        except FileNotFoundError:  # a build renamed its partial file meanwhile
            continue
        pid = int(match.group(1)) if match else None
        last_used = max(stat.st_atime, stat.st_mtime)
        files.append(CacheFile(path, stat.st_size, last_used, pid))
    return sorted(files, key=lambda file: file.last_used)


def _allocate(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """The whole file allocated now: on a full disk, a clear error here instead of a crash
    (SIGBUS) when a memory-mapped page cannot be written halfway through."""
    array = None
    try:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        if hasattr(os, "posix_fallocate"):  # Linux; elsewhere a full disk fails later
            with open(path, "r+b") as file:
                os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
        return array
    except OSError as error:
        reason, full = error.strerror, error.errno == errno.ENOSPC
    del array  # unmapped now (not when the error is collected): its space is freed with it
    hint = "free space there or pass --cache-dir on a larger disk" if full else "pass --cache-dir"
    raise PrunecxrError(f"cannot write the image cache {path.parent}: {reason}; {hint}")


def _try_decode(decode, path: Path) -> np.ndarray | str:
    """The image, or why it cannot be read (a worker process returns it rather than raising,
    so that one pass finds every bad image)."""
    try:
        return decode(path)
    except UnreadableImage as error:
        return error.reason


def _build_cache(
    path: Path, image_paths: list[Path], decode, image_size: int, num_workers: int
) -> dict[Path, str]:
    """Decode into a temporary file and rename it, so an interrupted build never leaves a
    truncated cache behind that a later run would trust. -> the images that cannot be read
    (path: why); if there are any, no cache is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial-{os.getpid()}.npy")
    shape = (len(image_paths), image_size, image_size)
    progress = dict(total=len(image_paths), desc=f"caching {path.name}", unit="img")
    try_decode = functools.partial(_try_decode, decode)
    bad = {}
    try:
        array = _allocate(partial, shape)
        with contextlib.ExitStack() as stack:
            if num_workers > 0:
                pool = stack.enter_context(ProcessPoolExecutor(num_workers))
                decoded = pool.map(try_decode, image_paths, chunksize=64)
            else:
                decoded = map(try_decode, image_paths)
            for index, image in enumerate(tqdm(decoded, **progress)):
                if isinstance(image, str):
                    bad[image_paths[index]] = image
                else:
                    array[index] = image
        array.flush()
        del array
        if not bad:
            partial.replace(path)
        return bad
    finally:
        partial.unlink(missing_ok=True)
