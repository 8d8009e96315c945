"""Deliver MLflow writes kept during an outage (the campaign root's ``mlflow_outbox/``).

A thin wrapper: the job is ``hdd_ray.commands.sync_mlflow`` (``hdd-sync-mlflow`` once the package is
installed), so ``python jobs/sync_mlflow.py ...`` and ``hdd-sync-mlflow ...`` run the same code.
"""

from hdd_ray.commands.sync_mlflow import main

if __name__ == "__main__":
    raise SystemExit(main())
