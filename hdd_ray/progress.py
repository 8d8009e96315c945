"""Progress a person can follow, in a terminal and in a log file; Ray's noise turned down.

* :func:`configure_logging`: what every job calls first: hdd_ray's INFO lines on stdout (with
  the time), chatty third-party loggers (MLflow's database set-up, alembic, faiss) at WARNING.
* :func:`quiet_ray`: after ``ray.init`` in a driver: Ray Data's console progress logs off when
  stdout is not a terminal (its log file keeps them), and the forwarded worker lines that are
  noise dropped (:data:`NOISE`): the ``core_worker.cc`` warning about actor constructor
  arguments in the object store (Ray Train's ``PreemptionWatcher``), the raylet's "worker
  processes have been started" chatter, and the ``Exception ignored ... SystemExit`` tracebacks
  Ray's SIGTERM handler prints when Tune stops a trial process. Every other line, errors
  included, is printed as Ray prints it.
* :class:`Progress`: a tqdm bar when stdout is a terminal, else a log line every
  ``interval_s`` seconds and one at the end (count, rate, ETA).
* :class:`CampaignProgress`: one line per run when it starts, resumes (from which step),
  finishes or fails, with steps/s and loss, and a campaign line with runs done/total and an ETA.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

log = logging.getLogger("hdd_ray.progress")

T = TypeVar("T")

#: third-party loggers that talk at INFO about set-up a user does not need to read
QUIET_LOGGERS = ("mlflow", "alembic", "faiss", "urllib3", "filelock", "git", "matplotlib",
                 "PIL", "httpx")

#: forwarded worker lines that are noise (regular expressions, searched in each line)
NOISE = (
    # Ray Core warns (at ERROR level) for every actor with max_restarts > 0 and a constructor
    # argument in the object store: Ray Train's PreemptionWatcher, Ray Data's map workers
    re.compile(r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments "
               r"in the object store and max_restarts > 0"),
    # the raylet's note that it started more worker processes than cores
    re.compile(r"PYTHON worker processes have been started on node"),
)

_configured = False
_quieted = False


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


# ------------------------------------------------------------------------------------ Ray noise


def quiet_ray() -> None:
    """Turn Ray's console noise down in this driver (after ``ray.init``); best effort, idempotent.

    Uses Ray internals (the driver's log dispatcher, Ray Data's console handler); if they
    change, nothing is filtered and Ray prints as usual.
    """
    global _quieted
    if not is_tty():
        try:  # Ray Data's per-second progress blocks: its log file (ray-data.log) keeps them
            import ray.data  # noqa: F401  (configures the "ray.data" logger on import)
            from ray._private.log import PlainRayHandler

            for h in logging.getLogger("ray.data").handlers:
                if isinstance(h, PlainRayHandler):
                    h.setLevel(logging.WARNING)
        except Exception:
            pass
    if _quieted:
        return
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except Exception:
        return
    with dispatcher._lock:  # worker output forwarded to this driver
        handlers = list(dispatcher.handlers)
        for i, (name, handler) in enumerate(handlers):
            if name == "ray_print_logs":
                handlers[i] = (name, _filtered(handler))
                _quieted = True
        dispatcher.handlers = handlers
    # the raylet's messages (worker start-up chatter) are printed by this function directly
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is not None and not getattr(original, "_hdd_ray_filtered", False):
        def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
            filtered = _filtered(lambda d: original(d, ignore_prefix=ignore_prefix))
            filtered(data)

        print_to_stdstream._hdd_ray_filtered = True  # type: ignore[attr-defined]
        ray_worker.print_to_stdstream = print_to_stdstream


class NoiseFilter:
    """Drops :data:`NOISE` lines and SIGTERM ``SystemExit`` tracebacks from forwarded worker
    output, per process; any other line passes unchanged (a traceback that does not end in
    ``SystemExit`` is printed whole)."""

    MAX_HELD = 80

    def __init__(self) -> None:
        self.held: dict[Any, list[str]] = {}

    def lines(self, key: Any, lines: Iterable[str]) -> list[str]:
        """The lines of one batch from process ``key`` that are not noise."""
        out: list[str] = []
        held = self.held.pop(key, None)
        for line in lines:
            if held is not None:
                held.append(line)
                if line.startswith("SystemExit"):
                    held = None  # Ray's SIGTERM handler raising SystemExit: drop the block
                elif not _traceback_line(line) or len(held) > self.MAX_HELD:
                    out.extend(held)
                    held = None
                continue
            if line.startswith("Exception ignored"):
                held = [line]
            elif not any(p.search(line) for p in NOISE):
                out.append(line)
        if held is not None:
            self.held[key] = held
        return out


def _traceback_line(line: str) -> bool:
    return (line.startswith((" ", "\t", "Traceback", "Exception ignored", "During handling",
                             "The above exception"))
            or not line.strip() or line.startswith("SystemExit"))


def _filtered(handler: Callable[[dict], None]) -> Callable[[dict], None]:
    noise = NoiseFilter()

    def handle(data: dict) -> None:
        try:
            lines = noise.lines((data.get("pid"), data.get("ip"), data.get("is_err")),
                                data.get("lines", []))
        except Exception:  # never lose output to the filter itself
            lines = data.get("lines", [])
        if lines:
            handler({**data, "lines": lines})

    return handle


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


def track(items: Iterable[T], total: int, desc: str, unit: str = "it",
          interval_s: float = 10.0) -> Iterator[T]:
    """``items``, with a :class:`Progress` over them."""
    with Progress(total, desc, unit, interval_s) as p:
        for item in items:
            yield item
            p.update()


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
        def counted(x_t: Any, t: Any) -> Any:
            bar.update()
            return inner(x_t, t)

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

    def end(self, status: Any, steps_per_s: float | None = None) -> None:
        """A run ended (a :class:`~hdd_ray.training.launcher.RunStatus`): its line, then the
        campaign's."""
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


__all__ = ["NOISE", "CampaignProgress", "NoiseFilter", "Progress", "configure_logging",
           "is_tty", "quiet_ray", "sampling_progress", "track"]
