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
failure. Tested against a fake metadata server (``tests/test_clusters.py``).

    python clusters/spot_watcher.py --cloud aws --address $RAY_HEAD_IP:6379
    python clusters/spot_watcher.py --cloud gcp --address $RAY_HEAD_IP:6379
    python clusters/spot_watcher.py --cloud gcp --node-id <hex> --metadata-url http://127.0.0.1:8080
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

AWS_METADATA_URL = "http://169.254.169.254"
GCP_METADATA_URL = "http://metadata.google.internal"
AWS_TOKEN_TTL_S = 21600
GCP_SPOT_NOTICE_S = 30  # Spot / preemptible VMs are stopped about 30 s after the notice
DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"

log = logging.getLogger("spot_watcher")


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
        if status != 200 or not body.strip():
            raise MetadataError(f"IMDSv2 token request answered {status}: {body[:200]!r}")
        self._token = body.strip()
        # renew well before the TTL runs out
        self._token_expires = self.clock() + 0.9 * self.token_ttl_s
        return self._token

    def _token_now(self) -> str:
        if self._token is None or self.clock() >= self._token_expires:
            return self._fetch_token()
        return self._token

    def poll(self) -> Notice | None:
        """The scheduled interruption (``spot/instance-action``), or ``None`` (HTTP 404)."""
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


def notice_source(cloud: str, base_url: str | None = None) -> NoticeSource:
    """The notice source of ``cloud`` (``aws`` | ``gcp``), optionally at another ``base_url``."""
    if cloud == "aws":
        return AwsSpotNotices(base_url or AWS_METADATA_URL)
    if cloud == "gcp":
        return GcpPreemptionNotices(base_url or GCP_METADATA_URL)
    raise ValueError(f"cloud={cloud!r}: allowed: aws, gcp")


# ------------------------------------------------------------------------------------- drain


def drain_command(node_id: str, deadline_remaining_s: int, reason_message: str,
                  address: str | None = None, ray_executable: str | None = None) -> list[str]:
    """The ``ray drain-node`` command line that drains ``node_id`` for a preemption."""
    ray = ray_executable or shutil.which("ray") or "ray"
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


def local_node_id(address: str | None = None, attempts: int = 30, wait_s: float = 2.0) -> str:
    """The Ray node id of this machine's raylet (connects a short-lived driver to it).

    Assumes one Ray node per machine, as on cloud VMs and Kubernetes pods; where several nodes
    share a machine (tests), pass the node id explicitly. Retries while the raylet is still
    starting (``ray start`` just ran).
    """
    import ray

    last: Exception | None = None
    for _ in range(attempts):
        try:
            ray.init(address=address or "auto", log_to_driver=False, logging_level="ERROR")
            try:
                return ray.get_runtime_context().get_node_id()
            finally:
                ray.shutdown()
        except Exception as exc:  # raylet not up yet, GCS unreachable for a moment, ...
            last = exc
            time.sleep(wait_s)
    raise RuntimeError(f"no local Ray node found at address={address or 'auto'}: {last}")


# ------------------------------------------------------------------------------------- watch


def watch(
    source: NoticeSource,
    drain: Callable[[Notice], None],
    interval_s: float = 5.0,
    stop: threading.Event | None = None,
    max_polls: int | None = None,
    drain_attempts: int = 3,
    sleep: Callable[[float], None] = time.sleep,
) -> Notice | None:
    """Poll ``source`` every ``interval_s`` until a notice arrives, then ``drain`` it once.

    Metadata errors (server briefly unreachable, odd answers) are logged and polling goes on.
    A failed drain is retried ``drain_attempts`` times. Returns the notice, or ``None`` when
    ``stop`` is set or ``max_polls`` polls found nothing (a notice whose drain kept failing is
    returned too: the node goes away regardless, and its runs fall back to their last periodic
    checkpoint).
    """
    polls = 0
    while (stop is None or not stop.is_set()) and (max_polls is None or polls < max_polls):
        polls += 1
        try:
            notice = source.poll()
        except (MetadataError, OSError) as exc:  # URLError, timeouts and refusals are OSErrors
            log.warning("%s metadata poll failed: %s", source.cloud, exc)
            notice = None
        if notice is not None:
            log.warning("%s interruption notice (%s, %d s left): draining this Ray node",
                        notice.cloud, notice.action, notice.remaining_s())
            for attempt in range(1, drain_attempts + 1):
                try:
                    drain(notice)
                    log.warning("drain accepted")
                    return notice
                except Exception as exc:
                    log.error("drain attempt %d failed: %s", attempt, exc)
                    if attempt < drain_attempts:
                        sleep(1.0)
            return notice
        if stop is not None:
            if stop.wait(interval_s):
                break
        else:
            sleep(interval_s)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``clusters/spot_watcher.py``; returns the exit status."""
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
    parser.add_argument("--metadata-url", default=None,
                        help="metadata server base URL (default: the cloud's link-local one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s spot_watcher %(levelname)s %(message)s")
    source = notice_source(args.cloud, args.metadata_url)
    node_id = args.node_id or local_node_id(args.address)
    interval = args.interval if args.interval is not None else (5.0 if args.cloud == "aws" else 1.0)
    log.info("watching %s interruption notices for Ray node %s every %g s",
             args.cloud, node_id, interval)

    drained: list[Notice] = []

    def drain(notice: Notice) -> None:
        drain_with_ray_cli(node_id, notice.remaining_s(),
                           f"{notice.cloud} spot interruption: {notice.action}", args.address)
        drained.append(notice)

    watch(source, drain, interval)
    return 0 if drained else 1


__all__ = [
    "AwsSpotNotices", "DrainError", "GcpPreemptionNotices", "MetadataError", "Notice",
    "NoticeSource", "drain_command", "drain_with_ray_cli", "local_node_id", "main",
    "notice_source", "watch",
]


if __name__ == "__main__":
    raise SystemExit(main())
