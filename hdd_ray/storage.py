"""Files on a local path or an ``s3://`` / ``gs://`` URI, through pyarrow filesystems.

Every stage reads and writes one campaign root (laid out by
:class:`hdd_ray.campaign.CampaignPaths`) through these functions, as Ray Train's storage does.
Writes of small files are atomic on local disks (write to a temp name, rename), so a crash never
leaves a half-written manifest or ``expert.json`` behind.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` locations (s3, gs, ...), False for local paths."""
    return "://" in str(path) and not str(path).startswith("file://")


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or URI."""
    path = str(path)
    if is_uri(path):
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs, inner
    if path.startswith("file://"):
        path = path[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(root: str, *parts: str) -> str:
    """Join path components for a local path or URI."""
    if is_uri(root):
        return posixpath.join(root, *parts)
    return os.path.join(root, *parts)


def exists(path: str) -> bool:
    """Whether a file or directory exists."""
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    """Create a directory and its parents (no-op on object stores)."""
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def read_bytes(path: str) -> bytes:
    """Whole file as bytes."""
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_bytes(path: str, data: bytes | bytearray | memoryview) -> None:
    """Write a whole file; atomic on local disks."""
    fs, p = resolve(path)
    parent = posixpath.dirname(p) if is_uri(path) else os.path.dirname(p)
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{p}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    else:
        with fs.open_output_stream(p) as f:
            f.write(data)


def write_with(path: str, write: Callable[[str], None],
               filesystem: pafs.FileSystem | None = None) -> None:
    """Write a whole file by ``write(local_path)`` (a writer that wants a path: ``torch.save``,
    safetensors' ``save_file``; they hold the GIL far less than building the bytes in memory
    and keep no copy of them): atomic on local disks; to an object store through a local
    temporary file. ``filesystem``: the pyarrow filesystem ``path`` lies in (as Ray Train's
    storage gives it), else the one ``path`` names."""
    fs, p = (filesystem, path) if filesystem is not None else resolve(path)
    if not isinstance(fs, pafs.LocalFileSystem):
        with tempfile.TemporaryDirectory() as d:
            write(os.path.join(d, "file"))
            fs.create_dir(posixpath.dirname(p), recursive=True)
            pafs.copy_files(os.path.join(d, "file"), p,
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        return
    os.makedirs(os.path.dirname(p), exist_ok=True)
    tmp = f"{p}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):  # the write failed: no half-written file is left behind
            os.remove(tmp)


def read_json(path: str) -> Any:
    """Parse a JSON file."""
    return json.loads(read_bytes(path).decode())


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON (atomic on local disks)."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def listdir(path: str) -> list[str]:
    """Names directly inside a directory (empty when it does not exist)."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    return sorted(posixpath.basename(i.path) for i in infos)


def absolute(path: str) -> str:
    """``path`` made absolute against the current directory; URIs (``s3://``) as given.

    Campaign roots go through this on the driver: Ray Train and Tune need absolute storage
    paths, and Ray workers run in other directories.
    """
    if is_uri(path) or str(path).startswith("file://"):  # file:// URIs are absolute already
        return path
    return os.path.abspath(os.path.expanduser(path))


def remove(path: str) -> None:
    """Delete a file or directory tree if it exists."""
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif info.type == pafs.FileType.File:
        fs.delete_file(p)
