"""Decode-once image cache: every image of a split, resized to S x S grey uint8, in one memory-mapped
.npy file. Training epochs and every sparsity of a sweep read from it instead of decoding again.

Two ways to make the pixels (`preprocess`):
- "default": Pillow, bilinear with antialiasing (a fair downscale of 1024 px radiographs).
- "original": as the original study's code, OpenCV `imread` + `resize` (INTER_LINEAR, no
  antialiasing), so its published checkpoints see the pixels they were trained on. Needs
  opencv-python-headless (`pip install 'prunecxr[original]'`).

Files of one cache `X` in the cache folder (docs/data.md, "Image cache"): `X.npy` the pixels,
`X.sha256.json` its size and per-chunk checksums, `X.lock` the lock its builders take,
`X.bad.jsonl` the images that cannot be decoded (then there is no `X.npy`), and while it is
built, temporary files `.X.*.partial`."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import logging
import os
import re
import struct
import time
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from prunecxr import PrunecxrError
from prunecxr.processes import (
    file_lock,
    fsync_dir,
    fsync_file,
    is_locked,
    temporary_name,
    write_durably,
)

DEFAULT_CACHE_DIR = Path(os.environ.get("PRUNECXR_CACHE", Path.home() / ".cache" / "prunecxr"))
PREPROCESS = ("default", "original")
CHUNK_BYTES = 16 << 20  # one checksum per 16 MiB
PROGRESS_BYTES = 1 << 30  # verifying a cache this large shows a progress bar
# An unfinished build's file: `.X.npy.PID-RANDOM.partial` (processes.temporary_name) of any of
# a cache's files, or `X.partial-PID.npy` of prunecxr before #23 (never finished now).
_PARTIAL = re.compile(r"^\.(?P<stem>.+)\.(npy|sha256\.json|bad\.jsonl)\.\d+-[0-9a-f]+\.partial$")
_OLD_PARTIAL = re.compile(r"\.partial-\d+\.npy$")
_NOT_FOUND = (errno.ENOENT, errno.ENOTDIR)
# What a decoder raises for bad image data (Pillow's OSError without an errno is one too).
_DECODE_ERRORS = (
    UnidentifiedImageError,
    SyntaxError,
    EOFError,
    ValueError,
    struct.error,
    zlib.error,
)
_BOMBS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
log = logging.getLogger(__name__)


class UnreadableImage(PrunecxrError):
    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"cannot read image {path}: {reason}")


def decode_image(path: Path, image_size: int, preprocess: str = "default") -> np.ndarray:
    """PNG/JPEG, grey or RGB (8 or 16 bit) -> (S, S) uint8 grey. Raises UnreadableImage when
    the image itself is bad (missing, not an image, truncated, a decompression bomb) and a
    plain PrunecxrError when the system fails to read it (permission, EIO, EMFILE, ...)."""
    if preprocess == "original":
        return _decode_like_the_original(Path(path), image_size)
    if preprocess != "default":
        raise PrunecxrError(f"unknown preprocess {preprocess!r}; valid: {', '.join(PREPROCESS)}")
    with _image_errors(path), Image.open(path) as image:
        image = _to_grey8(image)
        resized = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.array(resized, dtype=np.uint8)


@contextlib.contextmanager
def _image_errors(path: Path):
    """Decode errors -> UnreadableImage (remembered as a bad image); an OS error, which says
    nothing about the image, -> a PrunecxrError naming its errno (not remembered)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except _BOMBS as error:
            raise UnreadableImage(path, f"decompression bomb ({error})") from None
        except OSError as error:
            if error.errno in _NOT_FOUND:
                raise UnreadableImage(path, "not found") from None
            if error.errno is not None:
                raise _system_error(path, error) from None
            raise UnreadableImage(path, str(error)) from None
        except _DECODE_ERRORS as error:
            raise UnreadableImage(path, str(error) or type(error).__name__) from None


def _system_error(path: Path, error: OSError) -> PrunecxrError:
    name = errno.errorcode.get(error.errno, str(error.errno))
    return PrunecxrError(
        f"cannot read image {path}: {error.strerror} ({name}); a system error, not a bad "
        f"image: not listed as bad, fix it and run again"
    )


def _decode_like_the_original(path: Path, image_size: int) -> np.ndarray:
    """cv2.imread (8-bit; 16-bit images are scaled down by OpenCV) + cv2.resize INTER_LINEAR,
    as the original's datasets.py. It reads 3 equal channels for a grey radiograph; one is kept.
    The bytes are read here (imdecode: imread's decoder), so that an OS error keeps its errno."""
    try:
        import cv2
    except ImportError:
        raise PrunecxrError(
            "--preprocess original needs OpenCV: pip install 'prunecxr[original]' "
            "(opencv-python-headless)"
        ) from None
    with _image_errors(path):
        data = path.read_bytes()
        _refuse_bombs(data)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise UnreadableImage(path, "OpenCV could not read it")
    return cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_LINEAR)


