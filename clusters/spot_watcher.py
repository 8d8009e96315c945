"""Node-side spot watcher: spot preemption notices -> Ray drain, so Ray Train checkpoints before
the node disappears.

Ray Train recognises a preemption only when Ray *drains* the node (``DRAIN_NODE_REASON_PREEMPTION``
with a deadline): ``ray.train.get_preemption_info()`` then returns the deadline, the training loop
(``hdd_ray.training.loop``) takes a checkpoint at once, and the retry that follows counts against
``max_preemption_failures`` (-1 = unlimited) instead of ``max_failures``. A node that just dies is
an ordinary failure: the run resumes from its last periodic checkpoint instead.

Clouds announce a spot interruption a little ahead of time, on the instance's metadata server:

* AWS: ``GET /latest/meta-data/spot/instance-action`` (IMDSv2: a session token from
  ``PUT /latest/api/token`` in the ``X-aws-ec2-metadata-token`` header) answers 404 until an
  interruption is scheduled, then ``{"action": "terminate" | "stop" | "hibernate",
  "time": "2025-01-01T12:02:00Z"}`` about two minutes ahead.
* GCP: ``GET /computeMetadata/v1/instance/preempted`` (header ``Metadata-Flavor: Google``)
  answers ``FALSE`` until the VM is preempted, then ``TRUE``; Spot VMs get 30 s.

:func:`watch` polls one of these (:class:`AwsSpotNotices`, :class:`GcpPreemptionNotices`) and,
on a notice, calls the drain action once: by default :func:`drain_with_ray_cli`, which runs
``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N`` (the CLI
that calls the GCS ``DrainNode`` RPC, as autoscaler v2 does; a developer-facing command in Ray
2.60, hidden from ``ray --help``).

This script is node-side tooling, not part of the ``hdd_ray`` package (it needs only Ray and the
standard library). The cluster YAMLs start it on every worker right after ``ray start``
(harmless on on-demand nodes: no notice ever comes). Optional: without it a preempted node
simply dies and its experts resume from their last periodic checkpoint; with it Ray Train
checkpoints first and the retry counts as a preemption (``max_preemption_failures``), not a
failure.

It is a service that does not die on surprises:

* every poll failure (refused or dropped connections, timeouts, malformed HTTP such as
  ``http.client.BadStatusLine`` / ``IncompleteRead``, error statuses, garbage bodies, anything)
  is logged and polling goes on, with exponential backoff (capped by ``--max-backoff``) while
  failures last;
* a refused drain is retried with backoff until the notice's deadline has passed;
* it waits for the raylet of its machine with backoff and never gives up (each look is a short
  driver in a subprocess with a timeout, so a hanging or crashing ``ray.init`` cannot take the
  watcher with it);
* ``--supervise`` runs it under a restart loop (:func:`supervise`): the watcher runs as a child
  process and is restarted with backoff whenever it exits with anything but 0 (0 = drain
  accepted: the node is going away). The cluster YAMLs start it that way, with a pid file so
  ``worker_start_ray_commands`` can stop exactly this supervisor before starting a new one.

Tested against a metadata server on 127.0.0.1 that answers errors and garbage and drops
connections, and end to end with a real Ray node it drains (``tests/test_clusters.py``).

    python clusters/spot_watcher.py --cloud aws --address $RAY_HEAD_IP:6379
    python clusters/spot_watcher.py --supervise --pidfile /tmp/spot_watcher.pid --cloud gcp \
        --address $RAY_HEAD_IP:6379
    python clusters/spot_watcher.py --cloud gcp --node-id <hex> --metadata-url http://127.0.0.1:8080
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

AWS_METADATA_URL = "http://169.254.169.254"
GCP_METADATA_URL = "http://metadata.google.internal"
AWS_TOKEN_TTL_S = 21600
GCP_SPOT_NOTICE_S = 30  # Spot / preemptible VMs are stopped about 30 s after the notice
DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"
NODE_ID_PATTERN = re.compile(r"[0-9a-f]{56}")  # a Ray node id: 28 bytes, hex

log = logging.getLogger("spot_watcher")


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of ``exc``, for one-line log entries."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


@dataclass
class Backoff:
    """Exponential backoff: ``first_s``, twice that, ... capped at ``cap_s``; :meth:`reset`
    starts over (after a success)."""

    first_s: float = 0.5
    cap_s: float = 5.0
    _next: float | None = field(default=None, repr=False)

    def next(self) -> float:
        """The next delay in seconds (and double the one after it, up to ``cap_s``)."""
        delay = self.first_s if self._next is None else self._next
        delay = min(delay, self.cap_s)
        self._next = min(self.cap_s, max(delay, 1e-3) * 2)
        return delay

    def reset(self) -> None:
        """Start over at ``first_s``."""
        self._next = None


class MetadataError(RuntimeError):
    """The metadata server answered something this watcher does not understand."""


class DrainError(RuntimeError):
    """Ray did not accept the drain request."""


@dataclass(frozen=True)
class Notice:
    """A scheduled interruption of this instance."""

    cloud: str  # aws | gcp
    action: str  # aws: terminate | stop | hibernate; gcp: preempted
    deadline: float  # epoch seconds when the instance goes away (best estimate)
    detail: str = ""  # the metadata server's answer, for the log

    def remaining_s(self, now: float | None = None) -> int:
        """Whole seconds left until :attr:`deadline` (never negative)."""
        now = time.time() if now is None else now
        return max(0, int(self.deadline - now))


class NoticeSource(Protocol):
    """Something :func:`watch` can poll: returns a :class:`Notice` once one is scheduled."""

    cloud: str

    def poll(self) -> Notice | None:
        """The current notice, or ``None`` while there is none."""
        ...


def _request(url: str, method: str = "GET", headers: dict[str, str] | None = None,
             timeout: float = 2.0) -> tuple[int, str]:
    """``(status, body)`` of one HTTP request; HTTP error statuses are returned, not raised."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    # the metadata server is link-local: never go through an HTTP proxy from the environment
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")


