"""MLflow's client side: the store and experiment of a campaign (:class:`Experiment`,
:func:`connect`), its runs (:class:`TrackedRun`, the :func:`run` context) and the fail-fast HTTP
settings. Writes that fail go to the campaign's outbox (:mod:`hdd_ray.tracking.outbox`).
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from hdd_ray import storage
from hdd_ray.errors import first_line
from hdd_ray.storage import is_uri
from hdd_ray.tracking.outbox import Outbox

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig

log = logging.getLogger(__name__)

# MLflow's log_batch limits per call (1000 entities in all)
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 800, 100, 100
_PARAM_CHARS = 500
PARENT_TAG = "mlflow.parentRunId"

#: MLflow HTTP settings that make a call to an unreachable server fail within seconds (its
#: defaults retry for about 4 minutes): set unless the environment sets them already
FAIL_FAST_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def fail_fast() -> None:
    """Apply :data:`FAIL_FAST_ENV` to this process (values already set are kept)."""
    for key, value in FAIL_FAST_ENV.items():
        os.environ.setdefault(key, value)


# the run of the innermost open :func:`run` context in this thread (the default parent)
_enclosing: contextvars.ContextVar[str | None] = contextvars.ContextVar("_enclosing", default=None)


def tracking_uri(cfg: CampaignConfig) -> str:
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


def now_ms() -> int:
    """Now, in milliseconds since the epoch (MLflow's timestamps)."""
    return int(time.time() * 1000)


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
        log.warning("MLflow unreachable (%s): kept in %s", first_line(exc)[:200], path)

    def log(self, metrics: dict[str, float] | None = None, params: dict[str, Any] | None = None,
            tags: dict[str, Any] | None = None, step: int = 0) -> None:
        """Metrics (all at ``step``), params and tags in as few ``log_batch`` calls as MLflow
        allows. Params already on the run are left as they are (MLflow params cannot change:
        a resumed run keeps its first values)."""
        from mlflow.entities import Metric, Param, RunTag

        now = now_ms()
        metric_list = [Metric(k, float(v), now, int(step)) for k, v in (metrics or {}).items()]
        try:
            param_list: list[Any] = []
            if params:
                existing = self.client.get_run(self.run_id).data.params
                param_list = [Param(k, str(v)[:_PARAM_CHARS]) for k, v in params.items()
                              if k not in existing]
            tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
            self.log_batch(metric_list, param_list, tag_list)
        except Exception as exc:
            self._keep(exc, metrics=[[m.key, m.value, m.timestamp, m.step] for m in metric_list],
                       params={k: str(v)[:_PARAM_CHARS] for k, v in (params or {}).items()},
                       tags={k: str(v) for k, v in (tags or {}).items()})

    def log_curve(self, key: str, points: Iterable[tuple[int, float]]) -> None:
        """One metric at several steps (e.g. a curve against t)."""
        from mlflow.entities import Metric

        now = now_ms()
        metrics = [Metric(key, float(v), now, int(s)) for s, v in points]
        try:
            self.log_batch(metrics, [], [])
        except Exception as exc:
            self._keep(exc, metrics=[[m.key, m.value, m.timestamp, m.step] for m in metrics])

    def log_batch(self, metrics: list[Any], params: list[Any], tags: list[Any]) -> None:
        """MLflow entities (``Metric``, ``Param``, ``RunTag``) in as few ``log_batch`` calls as
        MLflow allows; raises when MLflow fails."""
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
                        first_line(exc)[:200], self.run_id)

    def finish(self, ok: bool = True) -> None:
        """Mark the run FINISHED (or FAILED)."""
        status = "FINISHED" if ok else "FAILED"
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as exc:
            self._keep(exc, status=status)

    def status(self) -> str | None:
        """The run's MLflow status (``RUNNING``, ``FINISHED``, ...); None when unreadable."""
        try:
            return str(self.client.get_run(self.run_id).info.status)
        except Exception:
            return None


class Experiment:
    """A campaign's MLflow store and experiment (``tracking.experiment``)."""

    def __init__(self, cfg: CampaignConfig) -> None:
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
        found = self.find({k: tags[k] for k in key})
        return found if found is not None else self.create(name, tags, parent=parent,
                                                           params=params)

    def find(self, tags: dict[str, str]) -> TrackedRun | None:
        """The newest run of the experiment whose tags include ``tags``, else None."""
        query = " and ".join(f"tags.{k} = {filter_literal(v)}" for k, v in tags.items())
        found = self.client.search_runs([self.experiment_id], query, max_results=1)
        return self.run(found[0].info.run_id) if found else None

    def has_children(self, run_id: str) -> bool:
        """Whether a run of the experiment names ``run_id`` as its parent."""
        query = f"tags.`{PARENT_TAG}` = {filter_literal(run_id)}"
        return bool(self.client.search_runs([self.experiment_id], query, max_results=1))


def artifact_location(cfg: CampaignConfig) -> str | None:
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


def log_config(run: TrackedRun | None, cfg: CampaignConfig) -> None:
    """The resolved config on ``run``: ``config.yaml`` as an artifact and flattened params."""
    if run is None:
        return
    from hdd_ray.config import to_dict, to_yaml

    warn_on_failure(run.log_text, to_yaml(cfg), "config.yaml")
    warn_on_failure(run.log, params=flatten(to_dict(cfg)))


def connect(cfg: CampaignConfig) -> Experiment | None:
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
                    cfg.tracking.uri or "the campaign's sqlite store", first_line(exc)[:200])
        return None


@contextlib.contextmanager
def run(cfg: CampaignConfig, name: str, tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
        keep_without_children: bool = True) -> Iterator[TrackedRun | None]:
    """A new run of the campaign for the duration of the block; ``None`` when disabled.

    Its parent is ``parent_run_id``, else the enclosing :func:`run` context's (a stage inside
    the campaign run). It ends FINISHED, or FAILED when the block raises (a block that ends
    it itself, :meth:`TrackedRun.finish`, keeps its status). With
    ``keep_without_children=False`` a block that ends without any run under it (a launch that
    found everything done) deletes the run instead: no empty parents pile up.
    """
    exp = connect(cfg)
    active = None
    if exp is not None:
        try:
            active = exp.create(name, tags or {}, parent=parent_run_id)
        except Exception as exc:
            log.warning("MLflow unreachable (%s): run %r not tracked", first_line(exc)[:200],
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
    if active.status() not in ("RUNNING", None):  # the block ended it (e.g. FAILED): as it is
        return
    if not keep_without_children and not _has_children(exp, active.run_id):
        try:
            active.client.delete_run(active.run_id)
            log.info("MLflow: run %r did nothing new: not kept", name)
            return
        except Exception as exc:
            log.warning("MLflow: run %r could not be deleted (%s)", name, first_line(exc)[:200])
    active.finish()


def _has_children(exp: Experiment, run_id: str) -> bool:
    """:meth:`Experiment.has_children`, True when MLflow cannot say (keep the run)."""
    try:
        return exp.has_children(run_id)
    except Exception:
        return True


def warn_on_failure(fn: Any, *args: Any, **kwargs: Any) -> None:
    """``fn(*args, **kwargs)``, logging a one-line warning instead of raising (tracking must
    never stop training)."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        log.warning("MLflow logging failed: %s", first_line(exc)[:300])
