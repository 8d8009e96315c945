"""What a training worker logs to MLflow: :class:`MetricBuffer`, buffered and sent in the
background at checkpoints, never blocking one; kept in the campaign's outbox when MLflow is down."""

from __future__ import annotations

import logging
import threading
from typing import Any

from hdd_ray.errors import first_line
from hdd_ray.tracking.client import TrackedRun, fail_fast, now_ms
from hdd_ray.tracking.outbox import Outbox

log = logging.getLogger(__name__)

__all__ = ["MetricBuffer"]


class MetricBuffer:
    """Metrics of one run logged from a Ray worker: buffered, and sent in a background thread
    when :meth:`flush` is called (at checkpoints), so neither a checkpoint nor a drain ever
    waits on MLflow. A batch that fails stays buffered and goes with the next flush;
    :meth:`close` (the end of the loop) makes a last bounded attempt and keeps the rest in the
    campaign's outbox (:func:`hdd_ray.tracking.delivery.sync_outbox` delivers it). :meth:`persist` writes the buffer to
    the outbox at once (a drain: the node may go away).

    ``target``: :meth:`TrackedRun.worker_target`'s dict, plus, for a run MLflow could not
    create when the launcher asked, ``run_id=None`` with ``run_key`` / ``run_name`` /
    ``tags`` / ``parent`` (the outbox then creates the run later). ``None``: nothing is logged.
    """

    def __init__(self, target: dict[str, Any] | None) -> None:
        self.run: TrackedRun | None = None
        self.buffer: list[tuple[str, float, int, int]] = []
        self.target = dict(target or {})
        self.outbox = Outbox.at(self.target["outbox"]) if self.target.get("outbox") else None
        self.enabled = bool(self.target.get("run_id") or self.outbox)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._inflight: list[tuple[str, float, int, int]] = []  # the batch being sent
        self.failures = 0
        if self.target.get("run_id"):
            from mlflow.tracking import MlflowClient

            fail_fast()
            self.run = TrackedRun(MlflowClient(tracking_uri=self.target["uri"]),
                                  self.target["run_id"], self.target["uri"])

    def log(self, key: str, value: float, step: int) -> None:
        """Buffer ``key = value`` at ``step``."""
        if self.enabled:
            with self._lock:
                self.buffer.append((key, float(value), now_ms(), int(step)))

    def flush(self) -> None:
        """Send what is buffered in the background; returns at once (a send still in flight:
        the new points wait for the next flush)."""
        if self.run is None or (self._thread is not None and self._thread.is_alive()):
            return
        with self._lock:
            batch, self.buffer = self.buffer, []
            self._inflight = batch
        if not batch:
            return
        self._thread = threading.Thread(target=self._send, args=(batch,), daemon=True,
                                        name="mlflow-metrics")
        self._thread.start()

    def _send(self, batch: list[tuple[str, float, int, int]]) -> bool:
        from mlflow.entities import Metric

        try:
            self.run.log_batch([Metric(k, v, ts, s) for k, v, ts, s in batch], [], [])
            with self._lock:
                self._inflight = []
            return True
        except Exception as exc:
            with self._lock:  # kept, in order, for the next attempt
                if self._inflight is batch:
                    self.buffer[:0] = batch
                self._inflight = []
            self.failures += 1
            if self.failures == 1:
                log.warning("MLflow logging failed (%s): metrics stay buffered",
                            first_line(exc)[:200])
            return False

    def wait(self, timeout: float | None = None) -> None:
        """Wait (at most ``timeout`` s) for a send in flight."""
        if self._thread is not None:
            self._thread.join(timeout)

    def persist(self) -> str | None:
        """Write what is buffered, and a batch still being sent, to the outbox now (path of the
        record, None if nothing). At least once: a send that succeeds after this duplicates
        its points in the outbox (MLflow keeps one of identical points)."""
        if self.outbox is None:
            return None
        with self._lock:
            batch, self.buffer = self._inflight + self.buffer, []
            self._inflight = []  # the sender, should it fail now, keeps nothing twice
        if not batch:
            return None
        record = {key: self.target.get(key) for key in ("uri", "run_id", "run_key", "run_name",
                                                        "tags", "parent")}
        return self.outbox.put({**record, "metrics": [list(m) for m in batch]})

    def close(self, timeout: float = 5.0) -> None:
        """The end of a run: wait for a send in flight, try once more, keep the rest in the
        outbox (or drop it with a warning when there is none). Bounded by ``timeout`` plus
        one fail-fast MLflow call."""
        self.wait(timeout)
        if self.run is not None and self.buffer and not (self._thread and self._thread.is_alive()):
            with self._lock:
                batch, self.buffer = self.buffer, []
                self._inflight = batch
            self._send(batch)  # a failure puts it back into the buffer
        if self.buffer or self._inflight:
            if self.outbox is not None:
                n = len(self.buffer) + len(self._inflight)
                log.warning("MLflow unreachable: %d metric points kept in %s", n, self.persist())
            else:
                log.warning("MLflow unreachable: %d metric points dropped", len(self.buffer))
                self.buffer = []
