"""The campaign's MLflow outbox: writes MLflow could not take, kept as JSON records in
``<root>/mlflow_outbox/`` until :func:`hdd_ray.tracking.delivery.sync_outbox` delivers them."""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from hdd_ray import storage

__all__ = ["OUTBOX_DIR", "Outbox"]

#: the campaign root's folder of undelivered MLflow writes
OUTBOX_DIR = "mlflow_outbox"


class Outbox:
    """Undelivered MLflow writes of a campaign: one JSON record per failed write in
    ``<root>/mlflow_outbox/`` (any storage: local disk or a bucket), delivered in order by
    :func:`hdd_ray.tracking.delivery.sync_outbox`.

    A record names its run by ``run_id``, or, for a run MLflow could not create at the time,
    by ``run_key`` (the launcher's key tag), ``run_name``, ``tags`` and ``parent``; it holds
    ``metrics`` (``[key, value, timestamp_ms, step]``), ``params``, ``tags`` and/or the
    run's final ``status``.
    """

    def __init__(self, root: str) -> None:
        self.directory = storage.join(str(root), OUTBOX_DIR)

    @classmethod
    def at(cls, directory: str) -> Outbox:
        """The outbox in ``directory`` itself."""
        box = cls.__new__(cls)
        box.directory = directory
        return box

    def put(self, record: dict[str, Any]) -> str:
        """Keep one record; returns its path."""
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        path = storage.join(self.directory, name)
        storage.write_json(path, {"version": 1, **record})
        return path

    def records(self) -> list[str]:
        """Paths of the kept records, oldest first."""
        return [storage.join(self.directory, n) for n in storage.listdir(self.directory)
                if n.endswith(".json")]
