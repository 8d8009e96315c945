"""MLflow, in one place: one experiment per campaign, one run per stage, expert, trial, mixture.

Everything goes through ``MlflowClient`` (never the fluent ``mlflow.start_run`` stack, which is
not thread-safe: the launcher creates and finishes runs from threads). The tracking URI is
explicit everywhere (Ray workers do not inherit the driver's): the config's ``tracking.uri``,
else a sqlite file in the campaign root (``sqlite:///<root>/mlflow.db``).

* :func:`connect` -> :class:`Experiment` (``None`` when tracking is disabled): finds or creates
  runs (:meth:`Experiment.find_or_create`, keyed by tags, so a resumed expert or a restarted
  trial continues its run).
* :func:`run`: a context for a stage run (campaign, prepare, mixture); runs created inside it,
  in the same thread, are its children unless given another parent.
* :class:`TrackedRun`: log metrics / params / tags in one batch, images, PNG bytes, text and
  dict artifacts; finish.
* :class:`MetricBuffer`: what a Ray Train worker logs (buffered, sent in the background at
  checkpoints, never blocking one).
* :class:`RunTracker`: the training launcher's runs, one per expert and router.

Modules: :mod:`~hdd_ray.tracking.client` (the store, experiments and runs),
:mod:`~hdd_ray.tracking.outbox` (the outbox), :mod:`~hdd_ray.tracking.delivery` (its
delivery), :mod:`~hdd_ray.tracking.metrics` (workers' metric buffers),
:mod:`~hdd_ray.tracking.runs` (the launcher's runs); everything is imported from here.

**Outages.** MLflow is never on the critical path. HTTP calls fail fast
(:data:`FAIL_FAST_ENV`, instead of MLflow's ~4 min of retries); :func:`connect` and :func:`run`
give ``None`` (no tracking) when the server cannot be reached; a run's writes that fail
(metrics, params, tags, its end) are kept in the campaign root's outbox
(``<root>/mlflow_outbox/``, :class:`Outbox`) and delivered by :func:`sync_outbox`, which the
launcher calls at its start and end and ``python jobs/sync_mlflow.py`` runs by hand. Only
artifacts (images, tables) of a run written during an outage are lost, with a warning.
"""

from hdd_ray.tracking.client import (
    FAIL_FAST_ENV,
    PARENT_TAG,
    Experiment,
    TrackedRun,
    artifact_location,
    connect,
    fail_fast,
    filter_literal,
    flatten,
    log_config,
    run,
    tracking_uri,
    warn_on_failure,
)
from hdd_ray.tracking.delivery import sync_outbox
from hdd_ray.tracking.metrics import MetricBuffer
from hdd_ray.tracking.outbox import OUTBOX_DIR, Outbox
from hdd_ray.tracking.runs import RunTracker

__all__ = ["FAIL_FAST_ENV", "OUTBOX_DIR", "PARENT_TAG", "Experiment", "MetricBuffer", "Outbox",
           "RunTracker", "TrackedRun", "artifact_location", "connect", "fail_fast",
           "filter_literal", "flatten", "log_config", "run", "sync_outbox", "tracking_uri",
           "warn_on_failure"]
