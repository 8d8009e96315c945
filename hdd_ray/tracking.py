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
* :class:`MetricBuffer`: what a Ray Train worker logs (buffered, flushed at checkpoints).
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from hdd_ray.storage import is_uri

log = logging.getLogger(__name__)

# MLflow's log_batch limits per call (1000 entities in all)
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 800, 100, 100
_PARAM_CHARS = 500
PARENT_TAG = "mlflow.parentRunId"

# the run of the innermost open :func:`run` context in this thread (the default parent)
_enclosing: contextvars.ContextVar[str | None] = contextvars.ContextVar("_enclosing", default=None)


def tracking_uri(cfg: Any) -> str:
    """The MLflow tracking URI of a campaign config."""
    if cfg.tracking.uri:
        return str(cfg.tracking.uri)
    if is_uri(cfg.root):
        raise ValueError(
            f"tracking.uri=None: set it (e.g. http://127.0.0.1:5000) when root={cfg.root!r} is remote"
        )
    root = os.path.abspath(cfg.root)
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{os.path.join(root, 'mlflow.db')}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b": v}`` for MLflow params (values stringified, 500 chars max)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:_PARAM_CHARS]
    return out


def _now_ms() -> int:
    return int(time.time() * 1000)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class TrackedRun:
    """One MLflow run, written through the client API (safe to use from several threads)."""

    def __init__(self, client: Any, run_id: str, uri: str) -> None:
        self.client, self.run_id, self.uri = client, run_id, uri

    def worker_target(self) -> dict[str, str]:
        """What a Ray worker needs to log to this run (plain data: it travels in a config)."""
        return {"uri": self.uri, "run_id": self.run_id}

    def log(self, metrics: dict[str, float] | None = None, params: dict[str, Any] | None = None,
            tags: dict[str, Any] | None = None, step: int = 0) -> None:
        """Metrics (all at ``step``), params and tags in as few ``log_batch`` calls as MLflow
        allows. Params already on the run are left as they are (MLflow params cannot change:
        a resumed run keeps its first values)."""
        from mlflow.entities import Metric, Param, RunTag

        now = _now_ms()
        metric_list = [Metric(k, float(v), now, int(step)) for k, v in (metrics or {}).items()]
        param_list: list[Any] = []
        if params:
            existing = self.client.get_run(self.run_id).data.params
            param_list = [Param(k, str(v)[:_PARAM_CHARS]) for k, v in params.items()
                          if k not in existing]
        tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        self._batch(metric_list, param_list, tag_list)

    def log_curve(self, key: str, points: Iterable[tuple[int, float]]) -> None:
        """One metric at several steps (e.g. a curve against t)."""
        from mlflow.entities import Metric

        now = _now_ms()
        self._batch([Metric(key, float(v), now, int(s)) for s, v in points], [], [])

    def _batch(self, metrics: list[Any], params: list[Any], tags: list[Any]) -> None:
        while metrics or params or tags:
            self.client.log_batch(self.run_id, metrics=metrics[:_MAX_METRICS],
                                  params=params[:_MAX_PARAMS], tags=tags[:_MAX_TAGS])
            metrics, params = metrics[_MAX_METRICS:], params[_MAX_PARAMS:]
            tags = tags[_MAX_TAGS:]

    def log_image(self, image: Any, *, key: str | None = None,
                  artifact_file: str | None = None) -> None:
        """A PIL image or PNG bytes: under ``images/`` as ``key`` (a step series), or as the
        artifact ``artifact_file``."""
        if isinstance(image, bytes | bytearray):
            from PIL import Image

            image = Image.open(io.BytesIO(image))
        self.client.log_image(self.run_id, image, key=key, artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact."""
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, d: dict[str, Any], artifact_file: str) -> None:
        """A JSON (or YAML, by suffix) artifact."""
        self.client.log_dict(self.run_id, d, artifact_file)

    def finish(self, ok: bool = True) -> None:
        """Mark the run FINISHED (or FAILED)."""
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class Experiment:
    """A campaign's MLflow store and experiment (``tracking.experiment``)."""

    def __init__(self, cfg: Any) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(cfg)
        self.client = MlflowClient(self.uri)
        self.experiment_id = _experiment_id(self.client, cfg.tracking.experiment)
        self.campaign = cfg.name

    def run(self, run_id: str) -> TrackedRun:
        """An existing run of this store."""
        return TrackedRun(self.client, run_id, self.uri)

    def create(self, name: str, tags: dict[str, str], parent: str | None = None,
               params: dict[str, Any] | None = None) -> TrackedRun:
        """A new run named ``name``, tagged with the campaign and its parent (``parent``, else
        the enclosing :func:`run` context's)."""
        all_tags = {"campaign": self.campaign, **tags}
        parent = parent or _enclosing.get()
        if parent:
            all_tags[PARENT_TAG] = parent
        created = self.run(self.client.create_run(self.experiment_id, run_name=name,
                                                  tags=all_tags).info.run_id)
        if params:
            created.log(params=params)
        return created

    def find_or_create(self, name: str, tags: dict[str, str], key: Sequence[str],
                       parent: str | None = None,
                       params: dict[str, Any] | None = None) -> TrackedRun:
        """The run whose ``key`` tags equal ``tags``'s (a resumed expert or a restarted trial
        continues it), else a new one as :meth:`create` makes it (params logged then only)."""
        query = " and ".join(f"tags.{k} = '{tags[k]}'" for k in key)
        found = self.client.search_runs([self.experiment_id], query, max_results=1)
        if found:
            return self.run(found[0].info.run_id)
        return self.create(name, tags, parent=parent, params=params)


def _experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name``, created if missing (safe when two processes race)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # created meanwhile by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise ValueError(f"tracking.experiment={name!r} is deleted in the MLflow store: "
                         "restore it or choose another name")
    return exp.experiment_id


