"""Progress a person can follow, in a terminal and in a log file.

* :func:`configure_logging`: what every job calls first: hdd_ray's INFO lines on stdout (with
  the time), chatty third-party loggers (MLflow's database set-up, alembic, faiss) at WARNING.
* :class:`Progress`: a tqdm bar when stdout is a terminal, else a log line every
  ``interval_s`` seconds and one at the end (count, rate, ETA).
* :class:`CampaignProgress`: one line per run when it starts, resumes (from which step),
  finishes or fails, with steps/s and loss, and a campaign line with runs done/total and an ETA.
* :class:`RunStatus` and :func:`format_table`: how each run of a launch ended, and the table the
  training jobs print at the end.

Ray's own console noise is turned down by :mod:`hdd_ray.ray_noise`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("hdd_ray.progress")

#: third-party loggers that talk at INFO about set-up a user does not need to read
QUIET_LOGGERS = ("mlflow", "alembic", "faiss", "urllib3", "filelock", "git", "matplotlib",
                 "PIL", "httpx")

_configured = False


def is_tty() -> bool:
    """Whether stdout is an interactive terminal (bars) or a pipe / file (periodic lines)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def configure_logging(level: int = logging.INFO, propagate: bool = True) -> None:
    """hdd_ray's log lines on stdout as ``HH:MM:SS message`` (``WARNING: ...`` for warnings);
    third-party set-up chatter at WARNING. Idempotent; what a job calls before anything else.

    ``propagate=False`` in a Ray worker process, whose root logger has Ray's own console handler:
    otherwise every line would reach the driver twice.
    """
    global _configured
    # MLflow sets its own logger's level when imported, from this variable (INFO otherwise)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if not propagate:  # also when an earlier call (a reused worker process) configured it
        logging.getLogger("hdd_ray").propagate = False
    if _configured:
        return
    _configured = True
    handler = _LiveStreamHandler("stdout")
    handler.setFormatter(_Formatter())
    pkg = logging.getLogger("hdd_ray")
    pkg.addHandler(handler)
    pkg.setLevel(level)
    pkg.propagate = propagate
    # records still propagate (pytest's caplog sees them). A library calling the module-level
    # ``logging.info`` (open_clip does) would run ``basicConfig`` on an empty root logger and
    # print every hdd_ray line a second time: the root gets a stderr handler first, for other
    # loggers' warnings only (what ``logging.lastResort`` would have shown)
    root = logging.getLogger()
    if not root.handlers:
        fallback = _LiveStreamHandler("stderr")
        fallback.setLevel(logging.WARNING)
        fallback.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        fallback.addFilter(lambda record: not record.name.startswith("hdd_ray"))
        root.addHandler(fallback)


class _LiveStreamHandler(logging.StreamHandler):
    """Writes to whatever ``sys.<name>`` is at the time (a test's capture, a redirect)."""

    def __init__(self, name: str = "stdout") -> None:
        self._sys_attr = name
        super().__init__(getattr(sys, name))

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return getattr(sys, self._sys_attr)

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        prefix = "" if record.levelno <= logging.INFO else f"{record.levelname}: "
        return f"{stamp} {prefix}{record.getMessage()}"


