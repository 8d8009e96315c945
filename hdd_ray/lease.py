"""One writer per run directory: a lock on local disks, a lease on object stores.

Two launchers on one campaign root (a second ``train_all_experts.py``, a contributor's
``train_expert.py``, a sweep) must never train the same expert at once: each Ray Train
controller prunes checkpoints beyond ``num_to_keep`` on its own, and the weights and
``expert.json`` would go to whoever wrote last. The launcher therefore holds a
:class:`RunLock` on an expert's (or the router's) directory while it trains and exports it.

* **Local disk** (also NFS with working ``flock``): ``fcntl.flock`` on ``<dir>/.writer.lock``.
  The kernel releases it when the process dies, so a crashed launcher never blocks the next.
* **Object stores** (``s3://``, ``gs://``; or ``mode="lease"`` anywhere): a lease object
  ``<dir>/.writer.lease.json`` holding its owner and a heartbeat the holder refreshes every
  ``heartbeat_s``; a lease whose heartbeat is older than ``ttl_s`` is stale (its holder died)
  and may be taken over. Object stores have no atomic create-if-absent through pyarrow, so
  taking a lease writes it, waits ``settle_s`` and reads it back: of two launchers racing,
  the one whose write landed last keeps it and the other sees a foreign owner and backs off.

The holder's description (host, pid, since when) is in the file, so a waiting launcher can say
whom it waits for.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hdd_ray import storage

log = logging.getLogger(__name__)

LOCK_FILE = ".writer.lock"
LEASE_FILE = ".writer.lease.json"

__all__ = ["LEASE_FILE", "LOCK_FILE", "RunLock"]


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another launcher"
    since = time.strftime("%H:%M:%S", time.localtime(float(owner.get("since", 0))))
    return f"another launcher (host {owner.get('host')}, pid {owner.get('pid')}, since {since})"


class RunLock:
    """The one-writer lock of a run directory (see the module docstring).

    ``mode``: ``"auto"`` (``flock`` on local paths, a lease on URIs), ``"flock"`` or
    ``"lease"``. ``ttl_s`` / ``heartbeat_s`` / ``settle_s`` tune the lease.
    """

    def __init__(self, directory: str, mode: str = "auto", ttl_s: float = 120.0,
                 heartbeat_s: float = 20.0, settle_s: float = 1.0) -> None:
        if mode == "auto":
            mode = "lease" if storage.is_uri(directory) else "flock"
        if mode not in ("flock", "lease"):
            raise ValueError(f"RunLock mode={mode!r}: flock or lease")
        self.directory, self.mode = directory, mode
        self.ttl_s, self.heartbeat_s, self.settle_s = ttl_s, heartbeat_s, settle_s
        self.token = uuid.uuid4().hex
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.held = False

    # ------------------------------------------------------------------------------ public

    def try_acquire(self) -> bool:
        """Take the lock if free (or stale); ``True`` when this object now holds it."""
        if self.held:
            return True
        self.held = self._try_flock() if self.mode == "flock" else self._try_lease()
        return self.held

    def holder(self) -> str:
        """Who holds the lock now, in words (for a status line)."""
        try:
            if self.mode == "flock":
                with open(os.path.join(self._local_dir(), LOCK_FILE)) as f:
                    return _describe(json.loads(f.read() or "{}"))
            return _describe(storage.read_json(self._lease_path()))
        except (OSError, ValueError):
            return _describe(None)

    def release(self) -> None:
        """Give the lock back (a no-op when not held)."""
        if not self.held:
            return
        self.held = False
        if self.mode == "flock":
            import fcntl

            assert self._fd is not None
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        try:
            if storage.read_json(self._lease_path()).get("token") == self.token:
                storage.remove(self._lease_path())
        except (OSError, ValueError):
            pass

    @contextmanager
    def hold(self, on_wait: Callable[[str], None] | None = None,
             poll_s: float = 2.0, timeout_s: float | None = None) -> Iterator[bool]:
        """Hold the lock for the block, waiting while another launcher holds it.

        Yields whether it had to wait (the other launcher may have finished the run: check
        again). ``on_wait(holder)`` is called once when waiting starts. Raises
        ``TimeoutError`` after ``timeout_s`` (``None``: wait as long as it takes).
        """
        waited = False
        started = time.time()
        while not self.try_acquire():
            if not waited and on_wait is not None:
                on_wait(self.holder())
            waited = True
            if timeout_s is not None and time.time() - started > timeout_s:
                raise TimeoutError(f"{self.directory}: still held by {self.holder()} "
                                   f"after {timeout_s:.0f} s")
            time.sleep(poll_s)
        try:
            yield waited
        finally:
            self.release()

    # ------------------------------------------------------------------------------ flock

    def _local_dir(self) -> str:
        """The directory on the local disk (a ``file://`` root without its scheme)."""
        return storage.resolve(self.directory)[1]

    def _try_flock(self) -> bool:
        import fcntl

        directory = self._local_dir()
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner()).encode(), 0)
        self._fd = fd
        return True

    # ------------------------------------------------------------------------------ lease

    def _lease_path(self) -> str:
        return storage.join(self.directory, LEASE_FILE)

    def _read_lease(self) -> dict[str, Any] | None:
        try:
            lease = storage.read_json(self._lease_path())
        except (OSError, ValueError):  # absent, or half-written by a crash: free
            return None
        return lease if isinstance(lease, dict) else None

    def _live(self, lease: dict[str, Any] | None) -> bool:
        if not lease:
            return False
        age = time.time() - float(lease.get("heartbeat", 0))
        return age < float(lease.get("ttl_s", self.ttl_s))

    def _write_lease(self, since: float | None = None) -> None:
        owner = _owner()
        if since is not None:
            owner["since"] = since
        storage.write_json(self._lease_path(), {**owner, "token": self.token,
                                                "heartbeat": time.time(), "ttl_s": self.ttl_s})

    def _try_lease(self) -> bool:
        current = self._read_lease()
        if self._live(current) and current.get("token") != self.token:
            return False
        if current and not self._live(current):
            log.warning("%s: taking over a stale lease of %s (no heartbeat for %.0f s)",
                        self.directory, _describe(current),
                        time.time() - float(current.get("heartbeat", 0)))
        self._write_lease()
        time.sleep(self.settle_s)  # a racing launcher's write lands meanwhile, or not
        current = self._read_lease()
        if not current or current.get("token") != self.token:
            return False
        self._stop.clear()
        since = float(current.get("since", time.time()))
        self._beat = threading.Thread(target=self._heartbeat, args=(since,), daemon=True,
                                      name="run-lease-heartbeat")
        self._beat.start()
        return True

    def _heartbeat(self, since: float) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = self._read_lease()
            if current is not None and current.get("token") != self.token:
                log.warning("%s: the lease was taken over by %s", self.directory,
                            _describe(current))
                return
            try:
                self._write_lease(since)
            except OSError as exc:  # a transient store error: the next beat tries again
                log.warning("%s: lease heartbeat failed (%s)", self.directory, exc)

    def stop_heartbeat(self) -> None:
        """Stop refreshing the lease without releasing it (what a crashed holder looks like;
        for tests and for handing a run over on purpose)."""
        self._stop.set()
