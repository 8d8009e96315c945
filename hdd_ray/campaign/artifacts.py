"""A run directory's artifacts (an expert's or the router's): its state for reuse
(:func:`existing_state`), its description (``expert.json`` / ``router.json``), and the checksum
of its weights, verified once per file version (ARCHITECTURE.md, "Artifacts carry checksums")."""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from hdd_ray import storage
from hdd_ray.errors import ExpertRejected

WEIGHTS = "weights.safetensors"
EXPERT_JSON = "expert.json"
ROUTER_JSON = "router.json"
STUDENT_JSON = "student.json"  # a distilled student's card (hdd_ray.training.distill)


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes (a local path or a URI), read in 8 MiB blocks."""
    fs, inner = storage.resolve(path)
    h = hashlib.sha256()
    with fs.open_input_stream(inner) as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


#: content hashes of local files, keyed by (absolute path, inode, size, mtime_ns, ctime_ns):
#: ids are computed many times per launch, a large weights file is read once per process.
#: ctime cannot be set back (``cp -p`` and ``os.utime`` keep the mtime, not the ctime)
_CONTENT_HASHES: dict[tuple[str, int, int, int, int], str] = {}


def content_identity(value: str | None) -> Any:
    """What a weights or config reference contributes to an identity: the SHA-256 of a local
    file's (or a local folder's) content, so a file replaced under the same name changes the
    id and a moved one does not; a tag or a URI as given (``None`` stays ``None``)."""
    if not value or storage.is_uri(str(value)) or not os.path.exists(str(value)):
        return value
    path = os.path.abspath(str(value))
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, n) for d, _, names in os.walk(path) for n in names)
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        key = (f, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key not in _CONTENT_HASHES:
            _CONTENT_HASHES[key] = file_sha256(f)
        h.update(f"{os.path.relpath(f, path)}\t{_CONTENT_HASHES[key]}\n".encode())
    return {"sha256": h.hexdigest()}


def existing_state(directory: str, identity: dict[str, Any], json_name: str) -> tuple[str, str]:
    """``(state, reason)`` of a run directory (an expert's or the router's).

    ``finished``: the JSON parses, holds what reuse needs, describes this identity, and the
    weights match the JSON's ``weights_sha256`` (an older export without one: the safetensors
    file is whole). ``corrupt`` (``reason`` says why, in one line): the JSON or the weights are
    damaged, but the directory holds a run of its own (``checkpoint_*``: Ray Train's, or the
    task executor's ``checkpoint_task``): the launcher trains it again (resuming from the last
    checkpoint). ``partial``: checkpoints only; ``missing``: nothing usable.

    Raises :class:`ExpertRejected` (one line) when the JSON describes another identity (a run
    trained against another VAE, or in the other space: :func:`hdd_ray.latents.check_same_vae`),
    or when a damaged expert has no run here (a contributed expert is never repaired silently).
    """
    from hdd_ray.latents import check_same_vae

    desc_path = storage.join(directory, json_name)
    own_run = any(n.startswith("checkpoint_") for n in storage.listdir(directory))
    if storage.exists(desc_path) and storage.exists(storage.join(directory, WEIGHTS)):
        desc, problem = read_description(desc_path)
        if desc is not None:
            theirs = desc["identity"]
            check_same_vae([("the campaign", identity.get("latents")),
                            (directory, theirs.get("latents"))], ExpertRejected,
                           message="{name} was trained against {other}, the campaign uses "
                                   "{first}: rejected")
            diffs = [f"{k}: {theirs.get(k)!r} here vs {v!r} in the campaign"
                     for k, v in identity.items() if theirs.get(k) != v]
            if diffs:
                raise ExpertRejected(
                    f"{directory} does not match the campaign ({'; '.join(diffs[:3])})")
            problem = weights_problem(directory, desc, json_name)
        if not problem:
            return "finished", ""
        if not own_run:
            raise ExpertRejected(f"{directory}: {problem}; rejected (a contributed run is never "
                                 "repaired: train it again or remove it)")
        return "corrupt", f"{problem}: training again"
    if own_run:
        return "partial", ""
    return "missing", ""


#: what a finished run's JSON must hold to be reused
REQUIRED_KEYS = ("identity", "steps")


def read_description(path: str) -> tuple[dict[str, Any] | None, str]:
    """``(expert.json / router.json as a dict, "")``, or ``(None, one-line reason)`` when it is
    unreadable, not JSON, not an object or lacks a key reuse needs."""
    name = os.path.basename(str(path).rstrip("/"))
    try:
        desc = storage.read_json(path)
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"{name} is unreadable ({str(exc).splitlines()[0][:120]})"
    if not isinstance(desc, dict):
        return None, f"{name} is not a JSON object"
    missing = [k for k in REQUIRED_KEYS if k not in desc]
    if missing:
        return None, f"{name} lacks {', '.join(missing)}"
    if not isinstance(desc["identity"], dict):
        return None, f"{name} has identity of type {type(desc['identity']).__name__}, not an object"
    try:
        int(desc["steps"])
    except (TypeError, ValueError):
        return None, f"{name} has steps={desc['steps']!r}, not a number"
    return desc, ""


def weights_problem(directory: str, desc: dict[str, Any], json_name: str = EXPERT_JSON) -> str:
    """``""`` when ``weights.safetensors`` is what ``desc`` says, else a one-line reason.

    With ``weights_sha256`` (every export since checksums): the file's SHA-256 must equal it
    (:func:`verified_sha256`: hashed once per file version, not on every launch).
    Without (older exports): the safetensors header must parse and the file must be as long
    as the header says (catches truncation and garbage, not a same-length substitution).
    """
    path = storage.join(directory, WEIGHTS)
    expected = desc.get("weights_sha256")
    if expected:
        actual = verified_sha256(directory)
        if actual != expected:
            return (f"{WEIGHTS} checksum mismatch (sha256 {actual[:12]}..., {json_name} records "
                    f"{str(expected)[:12]}...)")
        return ""
    return safetensors_problem(storage.read_bytes(path))


#: a run directory's record of its weights' SHA-256 at a file signature (size, mtime, ...)
VERIFIED_FILE = ".weights_verified.json"
_VERIFIED: dict[tuple[str, tuple], str] = {}
#: a file changed less than this long ago is hashed without caching: a rewrite within the
#: file system's timestamp granularity could keep its size and times ("racy" signatures)
SETTLED_NS = 2_000_000_000


def _file_signature(path: str) -> dict[str, int] | None:
    """What changes when a file is rewritten: size, mtime (and, on local disks, inode and
    ctime, which ``cp -p`` / ``os.utime`` cannot set back); ``None`` without an mtime."""
    fs, inner = storage.resolve(path)
    if not storage.is_uri(path):
        st = os.stat(inner)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
                "ctime_ns": st.st_ctime_ns}
    info = fs.get_file_info(inner)
    if info.mtime_ns is None or info.size is None:
        return None
    return {"size": int(info.size), "mtime_ns": int(info.mtime_ns)}


def verified_sha256(directory: str) -> str:
    """SHA-256 of ``<directory>/weights.safetensors``, read in full once per file version.

    Cached per (path, signature) in this process and in ``<directory>/.weights_verified.json``
    (signature + sha, for later launches); a file whose size or mtime changed is hashed again,
    and one without an mtime (some object stores), or changed within :data:`SETTLED_NS`,
    every time. Writing the record is best effort (a read-only directory is hashed every
    launch).
    """
    path = storage.join(directory, WEIGHTS)
    try:
        sig = _file_signature(path)
    except OSError:
        sig = None
    if sig is None or time.time_ns() - max(sig["mtime_ns"], sig.get("ctime_ns", 0)) < SETTLED_NS:
        return file_sha256(path)
    key = (path, tuple(sorted(sig.items())))
    if key in _VERIFIED:
        return _VERIFIED[key]
    record_path = storage.join(directory, VERIFIED_FILE)
    try:
        record = storage.read_json(record_path) if storage.exists(record_path) else None
    except (OSError, ValueError):
        record = None
    if (isinstance(record, dict) and record.get("signature") == sig
            and isinstance(record.get("sha256"), str)):
        sha = record["sha256"]
    else:
        sha = file_sha256(path)
        try:
            storage.write_json(record_path, {"signature": sig, "sha256": sha})
        except OSError:
            pass
    _VERIFIED[key] = sha
    return sha


def record_verified(directory: str, sha: str) -> None:
    """Write the verified-hash record of weights this process has just written and hashed, so
    that reusing the run later reads nothing in full and writes nothing (best effort)."""
    path = storage.join(directory, WEIGHTS)
    try:
        sig = _file_signature(path)
        if sig is not None:
            storage.write_json(storage.join(directory, VERIFIED_FILE),
                               {"signature": sig, "sha256": sha})
            _VERIFIED[(path, tuple(sorted(sig.items())))] = sha
    except OSError:
        pass


def safetensors_problem(data: bytes) -> str:
    """``""`` for a whole safetensors file, else a one-line reason (header, length)."""
    if len(data) < 8:
        return f"{WEIGHTS} is truncated ({len(data)} bytes)"
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        return f"{WEIGHTS} is truncated or not safetensors (header of {n} bytes, file of {len(data)})"
    try:
        header = json.loads(data[8:8 + n])
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, TypeError, KeyError, AttributeError):
        return f"{WEIGHTS} has an unreadable safetensors header"
    if 8 + n + end != len(data):
        return f"{WEIGHTS} is truncated ({len(data)} bytes, its header says {8 + n + end})"
    return ""