# ------------------------------------------------------------------------------------- progress


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Progress of one loop: a tqdm bar on a terminal, else a log line every ``interval_s``.

    ``with Progress(total, "sampling") as p: ... p.update(n)``. Thread-safe enough for one
    writer. ``force_bar`` (tests) overrides the terminal check.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", interval_s: float = 10.0,
                 force_bar: bool | None = None, logger: logging.Logger | None = None) -> None:
        self.total, self.desc, self.unit = max(0, int(total)), desc, unit
        self.interval_s = interval_s
        self.count = 0
        self.started = self.last_line = time.time()
        self.log = logger or log
        self.bar = None
        if force_bar if force_bar is not None else is_tty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False,
                                dynamic_ncols=True)
            except Exception:
                self.bar = None

    def update(self, n: int = 1) -> None:
        """``n`` more done."""
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.time()
        if now - self.last_line >= self.interval_s:
            self.last_line = now
            self.log.info("%s", self.line())

    def line(self) -> str:
        """``desc: 40/128 it (31 %), 2.1 it/s, ETA 42 s``."""
        elapsed = max(1e-9, time.time() - self.started)
        count = min(self.count, self.total) if self.total else self.count
        rate = count / elapsed
        text = f"{self.desc}: {count}/{self.total} {self.unit}"
        if self.total:
            text += f" ({100 * count / self.total:.0f} %)"
        text += f", {rate:.3g} {self.unit}/s"
        if self.total and count < self.total and rate > 0:
            text += f", ETA {_duration((self.total - count) / rate)}"
        return text

    def close(self) -> None:
        """Finish: close the bar, or log the final line when the loop took a while."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif time.time() - self.started >= self.interval_s:
            self.count = max(self.count, self.total)
            self.log.info("%s, done in %s", self.line().split(", ETA")[0],
                          _duration(time.time() - self.started))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def sampling_progress(mixture: Any, num_images: int, steps: int, sampler: str,
                      batch_size: int, desc: str = "sampling") -> Iterator[Progress]:
    """A :class:`Progress` over a mixture's sampling, counted in router calls (one per ODE
    evaluation of a batch: ``2 steps - 1`` with Heun, ``steps`` with Euler)."""
    per_batch = 2 * steps - 1 if sampler == "heun" else steps
    batches = max(1, -(-max(1, num_images) // max(1, batch_size)))
    had = "router_probs" in vars(mixture)
    inner = mixture.router_probs
    with Progress(per_batch * batches, desc, unit="evals") as bar:
        def counted(x_t: Any, t: Any, cond: Any = None) -> Any:
            bar.update()
            return inner(x_t, t, cond)

        mixture.router_probs = counted  # the mixture field asks the router through this
        try:
            yield bar
        finally:
            if had:
                mixture.router_probs = inner
            else:
                del mixture.router_probs


class CampaignProgress:
    """The launcher's lines: each run's start / resume / end and the campaign's done/total + ETA.

    The ETA is the mean duration of the runs trained so far (start line to end line: Ray
    Train's start-up included), times the runs left, divided by how many run at once (reused
    runs cost nothing and are left out).
    """

    def __init__(self, total: int, concurrency: int, logger: logging.Logger | None = None) -> None:
        self.total, self.concurrency = total, max(1, concurrency)
        self.done = 0
        self.failed = 0
        self.walls: list[float] = []
        self.starts: dict[str, float] = {}
        self.started = time.time()
        self.log = logger or log
        self._lock = threading.Lock()

    def start(self, name: str, what: str, steps: int, resume_step: int | None) -> None:
        """A run starts training (``resume_step``: the step of its latest checkpoint, if any)."""
        with self._lock:
            self.starts[name] = time.time()
        if resume_step:
            self.log.info("%s: resuming from step %d of %d (%s)", name, resume_step, steps, what)
        else:
            self.log.info("%s: starting, %d steps (%s)", name, steps, what)

    def checkpoint(self, name: str, step: int, steps: int, steps_per_s: float | None,
                   loss: float | None) -> None:
        """A running run reached a checkpoint: ``name: step 400/800, 8.1 steps/s, loss 0.41``."""
        rate = f", {steps_per_s:.1f} steps/s" if steps_per_s else ""
        shown = f", loss {loss:.4f}" if isinstance(loss, float) and loss == loss else ""
        self.log.info("%s: step %d/%d%s%s", name, step, steps, rate, shown)

    def end(self, status: RunStatus, steps_per_s: float | None = None) -> None:
        """A run ended: its line, then the campaign's."""
        with self._lock:
            self.done += 1
            if not status.ok:
                self.failed += 1
            began = self.starts.pop(status.name, None)
            took = time.time() - began if began is not None else None
            if status.status in ("trained", "resumed") and took is not None:
                self.walls.append(took)
            done, left = self.done, self.total - self.done
            eta = None
            if self.walls and left:
                eta = sum(self.walls) / len(self.walls) * left / min(self.concurrency, left)
        if status.status == "reused":
            self.log.info("%s: reused (finished earlier, %d steps)", status.name, status.steps)
        elif status.ok:
            rate = f", {steps_per_s:.1f} steps/s" if steps_per_s else ""
            loss = f", loss {status.final_loss:.4f}" if status.final_loss is not None else ""
            wall = f" in {_duration(status.wall_time_s)}" if status.wall_time_s else ""
            if took is not None:
                start_up = ("the task's start-up" if status.extra.get("executor") == "task"
                            else "Ray Train's start-up")
                wall += f" ({_duration(took)} with {start_up})"
            self.log.info("%s: %s, %d steps%s%s%s", status.name, status.status, status.steps,
                          wall, rate, loss)
        else:
            self.log.warning("%s: %s: %s", status.name, status.status, status.reason or "?")
        if status.status == "reused" and left:
            return  # the campaign line follows runs that cost time (and the last one)
        parts = [f"campaign: {done}/{self.total} runs done"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        parts.append(f"{_duration(time.time() - self.started)} elapsed")
        if left:
            parts.append(f"ETA {_duration(eta)}" if eta is not None else "ETA after the first run")
        self.log.info("%s", ", ".join(parts))


@dataclass
class RunStatus:
    """How one run (an expert or the router) of a launch ended: one line of the closing table."""

    name: str
    kind: str  # expert | router
    cluster: int | None
    objective: str
    status: str  # trained | reused | resumed | failed | rejected
    steps: int = 0
    final_loss: float | None = None
    wall_time_s: float | None = None
    node: str = ""
    reason: str = ""
    attempts: int = 0
    skipped_samples: int = 0  # damaged samples the training data reader skipped
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the run ended with usable weights."""
        return self.status in ("trained", "reused", "resumed")


def format_table(statuses: list[RunStatus]) -> str:
    """The per-run status table printed at the end of the job."""
    head = f"{'run':<24} {'cluster':>7} {'objective':<16} {'status':<9} {'steps':>6} {'loss':>8} {'wall s':>7} {'node':<14} reason"
    lines = [head, "-" * len(head)]
    for s in statuses:
        loss = f"{s.final_loss:.4f}" if s.final_loss is not None else "-"
        wall = f"{s.wall_time_s:.0f}" if s.wall_time_s is not None else "-"
        cluster = str(s.cluster) if s.cluster is not None else "-"
        lines.append(f"{s.name:<24} {cluster:>7} {s.objective:<16} {s.status:<9} {s.steps:>6} "
                     f"{loss:>8} {wall:>7} {s.node[:14]:<14} {s.reason}")
    return "\n".join(lines)


__all__ = ["CampaignProgress", "Progress", "RunStatus", "configure_logging", "format_table",
           "is_tty", "sampling_progress"]