def connect(cfg: Any) -> Experiment | None:
    """The campaign's experiment, or ``None`` when ``tracking.enabled`` is false."""
    return Experiment(cfg) if cfg.tracking.enabled else None


def setup(cfg: Any) -> str:
    """The id of the campaign's experiment (created if missing)."""
    return Experiment(cfg).experiment_id


@contextlib.contextmanager
def run(cfg: Any, name: str, tags: dict[str, str] | None = None,
        parent_run_id: str | None = None) -> Iterator[TrackedRun | None]:
    """A new run of the campaign for the duration of the block; ``None`` when disabled.

    Its parent is ``parent_run_id``, else the enclosing :func:`run` context's (a stage inside
    the campaign run). It ends FINISHED, or FAILED when the block raises.
    """
    exp = connect(cfg)
    if exp is None:
        yield None
        return
    active = exp.create(name, tags or {}, parent=parent_run_id)
    token = _enclosing.set(active.run_id)
    try:
        yield active
    except BaseException:
        active.finish(ok=False)
        raise
    finally:
        _enclosing.reset(token)
    active.finish()


class MetricBuffer:
    """Metrics of one run logged from a Ray worker, buffered (flushed at checkpoints, so a
    sqlite store sees few writes). Logging never stops training: a failure is a warning.

    ``target`` is :meth:`TrackedRun.worker_target`'s dict, or ``None`` (nothing is logged).
    """

    def __init__(self, target: dict[str, str] | None) -> None:
        self.run: TrackedRun | None = None
        self.buffer: list[tuple[str, float, int, int]] = []
        if target and target.get("run_id"):
            from mlflow.tracking import MlflowClient

            self.run = TrackedRun(MlflowClient(tracking_uri=target["uri"]), target["run_id"],
                                  target["uri"])

    def log(self, key: str, value: float, step: int) -> None:
        """Buffer ``key = value`` at ``step``."""
        if self.run is not None:
            self.buffer.append((key, float(value), _now_ms(), int(step)))

    def flush(self) -> None:
        """Send what is buffered."""
        if self.run is None or not self.buffer:
            return
        from mlflow.entities import Metric

        metrics = [Metric(k, v, ts, s) for k, v, ts, s in self.buffer]
        self.buffer = []
        warn_on_failure(self.run._batch, metrics, [], [])


def warn_on_failure(fn: Any, *args: Any, **kwargs: Any) -> None:
    """``fn(*args, **kwargs)``, logging a one-line warning instead of raising (tracking must
    never stop training)."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        log.warning("MLflow logging failed: %s", _first_line(exc)[:300])