def _parse_time(text: str) -> float:
    """Epoch seconds of an ISO-8601 UTC time such as ``2025-01-01T12:02:00Z``."""
    value = _dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.timezone.utc)
    return value.timestamp()


class AwsSpotNotices:
    """EC2 spot interruption notices through IMDSv2 (token refreshed before it expires)."""

    cloud = "aws"

    def __init__(self, base_url: str = AWS_METADATA_URL, timeout: float = 2.0,
                 token_ttl_s: int = AWS_TOKEN_TTL_S, clock: Callable[[], float] = time.time) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.token_ttl_s = token_ttl_s
        self.clock = clock
        self._token: str | None = None
        self._token_expires = 0.0

    def _fetch_token(self) -> str:
        status, body = _request(
            f"{self.base_url}/latest/api/token", "PUT",
            {"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl_s)}, self.timeout)
        token = body.strip()
        if status != 200 or not re.fullmatch(r"[\x21-\x7e]{1,4096}", token):
            raise MetadataError(f"IMDSv2 token request answered {status}: {body[:200]!r}")
        self._token = token
        # renew well before the TTL runs out
        self._token_expires = self.clock() + 0.9 * self.token_ttl_s
        return self._token

    def _token_now(self) -> str:
        if self._token is None or self.clock() >= self._token_expires:
            return self._fetch_token()
        return self._token

    def poll(self) -> Notice | None:
        """The scheduled interruption (``spot/instance-action``), or ``None`` (HTTP 404).

        Any failure forgets the session token, so a bad one never outlives one poll."""
        try:
            return self._poll()
        except Exception:
            self._token = None
            raise

    def _poll(self) -> Notice | None:
        url = f"{self.base_url}/latest/meta-data/spot/instance-action"
        status, body = _request(url, headers={"X-aws-ec2-metadata-token": self._token_now()},
                                timeout=self.timeout)
        if status == 401:  # token expired or revoked: one fresh token, one retry
            status, body = _request(
                url, headers={"X-aws-ec2-metadata-token": self._fetch_token()},
                timeout=self.timeout)
        if status == 404:
            return None
        if status != 200:
            raise MetadataError(f"spot/instance-action answered {status}: {body[:200]!r}")
        try:
            data = json.loads(body)
            return Notice("aws", str(data["action"]), _parse_time(str(data["time"])), body.strip())
        except (ValueError, KeyError, TypeError) as exc:
            raise MetadataError(f"spot/instance-action: unexpected answer {body[:200]!r}") from exc


class GcpPreemptionNotices:
    """GCE Spot / preemptible VM notices (``instance/preempted`` turns ``TRUE``)."""

    cloud = "gcp"

    def __init__(self, base_url: str = GCP_METADATA_URL, timeout: float = 2.0,
                 notice_s: float = GCP_SPOT_NOTICE_S, clock: Callable[[], float] = time.time) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.notice_s = notice_s
        self.clock = clock

    def poll(self) -> Notice | None:
        """A notice once the VM is being preempted (deadline: now + ``notice_s``), else ``None``."""
        status, body = _request(f"{self.base_url}/computeMetadata/v1/instance/preempted",
                                headers={"Metadata-Flavor": "Google"}, timeout=self.timeout)
        if status != 200:
            raise MetadataError(f"instance/preempted answered {status}: {body[:200]!r}")
        value = body.strip().upper()
        if value == "FALSE":
            return None
        if value == "TRUE":
            return Notice("gcp", "preempted", self.clock() + self.notice_s, body.strip())
        raise MetadataError(f"instance/preempted: unexpected answer {body[:200]!r}")


def notice_source(cloud: str, base_url: str | None = None, timeout: float = 2.0) -> NoticeSource:
    """The notice source of ``cloud`` (``aws`` | ``gcp``), optionally at another ``base_url``;
    ``timeout``: seconds one metadata request may take."""
    if cloud == "aws":
        return AwsSpotNotices(base_url or AWS_METADATA_URL, timeout=timeout)
    if cloud == "gcp":
        return GcpPreemptionNotices(base_url or GCP_METADATA_URL, timeout=timeout)
    raise ValueError(f"cloud={cloud!r}: allowed: aws, gcp")


# ------------------------------------------------------------------------------------- drain


def _ray_executable() -> str:
    """The ``ray`` CLI of this interpreter (an unactivated virtualenv's ``bin/`` is not on PATH),
    else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "ray")
    return here if os.access(here, os.X_OK) else (shutil.which("ray") or "ray")


def drain_command(node_id: str, deadline_remaining_s: int, reason_message: str,
                  address: str | None = None, ray_executable: str | None = None) -> list[str]:
    """The ``ray drain-node`` command line that drains ``node_id`` for a preemption."""
    ray = ray_executable or _ray_executable()
    cmd = [ray, "drain-node"]
    if address:
        cmd += ["--address", address]
    return cmd + ["--node-id", node_id, "--reason", DRAIN_REASON,
                  "--reason-message", reason_message,
                  "--deadline-remaining-seconds", str(max(0, int(deadline_remaining_s)))]


def drain_with_ray_cli(node_id: str, deadline_remaining_s: int, reason_message: str,
                       address: str | None = None,
                       run: Callable[..., Any] = subprocess.run) -> None:
    """Ask the GCS to drain ``node_id`` because it is preempted (``ray drain-node``).

    Raises :class:`DrainError` with Ray's message when the request is not accepted.
    """
    cmd = drain_command(node_id, deadline_remaining_s, reason_message, address)
    out = run(cmd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        text = (out.stderr or out.stdout or "").strip().splitlines()
        raise DrainError(f"{' '.join(cmd[:2])} exited with {out.returncode}: "
                         f"{text[-1] if text else 'no output'}")


_NODE_ID_PROBE = (
    "import sys, ray\n"
    "ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR')\n"
    "print('node_id=' + ray.get_runtime_context().get_node_id())\n"
    "ray.shutdown()\n"
)


def _gcs_listening(address: str | None, timeout_s: float = 2.0) -> None:
    """Raise ``ConnectionError`` unless ``host:port`` accepts TCP connections (no-op for
    ``auto``/``None``): a driver pointed at a GCS that is not up blocks for minutes."""
    if not address or address == "auto" or ":" not in address or "://" in address:
        return
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s):
        pass


def probe_node_id(address: str | None = None, timeout_s: float = 120.0) -> str:
    """One look for this machine's Ray node: a short driver in a subprocess (bounded by
    ``timeout_s``) prints its node id. Raises when there is no reachable GCS or raylet yet."""
    _gcs_listening(address)
    out = subprocess.run([sys.executable, "-c", _NODE_ID_PROBE, address or "auto"],
                         capture_output=True, text=True, timeout=timeout_s)
    found = re.findall(r"^node_id=([0-9a-f]+)$", out.stdout, flags=re.MULTILINE)
    if out.returncode != 0 or not found or not NODE_ID_PATTERN.fullmatch(found[-1]):
        lines = [ln for ln in (out.stderr or out.stdout).strip().splitlines() if ln.strip()]
        raise RuntimeError(f"driver exited with {out.returncode}: "
                           f"{lines[-1][:300] if lines else 'no output'}")
    return found[-1]


def local_node_id(
    address: str | None = None,
    attempts: int | None = None,
    backoff: Backoff | None = None,
    probe: Callable[[str | None], str] = probe_node_id,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """The Ray node id of this machine's raylet; waits for it with backoff.

    Assumes one Ray node per machine, as on cloud VMs and Kubernetes pods; where several nodes
    share a machine (tests), pass the node id explicitly. ``ray start`` may have just run, the
    raylet may still be registering or the head may be restarting: every failed look is logged
    and retried after a delay that doubles up to ``backoff.cap_s`` (default 1 s .. 30 s), with no
    limit unless ``attempts`` is given (then ``RuntimeError`` after that many).
    """
    backoff = backoff or Backoff(first_s=1.0, cap_s=30.0)
    tried = 0
    while True:
        tried += 1
        try:
            return probe(address)
        except Exception as exc:  # GCS not up, raylet not registered, a hung or crashed driver
            if attempts is not None and tried >= attempts:
                raise RuntimeError(f"no local Ray node found at address={address or 'auto'} "
                                   f"after {tried} attempts: {_first_line(exc)}") from None
            delay = backoff.next()
            log.warning("no Ray node on this machine yet (address=%s, attempt %d: %s); "
                        "retrying in %.1f s", address or "auto", tried, _first_line(exc), delay)
            sleep(delay)


# ------------------------------------------------------------------------------------- watch


def watch(
    source: NoticeSource,
    drain: Callable[[Notice], None],
    interval_s: float = 5.0,
    stop: threading.Event | None = None,
    max_polls: int | None = None,
    drain_attempts: int = 3,
    sleep: Callable[[float], None] = time.sleep,
    max_backoff_s: float = 5.0,
    clock: Callable[[], float] = time.time,
) -> Notice | None:
    """Poll ``source`` every ``interval_s`` until a notice arrives, then ``drain`` it once.

    Any poll failure (unreachable or misbehaving metadata server, malformed HTTP, odd answers,
    any exception) is logged and polling goes on; while failures last the delay doubles from
    ``interval_s`` up to ``max_backoff_s`` (``max(interval_s, max_backoff_s)``), and it returns to
    ``interval_s`` after a good poll. A failed drain is retried with backoff at least
    ``drain_attempts`` times and until the notice's deadline has passed. Returns the notice, or
    ``None`` when ``stop`` is set or ``max_polls`` polls found nothing (a notice whose drain kept
    failing is returned too: the node goes away regardless, and its runs fall back to their last
    periodic checkpoint).
    """

    def wait(seconds: float) -> bool:  # True when asked to stop
        if stop is not None:
            return stop.wait(seconds)
        sleep(seconds)
        return False

    errors = Backoff(first_s=interval_s, cap_s=max(interval_s, max_backoff_s))
    polls = 0
    while (stop is None or not stop.is_set()) and (max_polls is None or polls < max_polls):
        polls += 1
        try:
            notice = source.poll()
        except Exception as exc:  # never die: HTTPException, URLError, timeouts, garbage, bugs
            delay = errors.next()
            log.warning("%s metadata poll failed (%s); next poll in %.1f s",
                        source.cloud, _first_line(exc), delay)
            if wait(delay):
                break
            continue
        errors.reset()
        if notice is not None:
            return _drain_notice(notice, drain, drain_attempts, wait, clock, max_backoff_s)
        if wait(interval_s):
            break
    return None


def _drain_notice(notice: Notice, drain: Callable[[Notice], None], attempts: int,
                  wait: Callable[[float], bool], clock: Callable[[], float],
                  max_backoff_s: float) -> Notice:
    """Call ``drain`` until it is accepted, or ``attempts`` failed and the deadline passed."""
    log.warning("%s interruption notice (%s, %d s left): draining this Ray node",
                notice.cloud, notice.action, notice.remaining_s(clock()))
    retry = Backoff(first_s=0.5, cap_s=max(0.5, max_backoff_s))
    attempt = 0
    while True:
        attempt += 1
        try:
            drain(notice)
            log.warning("drain accepted")
            return notice
        except Exception as exc:
            log.error("drain attempt %d failed: %s", attempt, _first_line(exc))
        if attempt >= attempts and notice.remaining_s(clock()) <= 0:
            log.error("giving up on the drain: the notice's deadline has passed")
            return notice
        if wait(retry.next()):
            return notice


# ------------------------------------------------------------------------------------- service


def supervise(
    child_argv: Sequence[str],
    pidfile: str | None = None,
    backoff: Backoff | None = None,
    stable_s: float = 60.0,
) -> int:
    """Run ``spot_watcher.py child_argv`` as a child process and restart it whenever it exits
    with anything but 0, after a delay that doubles (``backoff``, default 1 s .. 60 s) and starts
    over once a child has run ``stable_s``. Returns 0 when a child exits 0 (its drain was
    accepted) and on SIGTERM / SIGINT (the child is terminated first). ``pidfile`` holds this
    supervisor's pid while it runs, for ``kill $(cat PIDFILE)``.
    """
    backoff = backoff or Backoff(first_s=1.0, cap_s=60.0)
    child: subprocess.Popen[bytes] | None = None
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.set()
        log.warning("supervisor: signal %d, stopping the watcher", signum)
        if child is not None and child.poll() is None:
            child.terminate()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    if pidfile:
        with open(pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    try:
        while not stopping.is_set():
            started = time.monotonic()
            try:
                child = subprocess.Popen([sys.executable, os.path.abspath(__file__), *child_argv])
                log.info("supervisor: started watcher pid %d", child.pid)
                rc: int | None = child.wait()
            except Exception as exc:  # could not even start it: keep trying
                log.error("supervisor: watcher did not start: %s", _first_line(exc))
                rc = None
            if stopping.is_set():
                break
            if rc == 0:
                log.warning("supervisor: watcher finished (drain accepted); not restarting")
                return 0
            if time.monotonic() - started >= stable_s:
                backoff.reset()
            delay = backoff.next()
            log.error("supervisor: watcher exited with %s; restarting in %.1f s", rc, delay)
            if stopping.wait(delay):
                break
        return 0
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        if pidfile:
            try:
                with open(pidfile) as f:
                    mine = f.read().strip() == str(os.getpid())
                if mine:
                    os.remove(pidfile)
            except OSError:
                pass
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        prog="spot_watcher.py",
        description="Turn this instance's spot interruption notice into a Ray drain "
                    "(DRAIN_NODE_REASON_PREEMPTION) so Ray Train checkpoints before the node goes.")
    parser.add_argument("--cloud", required=True, choices=("aws", "gcp"))
    parser.add_argument("--address", default=None,
                        help="GCS address of the cluster (default: RAY_ADDRESS / the local one)")
    parser.add_argument("--node-id", default=None,
                        help="Ray node id to drain (default: the raylet on this machine)")
    parser.add_argument("--interval", type=float, default=None,
                        help="seconds between polls (default: 5 on aws, 1 on gcp)")
    parser.add_argument("--max-backoff", type=float, default=None,
                        help="longest delay between polls while they fail, in seconds "
                             "(default: 15 on aws, 5 on gcp: well inside the notice)")
    parser.add_argument("--timeout", type=float, default=2.0,
                        help="seconds one metadata request may take (default: 2)")
    parser.add_argument("--raylet-max-backoff", type=float, default=30.0,
                        help="longest delay between looks for the local raylet (default: 30)")
    parser.add_argument("--metadata-url", default=None,
                        help="metadata server base URL (default: the cloud's link-local one)")
    parser.add_argument("--supervise", action="store_true",
                        help="run the watcher as a child process and restart it with backoff "
                             "whenever it exits with anything but 0 (0: drain accepted)")
    parser.add_argument("--pidfile", default=None,
                        help="with --supervise: write the supervisor's pid here")
    return parser


def _child_argv(args: Any) -> list[str]:
    """The watcher's own command line, without the supervisor's options."""
    argv = ["--cloud", args.cloud, "--timeout", str(args.timeout),
            "--raylet-max-backoff", str(args.raylet_max_backoff)]
    for flag, value in (("--address", args.address), ("--node-id", args.node_id),
                        ("--interval", args.interval), ("--max-backoff", args.max_backoff),
                        ("--metadata-url", args.metadata_url)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def _run(args: Any) -> int:
    """The watcher itself: find the node, poll, drain; 0 when a drain was accepted."""
    source = notice_source(args.cloud, args.metadata_url, args.timeout)
    node_id = args.node_id or local_node_id(
        args.address, backoff=Backoff(first_s=1.0, cap_s=args.raylet_max_backoff))
    interval = args.interval if args.interval is not None else (5.0 if args.cloud == "aws" else 1.0)
    max_backoff = (args.max_backoff if args.max_backoff is not None
                   else (15.0 if args.cloud == "aws" else 5.0))
    log.info("watching %s interruption notices for Ray node %s every %g s",
             args.cloud, node_id, interval)

    drained: list[Notice] = []

    def drain(notice: Notice) -> None:
        drain_with_ray_cli(node_id, notice.remaining_s(),
                           f"{notice.cloud} spot interruption: {notice.action}", args.address)
        drained.append(notice)

    watch(source, drain, interval, max_backoff_s=max_backoff)
    return 0 if drained else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``clusters/spot_watcher.py``; returns the exit status (0: drain accepted,
    1: a notice whose drain Ray kept refusing, 2: the watcher itself failed)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s spot_watcher[%(process)d] %(levelname)s %(message)s")
    if args.supervise:
        return supervise(_child_argv(args), args.pidfile)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the supervisor restarts it; say why in one line
        log.error("watcher failed: %s", _first_line(exc))
        return 2


__all__ = [
    "AwsSpotNotices", "Backoff", "DrainError", "GcpPreemptionNotices", "MetadataError", "Notice",
    "NoticeSource", "drain_command", "drain_with_ray_cli", "local_node_id", "main",
    "notice_source", "probe_node_id", "supervise", "watch",
]


if __name__ == "__main__":
    raise SystemExit(main())
