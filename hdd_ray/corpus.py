"""WebDataset shards: list, read (tolerating damage), decode, write; the bundled demo corpus.

A shard is a tar archive whose members are grouped into samples by key: ``digit-000123.png``,
``digit-000123.txt`` and ``digit-000123.json`` form the sample ``digit-000123`` (the key is the
member name up to the first dot of its base name, as in webdataset and Ray Data).

Everything here is plain Python over pyarrow filesystems (local paths, ``s3://``, ``gs://``):
the Ray Data passes of :mod:`hdd_ray.prepare` and the trainers' data loading use the same
reader inside their tasks.

Damage never raises here: a tar cut short or an unreadable shard yields a sample dict with an
``__error__`` reason (``truncated_tar``, ``unreadable_shard``) so callers can count it.

Shards are read through :class:`ShardReader`: :data:`READ_BUFFER_BYTES` per request (tarfile
asks for 10 KB at a time, one ranged GET each on an object store), and a read that fails with an
I/O error is retried from the same byte, with backoff, before it counts as damage (a dropped
connection or a throttled request is not a damaged shard).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import posixpath
import re
import tarfile
import time
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from hdd_ray import storage
from hdd_ray.errors import PrepareError, first_line

log = logging.getLogger(__name__)

__all__ = [
    "DEMO_NUM_SAMPLES",
    "PrepareError",
    "ShardReader",
    "decode_image",
    "demo_caption",
    "encode_png",
    "first_sample",
    "iter_samples",
    "iter_tar",
    "key_priority",
    "list_shards",
    "prepare_image",
    "sample_digest",
    "shard_listing",
    "split_member_name",
    "tar_bytes",
    "write_demo_corpus",
    "write_tar",
]

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SHARD_PATTERN = "shard-{:06d}.tar"
# Fixed member metadata so that the same samples always give byte-identical shards.
TAR_MTIME = 946_684_800  # 2000-01-01T00:00:00Z
DEMO_NUM_SAMPLES = 1797  # sklearn.datasets.load_digits
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEMO_TEMPLATES = (
    "a handwritten digit {word}",
    "a scan of the digit {number}",
    "the number {word}, handwritten",
    "a handwritten {word}",
    "a small scan of a handwritten {number}",
)
# Same rule as webdataset / Ray Data: key = path up to the first dot of the base name.
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)
#: bytes fetched per request when a shard is read
READ_BUFFER_BYTES = 8 << 20
#: attempts at a shard read failing with an I/O error, and the first wait between two (doubled
#: after each failure: 0.5, 1, 2 s)
READ_ATTEMPTS = 4
READ_BACKOFF_S = 0.5
#: errors that no retry cures: the shard is not there (or not readable by us)
_PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class ShardReader:
    """A shard's bytes for tarfile, fetched :data:`READ_BUFFER_BYTES` at a time.

    A fetch that fails with a transient I/O error re-opens the shard at the byte it had reached
    and tries again, :data:`READ_ATTEMPTS` times in all with exponential backoff from
    :data:`READ_BACKOFF_S`, each retry logged; the last failure is raised (and counted as damage
    by :func:`iter_tar`). A missing or forbidden shard is not retried.
    """

    def __init__(self, fs: pafs.FileSystem, path: str, url: str,
                 buffer_bytes: int | None = None) -> None:
        self.fs, self.path, self.url = fs, path, url
        self.buffer_bytes = buffer_bytes or READ_BUFFER_BYTES
        self.fetched, self.retries = 0, 0  # bytes fetched so far; retried fetches
        self._file: Any = None
        self._buffer = memoryview(b"")
        self._eof = False
        self._retrying(lambda: b"")  # opened now: a shard that is not there raises here

    def _retrying(self, read: Any) -> bytes:
        """``read()`` on the open shard (opened, or re-opened at :attr:`fetched`, first),
        retried on transient I/O errors."""
        for attempt in range(READ_ATTEMPTS):
            try:
                if self._file is None:
                    self._file = self.fs.open_input_file(self.path)
                    if self.fetched:
                        self._file.seek(self.fetched)
                return bytes(read())
            except _PERMANENT:
                raise
            except OSError as exc:
                self._drop_file()
                if attempt == READ_ATTEMPTS - 1:
                    raise
                wait = READ_BACKOFF_S * 2**attempt
                self.retries += 1
                log.warning("%s: read failed at byte %d (%s); retrying in %.1f s", self.url,
                            self.fetched, first_line(exc), wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _fetch(self) -> bytes:
        data = self._retrying(lambda: self._file.read(self.buffer_bytes))
        self.fetched += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all that is left when ``n`` is negative); ``b""`` at the end."""
        parts, want = [], n if n is not None and n >= 0 else float("inf")
        while want > 0:
            if not self._buffer:
                if self._eof:
                    break
                data = self._fetch()
                if not data:
                    self._eof = True
                    break
                self._buffer = memoryview(data)
            take = self._buffer[:want] if want != float("inf") else self._buffer
            parts.append(bytes(take))
            self._buffer = self._buffer[len(take):]
            want -= len(take)
        return b"".join(parts)

    def _drop_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def close(self) -> None:
        """Close the shard."""
        self._drop_file()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- listing


