"""Ray's console noise turned down in a driver (:func:`quiet_ray`, after ``ray.init``).

Ray Data's console progress logs go off when stdout is not a terminal (its log file keeps them),
and the forwarded worker lines that are noise are dropped (:data:`NOISE`, :class:`NoiseFilter`):
the ``core_worker.cc`` warning about actor constructor arguments in the object store (Ray
Train's ``PreemptionWatcher``), the raylet's "worker processes have been started" chatter, and
the ``Exception ignored ... SystemExit`` tracebacks Ray's SIGTERM handler prints when Tune stops
a trial process. Every other line, errors included, is printed as Ray prints it. It patches Ray
internals (the driver's log dispatcher, ``print_to_stdstream``); if they change, nothing is
filtered.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from hdd_ray.progress import is_tty

__all__ = ["NOISE", "NoiseFilter", "quiet_ray"]

#: forwarded worker lines that are noise (regular expressions, searched in each line)
NOISE = (
    # Ray Core warns (at ERROR level) for every actor with max_restarts > 0 and a constructor
    # argument in the object store: Ray Train's PreemptionWatcher, Ray Data's map workers
    re.compile(r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments "
               r"in the object store and max_restarts > 0"),
    # the raylet's note that it started more worker processes than cores
    re.compile(r"PYTHON worker processes have been started on node"),
)

_quieted = False


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