def _refuse_bombs(data: bytes) -> None:
    """Pillow's decompression-bomb check of the header (OpenCV allocates up to 1 G px first)."""
    try:
        Image.open(io.BytesIO(data)).close()
    except _BOMBS:
        raise
    except Exception:  # noqa: BLE001 - not Pillow's to judge: OpenCV decides what decodes
        pass


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
    Raises BadImages listing every image that cannot be read (remembered in a `.bad.jsonl`
    file beside where the cache would be, so that asking again does not decode everything
    again). One process builds a cache at a time (its lock); the others wait and use it."""
    key = cache_key(label_file, image_paths, image_size, preprocess)
    how = "" if preprocess == "default" else f"-{preprocess}"
    path = Path(cache_dir) / f"{Path(label_file).stem}-{image_size}px{how}-{key}.npy"
    listing = _listing_path(path)
    if not _ready(path, listing):
        with file_lock(_lock_path(path)):  # waits while another process builds it
            if not _ready(path, listing, remove_corrupt=True):  # or it was built meanwhile
                decode = functools.partial(
                    decode_image, image_size=image_size, preprocess=preprocess
                )
                bad = _build_cache(path, image_paths, decode, image_size, num_workers)
                if bad:
                    _write_listing(listing, bad)
    bad = _read_listing(listing)
    if bad is not None:
        raise BadImages(label_file, bad, listing)
    with contextlib.suppress(OSError):  # last use (access time; mtime stays the build's)
        os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))
    return np.load(path, mmap_mode="r")


def _lock_path(path: Path) -> Path:
    return path.with_suffix(".lock")


def _checksum_path(path: Path) -> Path:
    return path.with_suffix(".sha256.json")


def _listing_path(path: Path) -> Path:
    return path.with_suffix(".bad.jsonl")


def _write_listing(listing: Path, bad: dict[Path, str]) -> None:
    lines = (json.dumps({"path": str(path), "reason": why}) + "\n" for path, why in bad.items())
    write_durably(listing, "".join(lines))


def _read_listing(listing: Path) -> dict[Path, str] | None:
    """The bad images listed, or None without a (readable) list. An unreadable one is not
    trusted: the images are decoded again and the list rewritten."""
    try:
        records = [json.loads(line) for line in listing.read_text().splitlines()]
        return {Path(record["path"]): record["reason"] for record in records}
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as error:  # edited by hand: not trusted
        log.warning(
            "%s is unreadable (%s); removing it, the images are checked again", listing, error
        )
        listing.unlink(missing_ok=True)
        return None


_MISSING = "missing"
# (path, size, mtime, inode) -> what is wrong with that cache (None: nothing), so that a
# process reads a cache through only once however many times it loads it.
_CHECKED: dict[tuple[str, int, int, int], str | None] = {}


def _problem(path: Path) -> str | None:
    """What is wrong with the cache at `path` (_MISSING when there is none), None if it is
    whole: its size and every chunk's checksum as written when it was built."""
    try:
        seen = _identity(path)
    except FileNotFoundError:
        return _MISSING
    if seen not in _CHECKED:
        _CHECKED[seen] = _check_against_checksums(path, seen[1])
    return _CHECKED[seen]