def list_shards(uri: str) -> list[str]:
    """Shard files named by ``uri``: a directory, one file, a brace or glob pattern.

    Works for local paths and ``s3://`` / ``gs://`` URIs (pyarrow filesystems). A directory
    gives its ``.tar`` / ``.tar.gz`` / ``.tgz`` files (not recursive), sorted by name. Raises
    :class:`PrepareError` naming the path when nothing is there.
    """
    from braceexpand import braceexpand  # a webdataset dependency

    uri = str(uri)
    out: list[str] = []
    for pattern in braceexpand(uri):
        base = posixpath.basename(pattern.rstrip("/"))
        if any(ch in base for ch in "*?["):
            parent = pattern[: len(pattern) - len(base)].rstrip("/") or "."
            names = [n for n in storage.listdir(parent) if fnmatch.fnmatch(n, base)]
            out.extend(storage.join(parent, n) for n in names if n.endswith(SHARD_SUFFIXES))
            continue
        fs, inner = storage.resolve(pattern)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.Directory:
            names = [n for n in storage.listdir(pattern) if n.endswith(SHARD_SUFFIXES)]
            if not names:
                raise PrepareError(f"corpus {pattern!r}: directory contains no .tar shards")
            out.extend(storage.join(pattern, n) for n in names)
        elif info.type == pafs.FileType.File:
            out.append(pattern)
        else:
            raise PrepareError(f"corpus {pattern!r}: no such file or directory")
    if not out:
        raise PrepareError(f"corpus {uri!r}: no shard matches")
    return out


def shard_listing(shards: list[str]) -> list[tuple[str, int, int]]:
    """``(path, size, mtime_ns)`` of each shard: a cheap fingerprint of the input files."""
    out = []
    for path in shards:
        fs, inner = storage.resolve(path)
        info = fs.get_file_info(inner)
        mtime = info.mtime_ns if info.mtime_ns is not None else 0
        out.append((path, int(info.size or 0), int(mtime)))
    return out


# --------------------------------------------------------------------------- reading


class _CountingReader:
    """Counts the bytes tarfile pulls, to tell a proper end of archive from a cut."""

    def __init__(self, f: Any) -> None:
        self.f, self.pos = f, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n) if n is not None and n >= 0 else self.f.read()
        self.pos += len(data)
        return data


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """``"a/b.c.d"`` -> ``("a/b", "c.d")``: sample key and member suffix (None if no dot)."""
    match = _KEY_RE.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


