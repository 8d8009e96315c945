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

**Outages.** MLflow is never on the critical path. HTTP calls fail fast
(:data:`FAIL_FAST_ENV`, instead of MLflow's ~4 min of retries); :func:`connect` and :func:`run`
give ``None`` (no tracking) when the server cannot be reached; a run's writes that fail
(metrics, params, tags, its end) are kept in the campaign root's outbox
(``<root>/mlflow_outbox/``, :class:`Outbox`) and delivered by :func:`sync_outbox`, which the
launcher calls at its start and end and ``python jobs/sync_mlflow.py`` runs by hand. Only
artifacts (images, tables) of a run written during an outage are lost, with a warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from hdd_ray import storage
from hdd_ray.storage import is_uri

log = logging.getLogger(__name__)

# MLflow's log_batch limits per call (1000 entities in all)
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 800, 100, 100
_PARAM_CHARS = 500
PARENT_TAG = "mlflow.parentRunId"

#: MLflow HTTP settings that make a call to an unreachable server fail within seconds (its
#: defaults retry for about 4 minutes): set unless the environment sets them already
FAIL_FAST_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
#: the campaign root's folder of undelivered MLflow writes
OUTBOX_DIR = "mlflow_outbox"


def fail_fast() -> None:
    """Apply :data:`FAIL_FAST_ENV` to this process (values already set are kept)."""
    for key, value in FAIL_FAST_ENV.items():
        os.environ.setdefault(key, value)


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
    root = storage.resolve(cfg.root)[1]  # local: absolute, file:// stripped
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


def filter_literal(value: Any) -> str:
    """``value`` as a string literal of an MLflow search filter (quoted so that a quote in it
    cannot end the literal); one-line ``ValueError`` when it holds both kinds of quote."""
    text = str(value)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise ValueError(f"{text!r}: an MLflow tag value may not hold both ' and \"")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class TrackedRun:
    """One MLflow run, written through the client API (safe to use from several threads)."""

    def __init__(self, client: Any, run_id: str, uri: str, outbox: Outbox | None = None) -> None:
        self.client, self.run_id, self.uri, self.outbox = client, run_id, uri, outbox

    def worker_target(self) -> dict[str, Any]:
        """What a Ray worker needs to log to this run (plain data: it travels in a config)."""
        return {"uri": self.uri, "run_id": self.run_id,
                "outbox": self.outbox.directory if self.outbox else None}

    def _keep(self, exc: BaseException, **record: Any) -> None:
        """A write that failed: into the outbox (delivered later), or raised without one."""
        if self.outbox is None:
            raise exc
        path = self.outbox.put({"uri": self.uri, "run_id": self.run_id, **record})
        log.warning("MLflow unreachable (%s): kept in %s", _first_line(exc)[:200], path)

    def log(self, metrics: dict[str, float] | None = None, params: dict[str, Any] | None = None,
            tags: dict[str, Any] | None = None, step: int = 0) -> None:
        """Metrics (all at ``step``), params and tags in as few ``log_batch`` calls as MLflow
        allows. Params already on the run are left as they are (MLflow params cannot change:
        a resumed run keeps its first values)."""
        from mlflow.entities import Metric, Param, RunTag

        now = _now_ms()
        metric_list = [Metric(k, float(v), now, int(step)) for k, v in (metrics or {}).items()]
        try:
            param_list: list[Any] = []
            if params:
                existing = self.client.get_run(self.run_id).data.params
                param_list = [Param(k, str(v)[:_PARAM_CHARS]) for k, v in params.items()
                              if k not in existing]
            tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
            self._batch(metric_list, param_list, tag_list)
        except Exception as exc:
            self._keep(exc, metrics=[[m.key, m.value, m.timestamp, m.step] for m in metric_list],
                       params={k: str(v)[:_PARAM_CHARS] for k, v in (params or {}).items()},
                       tags={k: str(v) for k, v in (tags or {}).items()})

    def log_curve(self, key: str, points: Iterable[tuple[int, float]]) -> None:
        """One metric at several steps (e.g. a curve against t)."""
        from mlflow.entities import Metric

        now = _now_ms()
        metrics = [Metric(key, float(v), now, int(s)) for s, v in points]
        try:
            self._batch(metrics, [], [])
        except Exception as exc:
            self._keep(exc, metrics=[[m.key, m.value, m.timestamp, m.step] for m in metrics])

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
        self._artifact(self.client.log_image, self.run_id, image, key=key,
                       artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact."""
        self._artifact(self.client.log_text, self.run_id, text, artifact_file)

    def log_dict(self, d: dict[str, Any], artifact_file: str) -> None:
        """A JSON (or YAML, by suffix) artifact."""
        self._artifact(self.client.log_dict, self.run_id, d, artifact_file)

    def _artifact(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        """An artifact write: with an outbox (an outage must not stop the stage), a failure
        is one warning line and the artifact is not kept."""
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            if self.outbox is None:
                raise
            log.warning("MLflow unreachable (%s): artifact of run %s not logged",
                        _first_line(exc)[:200], self.run_id)

    def finish(self, ok: bool = True) -> None:
        """Mark the run FINISHED (or FAILED)."""
        status = "FINISHED" if ok else "FAILED"
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as exc:
            self._keep(exc, status=status)


class Experiment:
    """A campaign's MLflow store and experiment (``tracking.experiment``)."""

    def __init__(self, cfg: Any) -> None:
        from mlflow.tracking import MlflowClient

        fail_fast()
        self.uri = tracking_uri(cfg)
        self.outbox = Outbox(cfg.root)
        self.client = MlflowClient(self.uri)
        self.experiment_id = _experiment_id(self.client, cfg.tracking.experiment,
                                            artifact_location(cfg))
        self.campaign = cfg.name

    def run(self, run_id: str) -> TrackedRun:
        """An existing run of this store (writes that fail go to the campaign's outbox)."""
        return TrackedRun(self.client, run_id, self.uri, self.outbox)

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
        query = " and ".join(f"tags.{k} = {filter_literal(tags[k])}" for k in key)
        found = self.client.search_runs([self.experiment_id], query, max_results=1)
        if found:
            return self.run(found[0].info.run_id)
        return self.create(name, tags, parent=parent, params=params)


def artifact_location(cfg: Any) -> str | None:
    """Where a new experiment keeps its artifacts: ``<root>/mlartifacts`` (a file URI for a
    local root), or ``None`` (the server's artifact store) when ``tracking.uri`` is a server.

    MLflow's default for a new experiment on a sqlite store is ``./mlruns`` of whichever
    process created it: outside the campaign.
    """
    uri = str(cfg.tracking.uri or "")
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    if is_uri(cfg.root):
        return cfg.root.rstrip("/") + "/mlartifacts"
    from pathlib import Path

    return Path(storage.resolve(cfg.root)[1], "mlartifacts").as_uri()  # file:// stripped


_warned_locations: set[tuple[str, str]] = set()


def _experiment_id(client: Any, name: str, location: str | None = None) -> str:
    """The id of experiment ``name``, created if missing (safe when two processes race) with
    its artifacts at ``location``. An existing experiment whose artifacts live elsewhere keeps
    working; a warning says so once per process."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None and location and not _same_location(exp.artifact_location, location):
        if (name, location) not in _warned_locations:
            _warned_locations.add((name, location))
            log.warning("MLflow experiment %r keeps its artifacts at %s, outside the campaign "
                        "(%s): use a new tracking.experiment name to keep them with it",
                        name, exp.artifact_location, location)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise ValueError(f"tracking.experiment={name!r} is deleted in the MLflow store: "
                         "restore it or choose another name")
    return exp.experiment_id


def _same_location(actual: str | None, wanted: str) -> bool:
    def norm(u: str) -> str:
        return u[len("file://"):] if u.startswith("file://") else u

    return bool(actual) and norm(str(actual)).rstrip("/") == norm(wanted).rstrip("/")


def log_config(run: TrackedRun | None, cfg: Any) -> None:
    """The resolved config on ``run``: ``config.yaml`` as an artifact and flattened params."""
    if run is None:
        return
    from hdd_ray.config import to_dict, to_yaml

    warn_on_failure(run.log_text, to_yaml(cfg), "config.yaml")
    warn_on_failure(run.log, params=flatten(to_dict(cfg)))


def connect(cfg: Any) -> Experiment | None:
    """The campaign's experiment, or ``None`` when ``tracking.enabled`` is false or the
    tracking server cannot be reached (one warning line: an outage never stops a stage).

    Configuration problems (a remote root without ``tracking.uri``, a deleted experiment)
    still raise ``ValueError``.
    """
    if not cfg.tracking.enabled:
        return None
    try:
        return Experiment(cfg)
    except ValueError:
        raise
    except Exception as exc:
        log.warning("MLflow unreachable at %s (%s): continuing without tracking",
                    cfg.tracking.uri or "the campaign's sqlite store", _first_line(exc)[:200])
        return None


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
    active = None
    if exp is not None:
        try:
            active = exp.create(name, tags or {}, parent=parent_run_id)
        except Exception as exc:
            log.warning("MLflow unreachable (%s): run %r not tracked", _first_line(exc)[:200],
                        name)
    if active is None:
        yield None
        return
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
    """Metrics of one run logged from a Ray worker: buffered, and sent in a background thread
    when :meth:`flush` is called (at checkpoints), so neither a checkpoint nor a drain ever
    waits on MLflow. A batch that fails stays buffered and goes with the next flush;
    :meth:`close` (the end of the loop) makes a last bounded attempt and keeps the rest in the
    campaign's outbox (:func:`sync_outbox` delivers it). :meth:`persist` writes the buffer to
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
                self.buffer.append((key, float(value), _now_ms(), int(step)))

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
            self.run._batch([Metric(k, v, ts, s) for k, v, ts, s in batch], [], [])
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
                            _first_line(exc)[:200])
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


# ------------------------------------------------------------------------------------- outbox


class Outbox:
    """Undelivered MLflow writes of a campaign: one JSON record per failed write in
    ``<root>/mlflow_outbox/`` (any storage: local disk or a bucket), delivered in order by
    :func:`sync_outbox`.

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


def sync_outbox(cfg: Any) -> tuple[int, int]:
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
                        _first_line(exc)[:120])
            continue
        try:
            _deliver(exp, record)
        except Exception as exc:
            log.warning("MLflow outbox: delivery failed (%s); %d records left",
                        _first_line(exc)[:200], len(paths) - delivered)
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
    run._batch([Metric(k, float(v), int(ts), int(st)) for k, v, ts, st in record.get("metrics") or []],
               [Param(k, str(v)) for k, v in params.items()],
               [RunTag(k, str(v)) for k, v in tags.items()])
    if record.get("status"):
        exp.client.set_terminated(run_id, record["status"])


def warn_on_failure(fn: Any, *args: Any, **kwargs: Any) -> None:
    """``fn(*args, **kwargs)``, logging a one-line warning instead of raising (tracking must
    never stop training)."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        log.warning("MLflow logging failed: %s", _first_line(exc)[:300])
