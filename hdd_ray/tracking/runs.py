"""The training launcher's MLflow bookkeeping: one run per expert and per router, found or
created from the launcher's threads (:class:`RunTracker`).

A run is keyed by its name (the ``run_key`` tag), so a resumed expert continues its curve. When
MLflow is down at the start (or a run cannot be created), nothing stops: the run's worker logs
to the outbox under its key (:meth:`RunTracker.worker_target`), and so do its final metrics
(:meth:`RunTracker.finish`); :meth:`RunTracker.sync` delivers the outbox at the start and the
end of a launch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from hdd_ray.errors import first_line
from hdd_ray.tracking.client import (
    connect,
    flatten,
    now_ms,
    tracking_uri,
    warn_on_failure,
)
from hdd_ray.tracking.delivery import sync_outbox
from hdd_ray.tracking.outbox import Outbox

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig
    from hdd_ray.progress import RunStatus

log = logging.getLogger(__name__)

__all__ = ["RunTracker"]


class RunTracker:
    """The launcher's MLflow bookkeeping: one run per expert / router, created from threads."""

    def __init__(self, cfg: CampaignConfig, parent_run_id: str | None) -> None:
        self.enabled = bool(cfg.tracking.enabled)
        # an outage gives None (one warning line); writes then go to the campaign's outbox
        self.exp = connect(cfg)
        self.parent = parent_run_id
        self.cfg = cfg
        self.outbox = Outbox(cfg.root) if self.enabled else None
        self.uri = self.exp.uri if self.exp is not None else (
            tracking_uri(cfg) if self.enabled else None)

    def run_for(self, name: str, tags: dict[str, str]) -> str | None:
        """The run of this expert/router: reused if one exists (resume continues its curve).
        ``None`` when tracking is off or MLflow is unreachable (one warning line)."""
        if self.exp is None:
            return None
        try:
            return self.exp.find_or_create(name, {"run_key": name, **tags}, key=("run_key",),
                                           parent=self.parent).run_id
        except Exception as exc:
            log.warning("%s: MLflow unreachable (%s): its metrics go to the outbox", name,
                        first_line(exc)[:300])
            return None

    def sync(self) -> None:
        """Deliver the campaign's MLflow outbox (:func:`hdd_ray.tracking.sync_outbox`); an
        outage leaves it for the next launch or ``jobs/sync_mlflow.py``. Never raises. When
        MLflow was already found down at the start, no second connection is tried."""
        if not self.enabled:
            return
        try:
            if self.exp is None:  # down when this launch began: count, do not connect again
                delivered, left = 0, len(self.outbox.records()) if self.outbox else 0
            else:
                delivered, left = sync_outbox(self.cfg)
        except Exception as exc:
            log.warning("MLflow outbox not delivered: %s", first_line(exc)[:300])
            return
        if delivered or left:
            log.warning("MLflow outbox: %d records delivered, %d left%s", delivered, left,
                        " (python jobs/sync_mlflow.py delivers them)" if left else "")

    def worker_target(self, name: str, tags: dict[str, str],
                      run_id: str | None) -> dict[str, Any] | None:
        """What the run's rank 0 logs to (:class:`hdd_ray.tracking.MetricBuffer`): its run,
        or, when MLflow could not create it, the key the outbox creates it by later."""
        if not self.enabled or self.outbox is None:
            return None
        return {"uri": self.uri, "run_id": run_id, "outbox": self.outbox.directory,
                "run_key": name, "run_name": name, "tags": tags, "parent": self.parent}

    def log_curve(self, run_id: str | None, key: str, curve: dict[str, float] | None) -> None:
        """A curve against t (``{"0.05": value, ...}``) as metric ``key`` at step ``100 t``."""
        if self.exp is None or run_id is None or not curve:
            return
        self.exp.run(run_id).log_curve(key, [
            (int(round(float(t) * 100)), value) for t, value in curve.items()])

    def log_image(self, run_id: str | None, png: bytes, artifact_file: str) -> None:
        """PNG bytes as the artifact ``artifact_file`` of the run (nothing without one)."""
        if self.exp is None or run_id is None:
            return
        self.exp.run(run_id).log_image(png, artifact_file=artifact_file)

    def finish(self, run_id: str | None, status: RunStatus, params: dict[str, Any],
               name: str = "", run_tags: dict[str, str] | None = None) -> None:
        """The run's final metrics, params, status tags and end; never raises. Without a run
        (MLflow was down when it started) they go to the outbox under the run's key."""
        if not self.enabled:
            return
        metrics = {"steps": status.steps, "skipped_samples": status.skipped_samples}
        if status.final_loss is not None and status.final_loss == status.final_loss:
            metrics["final_loss"] = float(status.final_loss)
        if status.wall_time_s is not None:
            metrics["wall_time_s"] = float(status.wall_time_s)
        tags = {"status": status.status, "node": status.node or ""}
        if status.reason:
            tags["reason"] = status.reason[:500]
        if run_id is not None and self.exp is not None:
            run = self.exp.run(run_id)  # failed writes go to the outbox (tracking.TrackedRun)
            warn_on_failure(run.log, metrics=metrics, params=flatten(params), tags=tags)
            warn_on_failure(run.finish, ok=status.ok)
            return
        if self.outbox is None or not name:
            return
        now = now_ms()
        record = {"uri": self.uri, "run_id": run_id, "run_key": name, "run_name": name,
                  "tags": run_tags or {}, "parent": self.parent, "run_tags": tags,
                  "metrics": [[k, float(v), now, 0] for k, v in metrics.items()],
                  "params": flatten(params), "status": "FINISHED" if status.ok else "FAILED"}
        warn_on_failure(self.outbox.put, record)
