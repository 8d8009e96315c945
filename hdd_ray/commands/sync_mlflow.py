"""Deliver MLflow writes kept during an outage (the campaign root's ``mlflow_outbox/``).

When the tracking server cannot be reached, workers and the launcher keep metrics, params,
status tags and run ends in ``<root>/mlflow_outbox/``; every launch delivers them at its start
and end. Run this once the server is back to deliver them now:

    python jobs/sync_mlflow.py root=/abs/path/runs/demo tracking.uri=http://127.0.0.1:5000

Prints how many records were delivered and how many are left; exit status 1 when some are
left (the server is still unreachable), 2 with one line `error: ...` for bad options.
"""

from __future__ import annotations

import sys

from hdd_ray.cli import parse_job_args


def main(argv: list[str] | None = None) -> int:
    """Deliver the outbox; returns the exit status."""
    cfg, _ = parse_job_args(__doc__, argv)
    from hdd_ray import tracking

    if not cfg.tracking.enabled:
        print("error: tracking.enabled=false: nothing to deliver to", file=sys.stderr)
        return 2
    try:
        delivered, left = tracking.sync_outbox(cfg)
    except ValueError as exc:  # configuration (e.g. a remote root without tracking.uri)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"delivered {delivered} MLflow records, {left} left in "
          f"{tracking.Outbox(cfg.root).directory}")
    return 1 if left else 0


if __name__ == "__main__":
    raise SystemExit(main())