def _identity(path: Path) -> tuple[str, int, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino


def _check_against_checksums(path: Path, size: int) -> str | None:
    sums = _checksum_path(path)
    try:
        expected = json.loads(sums.read_text())
        written, chunk_bytes = int(expected["size"]), int(expected["chunk_bytes"])
        chunks = list(expected["sha256"])
        if len(chunks) != -(-written // chunk_bytes):
            raise ValueError(f"{len(chunks)} checksums for {written} bytes")
    except FileNotFoundError:
        return (
            f"it has no checksum file {sums.name}: it was built before caches had one, when "
            f"two processes building it at once could leave zero images in it"
        )
    except (ValueError, KeyError, TypeError) as error:
        return f"its checksum file {sums.name} is unreadable ({error})"
    if size != written:
        return f"{size} bytes where {written} were written (truncated or overwritten)"
    for index, (actual, wanted) in enumerate(zip(_chunk_checksums(path, chunk_bytes), chunks)):
        if actual != wanted:
            start = index * chunk_bytes
            return f"bytes {start}-{min(start + chunk_bytes, size) - 1} differ from its checksum"
    return None


def _chunk_checksums(path: Path, chunk_bytes: int = CHUNK_BYTES):
    """SHA-256 of each `chunk_bytes` of the file, read in turn (a bar for large files)."""
    size = path.stat().st_size
    bar = tqdm(
        total=size,
        unit="B",
        unit_scale=True,
        desc=f"checking {path.name}",
        disable=size < PROGRESS_BYTES,
    )
    with open(path, "rb") as file, bar:
        while chunk := file.read(chunk_bytes):
            bar.update(len(chunk))
            yield hashlib.sha256(chunk).hexdigest()


def _ready(path: Path, listing: Path, *, remove_corrupt: bool = False) -> bool:
    """Whether the cache at `path`, or the list of its bad images, can be used now. A corrupt
    cache is removed with `remove_corrupt` (it is derived data: rebuilt from the images)."""
    if _read_listing(listing) is not None:
        return True
    problem = _problem(path)
    if problem not in (None, _MISSING) and remove_corrupt:
        log.warning(
            "image cache %s cannot be used: %s; removing it and decoding the images again (a "
            "cache is derived data: nothing is lost)",
            path,
            problem,
        )
        path.unlink(missing_ok=True)
    return problem is None


def verify_cache(path: Path) -> str | None:
    """`cache verify`: what is wrong with the cache at `path`, None if it is whole (read
    through every time, unlike the check on load)."""
    path = Path(path)
    return _check_against_checksums(path, path.stat().st_size)


@dataclass(frozen=True)
class CacheFile:
    path: Path
    size: int  # bytes
    last_used: float  # Unix time
    partial: bool = False  # a file of an unfinished build, never read
    building: bool = False  # ... whose build holds the cache's lock now

    @property
    def abandoned(self) -> bool:
        """A partial file no build holds the lock for (its build was killed): only removed."""
        return self.partial and not self.building

    @property
    def old_listing(self) -> bool:
        """A bad-image list of prunecxr before #23 (tab-separated), ignored now."""
        return self.path.name.endswith(".bad.tsv")


def list_caches(cache_dir: Path) -> list[CacheFile]:
    """The caches, bad-image lists and partial builds in `cache_dir`, least recently used
    first. A partial file is being built when its cache's lock is held, not by any PID."""
    if not Path(cache_dir).is_dir():
        return []
    files = []
    for path in Path(cache_dir).iterdir():
        name, partial = path.name, _PARTIAL.match(path.name)
        if not (partial or name.endswith((".npy", ".bad.jsonl", ".bad.tsv"))):
            continue  # a cache's checksums and lock go with it; other folders
        try:
            stat = path.stat()
        except FileNotFoundError:  # a build renamed its partial file meanwhile
            continue
        building = bool(partial) and is_locked(path.with_name(f"{partial['stem']}.lock"))
        is_partial = bool(partial or _OLD_PARTIAL.search(name))
        last_used = max(stat.st_atime, stat.st_mtime)
        files.append(CacheFile(path, stat.st_size, last_used, is_partial, building))
    return sorted(files, key=lambda file: file.last_used)


def remove_cache_file(file: CacheFile) -> bool:
    """Remove a listed file (a cache with its checksums and lock); False when it is in use by
    a build (its lock is held), which is then left alone."""
    if file.partial:
        if file.building:
            return False
        file.path.unlink(missing_ok=True)
        return True
    stem = file.path.name.removesuffix(".npy").removesuffix(".bad.jsonl").removesuffix(".bad.tsv")
    lock = file.path.with_name(f"{stem}.lock")
    with file_lock(lock, wait=False) as held:
        if not held:
            return False
        file.path.unlink(missing_ok=True)
        file.path.with_name(f"{stem}.sha256.json").unlink(missing_ok=True)
        lock.unlink()  # a process waiting on it gets it, finds no cache and builds one: no harm
    return True


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
    so that one pass finds every bad image; a system error is raised)."""
    try:
        return decode(path)
    except UnreadableImage as error:
        return error.reason


def _build_cache(
    path: Path, image_paths: list[Path], decode, image_size: int, num_workers: int
) -> dict[Path, str]:
    """Decode into a temporary file of this build's own, write its checksums, then rename it
    (each fsynced), so that no reader ever sees a part of a cache, even after a crash. Called
    with the cache's lock held. -> the images that cannot be read (path: why); if there are
    any, no cache is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary_name(path)
    try:
        array = _allocate(partial, (len(image_paths), image_size, image_size))
        bad = _decode_into(array, image_paths, decode, num_workers, path.name)
        array.flush()
        del array
        if not bad:
            fsync_file(partial)
            _write_checksums(partial, _checksum_path(path))  # before the cache: never without
            partial.replace(path)
            fsync_dir(path.parent)
            _CHECKED[_identity(path)] = None  # just checksummed: not read through again
        return bad
    finally:
        partial.unlink(missing_ok=True)


def _write_checksums(cache: Path, checksums: Path) -> None:
    size, hashes = cache.stat().st_size, list(_chunk_checksums(cache))
    sums = {"size": size, "chunk_bytes": CHUNK_BYTES, "sha256": hashes}
    write_durably(checksums, json.dumps(sums))


def _decode_into(array, image_paths: list[Path], decode, num_workers: int, name: str):
    progress = dict(total=len(image_paths), desc=f"caching {name}", unit="img")
    try_decode = functools.partial(_try_decode, decode)
    bad = {}
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
    return bad
