"""Delivery of the campaign's MLflow outbox (:class:`hdd_ray.tracking.outbox.Outbox`): what the
launcher runs at its start and end, and ``python jobs/sync_mlflow.py`` by hand."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from hdd_ray import storage
from hdd_ray.errors import first_line
from hdd_ray.tracking.client import Experiment, TrackedRun, connect
from hdd_ray.tracking.outbox import Outbox

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig

log = logging.getLogger(__name__)

__all__ = ["sync_outbox"]


def sync_outbox(cfg: CampaignConfig) -> tuple[int, int]:
    """Deliver the campaign's outbox to its MLflow store: ``(delivered, left)``.

    Stops at the first record that fails (the server is still down); a delivered record is
    deleted. A record without ``run_id`` finds or creates its run by ``run_key``. Never raises
    for an outage; tracking disabled: ``(0, records)``.
    """
    box = Outbox(cfg.root)
    paths = box.records()
    if not paths or not cfg.tracking.enabled:
        return 0, len(paths)
    exp = connect(cfg)
    if exp is None:
        return 0, len(paths)
    delivered = 0
    for path in paths:
        try:
            record = storage.read_json(path)
        except (ValueError, OSError) as exc:
            log.warning("MLflow outbox: %s is unreadable (%s); skipped", path,
                        first_line(exc)[:120])
            continue
        try:
            _deliver(exp, record)
        except Exception as exc:
            log.warning("MLflow outbox: delivery failed (%s); %d records left",
                        first_line(exc)[:200], len(paths) - delivered)
            break
        storage.remove(path)
        delivered += 1
    return delivered, len(paths) - delivered


def _deliver(exp: Experiment, record: dict[str, Any]) -> None:
    """Write one outbox record (raises when MLflow fails: the record is kept)."""
    from mlflow.entities import Metric, Param, RunTag

    run_id = record.get("run_id")
    if not run_id:
        key = record.get("run_key")
        if not key:
            return
        run_id = exp.find_or_create(record.get("run_name") or key,
                                    {**(record.get("tags") or {}), "run_key": key},
                                    key=("run_key",), parent=record.get("parent")).run_id
    run = TrackedRun(exp.client, run_id, exp.uri)  # no outbox: a failure raises
    params = record.get("params") or {}
    if params:
        existing = exp.client.get_run(run_id).data.params
        params = {k: v for k, v in params.items() if k not in existing}
    # the tags of a keyed record are the new run's; the tags to log are under "tags" only
    # when it has a run_id (the launcher's status tags)
    tags = (record.get("tags") or {}) if record.get("run_id") else (record.get("run_tags") or {})
    run.log_batch([Metric(k, float(v), int(ts), int(st)) for k, v, ts, st in record.get("metrics") or []],
               [Param(k, str(v)) for k, v in params.items()],
               [RunTag(k, str(v)) for k, v in tags.items()])
    if record.get("status"):
        exp.client.set_terminated(run_id, record["status"])