def iter_tar(
    fileobj: Any, url: str, suffixes: Iterable[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Samples of one tar stream: ``{"__key__", "__url__", suffix: bytes, ...}``.

    Only members whose suffix is in ``suffixes`` are kept (all when None). Damage is yielded,
    not raised: a member cut short (or a header cut so the archive has no end marker) gives
    ``{"__key__": key, "__url__": url, "__error__": "truncated_tar", "__detail__": <the read
    error's first line, when there was one>}`` for the sample it
    belonged to and ends the shard; a stream that is not a tar at all gives one
    ``"unreadable_shard"`` record with an empty key.
    """
    keep = None if suffixes is None else set(suffixes)
    counter = _CountingReader(fileobj)
    try:
        tar = tarfile.open(fileobj=counter, mode="r|*")  # type: ignore[call-overload]
    except _READ_ERRORS as exc:
        yield {"__key__": "", "__url__": url, "__error__": "unreadable_shard",
               "__detail__": first_line(exc)}
        return
    current: dict[str, Any] | None = None
    try:
        for info in tar:
            if not info.isreg():
                continue
            key, suffix = split_member_name(info.name)
            if key is None:
                continue
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            data = tar.extractfile(info).read()  # type: ignore[union-attr]
            if keep is None or suffix in keep:
                current[suffix] = data
    except _READ_ERRORS as exc:
        key = current["__key__"] if current is not None else ""
        yield {"__key__": key, "__url__": url, "__error__": "truncated_tar",
               "__detail__": first_line(exc)}
        return
    # tarfile ends quietly when a header is cut: a proper archive has a zero block after the
    # last member, so fewer bytes than that means the last sample may be incomplete.
    if counter.pos < tar.offset + tarfile.BLOCKSIZE:
        if current is not None:
            yield {"__key__": current["__key__"], "__url__": url, "__error__": "truncated_tar"}
        return
    if current is not None:
        yield current


def iter_samples(
    shards: str | list[str],
    suffixes: Iterable[str] | None = None,
    include_damaged: bool = False,
) -> Iterator[dict[str, Any]]:
    """Samples of several shards (paths or URIs) in order; see :func:`iter_tar`.

    Damaged records (``"__error__"`` set) are left out unless ``include_damaged``.
    """
    for path in [shards] if isinstance(shards, str) else shards:
        fs, inner = storage.resolve(path)
        with ShardReader(fs, inner, path) as f:
            for sample in iter_tar(f, path, suffixes):
                if include_damaged or "__error__" not in sample:
                    yield sample


def first_sample(shards: list[str], max_shards: int = 8) -> dict[str, Any] | None:
    """The first undamaged sample among the first ``max_shards`` shards (None if none)."""
    for path in shards[:max_shards]:
        for sample in iter_samples(path):
            return sample
    return None


# --------------------------------------------------------------------------- images


def decode_image(data: bytes) -> Any:
    """Decode image bytes into a fully loaded PIL image (raises on undecodable data)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()  # PIL decodes lazily; force it so damage shows up here, not later
    return img


def prepare_image(img: Any, channels: int, size: int) -> np.ndarray:
    """PIL image -> ``uint8 [size, size, channels]``: flatten alpha on white, resize, crop.

    The shorter side is resized to ``size`` (bicubic) and the center is cropped, so the aspect
    ratio is kept.
    """
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def encode_png(arr: np.ndarray) -> bytes:
    """``uint8 [H, W, C]`` (C = 1 or 3) -> PNG bytes (deterministic for a given Pillow)."""
    from PIL import Image

    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- writing


def tar_bytes(samples: Iterable[dict[str, Any]]) -> bytes:
    """A WebDataset tar of ``samples`` (``__key__`` + suffix -> bytes or str), in memory.

    Members are written in sorted suffix order with a fixed mtime, owner and mode, so equal
    samples give byte-identical archives.
    """
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=TAR_MTIME) as writer:
        for sample in samples:
            writer.write({k: v.encode("utf-8") if isinstance(v, str) and k != "__key__" else v
                          for k, v in sample.items()})
    return buf.getvalue()


def write_tar(path: str, samples: Iterable[dict[str, Any]]) -> int:
    """Write one shard (local path or URI; atomic on local disks); returns its size in bytes."""
    data = tar_bytes(samples)
    storage.write_bytes(path, data)
    return len(data)


def demo_caption(label: int, key: str) -> str:
    """One of a few phrasings for a digit, chosen by the sample key (stable across runs)."""
    template = DEMO_TEMPLATES[zlib.crc32(key.encode()) % len(DEMO_TEMPLATES)]
    return template.format(word=DIGIT_WORDS[label], number=label)


def write_demo_corpus(directory: str, shard_size: int = 500) -> list[str]:
    """Write scikit-learn's 1,797 handwritten digits as WebDataset shards; returns their paths.

    Each sample ``digit-000123`` has ``png`` (8x8, 8-bit grayscale; the 0..16 scan values
    scaled to 0..255), ``txt`` (a caption such as "a scan of the digit 7") and ``json``
    (``{"label": 7}``). The bytes are identical every time, and shards whose content is
    already on disk are not rewritten (their mtimes, which the prepare stage fingerprints,
    stay put).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    samples = []
    for i, (img, label) in enumerate(zip(pixels, digits.target, strict=True)):
        key = f"digit-{i:06d}"
        samples.append({
            "__key__": key,
            "png": encode_png(img[:, :, None]),
            "txt": demo_caption(int(label), key),
            "json": json.dumps({"label": int(label)}),
        })
    paths = []
    for n, start in enumerate(range(0, len(samples), shard_size)):
        path = storage.join(directory, SHARD_PATTERN.format(n))
        data = tar_bytes(samples[start : start + shard_size])
        if not (storage.exists(path) and storage.read_bytes(path) == data):
            storage.write_bytes(path, data)
        paths.append(path)
    # Shards beyond the last one (a larger shard_size than before) would be read as corpus.
    names = {posixpath.basename(p) for p in paths}
    for name in storage.listdir(directory):
        if name.startswith("shard-") and name.endswith(".tar") and name not in names:
            storage.remove(storage.join(directory, name))
    return paths


def sample_digest(image: bytes, caption: bytes) -> str:
    """sha256 of one sample's image bytes and caption (what the data hashes are built from)."""
    h = hashlib.sha256(image)
    h.update(b"\x00")
    h.update(caption)
    return h.hexdigest()


def key_priority(key: str) -> int:
    """A stable pseudo-random non-negative int64 per key (for order-free sampling)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1
