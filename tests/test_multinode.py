"""A real multi-node Ray cluster on this machine: experts land on the node type they ask for and
survive losing their node mid-training, whether it just dies or is drained on a spot notice.

The cluster is what ``ray up clusters/aws.yaml`` builds, minus the cloud: a head started with
``ray start --head`` that carries the ``train_driver`` resource (job drivers and Ray Train
controllers live there, as on the real head), and two workers started with ``ray start`` that
advertise the custom resources of the GPU node types (``gpu_80gb``, ``gpu_24gb``) on CPU. A small
campaign is submitted with ``ray job submit --working-dir <repo>``, exactly as a user would.

Every Ray process of this test runs in its own session (process group) with its own ports and
``--temp-dir``, so it neither collides with nor touches the other Ray instances on the machine
(the test session's own, other runs); the finaliser kills only those process groups and any
leftover process whose command line names this test's private directory. Token auth is on, with
a private token file (``RAY_AUTH_TOKEN_PATH``), as on a real cluster.

The corpus is prepared beforehand on the test session's own Ray instance, with the job's
settings, into the campaign root the job uses: the job finds it up to date and reuses it
(preparing it on the three one-CPU nodes took 30-70 s of this test; the prepare stage has its
own tests). It is the session's prepared demo corpus (tests/conftest.py) clustered again with
K = 2: its embeddings are reused, so only the clustering runs (~3 s).

Cost: about 1.5 minutes on an otherwise idle 2-core machine (three nodes ~10 s, training, two
losses and two replacement nodes). On a loaded machine a
``ray start`` can miss Ray's fixed 30 s registration window; node starts are then retried, which
is slow but keeps the test meaningful. ``STEPS`` is sized for this machine's ~2-6 steps/s per
expert: the losses must land mid-training.
"""

from __future__ import annotations

import glob
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# the `ray` of the interpreter running the tests (an unactivated virtualenv's bin/ is not on PATH)
_VENV_RAY = os.path.join(os.path.dirname(sys.executable), "ray")
RAY = _VENV_RAY if os.access(_VENV_RAY, os.X_OK) else (shutil.which("ray") or "ray")

STEPS = 180
# periodic checkpoints every 33 steps never land on a multiple of 10 (below 330), where the loop
# checks for a drain notice: a checkpoint at a multiple of 10 is the drain's
CHECKPOINT_EVERY = 33
NODE_TYPES = {"gpu_80gb": 0, "gpu_24gb": 1}  # custom resource -> the cluster whose expert needs it
#: the job's clustering settings (the corpus is prepared with them before the job)
CLUSTERING = ["clustering.k=2", "clustering.fine_centroids=8", "tracking.enabled=false"]


# ------------------------------------------------------------------------------------- helpers


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


class PortPool:
    """Hands out distinct free TCP ports (and contiguous ranges) from a random region."""

    def __init__(self) -> None:
        self.taken: set[int] = set()

    def range(self, n: int) -> int:
        """First port of ``n`` contiguous free ports."""
        for _ in range(200):
            base = random.randrange(20_000, 60_000 - n)
            ports = range(base, base + n)
            if not self.taken.intersection(ports) and all(_port_free(p) for p in ports):
                self.taken.update(ports)
                return base
        raise RuntimeError(f"no {n} contiguous free ports found")

    def one(self) -> int:
        """One free port."""
        return self.range(1)


@dataclass
class RayNode:
    """One ``ray start --block`` process group of the local cluster."""

    name: str
    resources: dict[str, float]
    proc: subprocess.Popen
    temp_dir: str
    log: Path
    node_id: str | None = None


class LocalRayCluster:
    """Head + worker nodes started with ``ray start`` in private sessions, ports and temp dirs."""

    def __init__(self) -> None:
        # short base path: Ray's unix socket paths under --temp-dir must stay < 108 characters
        self.base = tempfile.mkdtemp(prefix="hddmn-", dir="/tmp")
        self.token_path = os.path.join(self.base, "auth_token")
        self.token = secrets.token_hex(32)
        with open(self.token_path, "w") as f:
            f.write(self.token)
        self.ports = PortPool()
        self.nodes: list[RayNode] = []
        self.gcs_port = self.ports.one()
        self.dashboard_port = self.ports.one()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update({
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray processes that look for "their" cluster without an address (Ray Train's
            # placement group cleaner uses the state API) would find every Ray instance on this
            # machine; on a real cluster there is one per machine
            "RAY_ADDRESS": f"127.0.0.1:{self.gcs_port}",
            # notice a dead raylet within ~10 s instead of ~15-30 s (GCS health checks); not
            # tighter: a raylet on a loaded 2-core machine must not be declared dead by mistake
            "RAY_health_check_period_ms": "2000",
            "RAY_health_check_failure_threshold": "5",
            # Ray Train polls for drained nodes every 5 s by default
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
            # and its workers (their reports, checkpoints, deaths) every 2 s
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
            "PYTHONUNBUFFERED": "1",
            "HDD_TEST_CAMPAIGN_ROOT": os.path.join(self.base, "campaign"),
        })

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _node_ports(self) -> list[str]:
        p = self.ports
        return [
            f"--node-manager-port={p.one()}",
            f"--object-manager-port={p.one()}",
            f"--dashboard-agent-listen-port={p.one()}",
            f"--dashboard-agent-grpc-port={p.one()}",
            f"--metrics-export-port={p.one()}",
            f"--runtime-env-agent-port={p.one()}",
            f"--min-worker-port={(w := p.range(40))}",
            f"--max-worker-port={w + 39}",
        ]

    def _start(self, name: str, args: list[str], resources: dict[str, float]) -> RayNode:
        temp_dir = os.path.join(self.base, name)
        os.makedirs(temp_dir, exist_ok=True)
        log = Path(self.base, f"{name}.log")
        cmd = [RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}",
               "--num-cpus=1", "--num-gpus=0", "--object-store-memory=200000000",
               f"--resources={json.dumps(resources)}", *self._node_ports(), *args]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=self.base, start_new_session=True)
        node = RayNode(name, resources, proc, temp_dir, log)
        self.nodes.append(node)
        return node

    def start_head(self, resources: dict[str, float]) -> RayNode:
        """The head: GCS, dashboard (job server) on 127.0.0.1, and ``resources``."""
        head = self._start("head", [
            "--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.ports.one()}",
        ], resources)
        self.wait_for(lambda: self._api("/api/version") is not None, 90, "the head's dashboard",
                      head)
        return head

    def start_worker(self, name: str, resources: dict[str, float]) -> RayNode:
        """Start a worker node advertising ``resources`` (returns at once; see wait_joined)."""
        return self._start(name, [f"--address={self.gcs_address}"], resources)

    def add_workers(self, specs: dict[str, dict[str, float]]) -> list[RayNode]:
        """Start worker nodes (name -> resources) at once; return them once all are alive."""
        return self.wait_joined([self.start_worker(n, r) for n, r in specs.items()])

    def wait_joined(self, nodes: list[RayNode], within_s: float = 300) -> list[RayNode]:
        """Wait until the GCS lists every started worker alive; returns them (node ids set).

        On a loaded machine a raylet can miss ``ray start``'s fixed 30 s registration window
        ("The current node timed out during startup"): such a node is started afresh, one at a
        time so that the retries do not compete with each other, until ``within_s`` is spent.
        """
        deadline = time.time() + within_s
        result = {n.name: n for n in nodes}
        for node in self._join(nodes, within_s):
            print(f"{node.name} did not join:\n{self.tail(node.log, 6)}")
            attempt = 0
            while time.time() < deadline:
                attempt += 1
                retry = self.start_worker(f"{node.name}-retry{attempt}", node.resources)
                if not self._join([retry], max(10.0, deadline - time.time())):
                    result[node.name] = retry
                    break
                print(f"{retry.name} did not join:\n{self.tail(retry.log, 6)}")
            else:
                pytest.fail(f"{node.name} did not join within {within_s:.0f} s ({attempt + 1} "
                            f"starts; machine overloaded?)\n{self.diagnostics()}")
        return [result[n.name] for n in nodes]

    def _join(self, nodes: list[RayNode], timeout: float = 120) -> list[RayNode]:
        """Wait for ``nodes`` to register; returns (killed) those whose start failed."""
        pending, failed = {n.name: n for n in nodes}, []
        deadline = time.time() + timeout
        while pending and time.time() < deadline:
            alive = self.alive_nodes()
            for name, node in list(pending.items()):
                if node.proc.poll() is not None:  # ray start gave up
                    failed.append(pending.pop(name))
                    continue
                known = {m.node_id for m in self.nodes if m.node_id}
                match = [n["node_id"] for n in alive if n["node_id"] not in known and all(
                    n.get("resources_total", {}).get(k) == v for k, v in node.resources.items())]
                if match:
                    node.node_id = match[0]
                    del pending[name]
            if pending:
                time.sleep(0.5)
        failed.extend(pending.values())  # still not alive after the timeout
        for node in failed:
            self.kill(node)
        return failed

    def kill(self, node: RayNode) -> None:
        """SIGKILL the node's whole process group (``ray start``, raylet, agents, workers)."""
        try:
            os.killpg(node.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.proc.wait(timeout=30)

    def _api(self, path: str) -> Any:
        req = urllib.request.Request(self.dashboard_url + path,
                                     headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read() or b"null")
        except Exception:
            return None

    def alive_nodes(self) -> list[dict[str, Any]]:
        """The GCS's view of live nodes (through the dashboard's state API)."""
        reply = self._api("/api/v0/nodes?limit=100&detail=true")
        try:
            nodes = reply["data"]["result"]["result"]
        except (TypeError, KeyError):
            return []
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def wait_for(self, predicate, timeout: float, what: str, node: RayNode | None = None) -> None:
        """Poll ``predicate`` every half second; fail with the node's log if its ``ray start``
        exits or ``timeout`` passes first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            if node is not None and node.proc.poll() is not None:
                pytest.fail(f"ray start for {node.name} exited with {node.proc.returncode}:\n"
                            + self.tail(node.log))
            time.sleep(0.5)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}"
                    + (f"\n{self.tail(node.log)}" if node else ""))

    def popen(self, cmd: list[str], log: Path) -> subprocess.Popen:
        """Start ``cmd`` in its own session with this cluster's environment, output to ``log``."""
        env = {**self.env, "RAY_ADDRESS": self.dashboard_url}
        with open(log, "w") as out:
            return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=REPO_ROOT, start_new_session=True)

    @staticmethod
    def tail(path: Path, n: int = 60) -> str:
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            return f"({path} unreadable)"
        return f"--- last {min(n, len(lines))} lines of {path} ---\n" + "\n".join(lines[-n:])

    def diagnostics(self) -> str:
        """Node logs and the raylet/GCS error tails, for a failure message."""
        parts = [self.tail(n.log, 30) for n in self.nodes]
        for pattern in ("head/session_latest/logs/gcs_server.out",
                        "*/session_latest/logs/raylet.out"):
            for f in sorted(glob.glob(os.path.join(self.base, pattern))):
                parts.append(self.tail(Path(f), 15))
        return "\n".join(parts)

    def shutdown(self) -> None:
        """Kill every process group this cluster started, then stragglers naming its dir.

        A test cluster needs no graceful stop: ``ray start --block`` took its full 5 s grace
        after a SIGTERM, in every test that starts one."""
        for node in self.nodes:
            try:
                os.killpg(node.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for node in self.nodes:
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _kill_processes_mentioning(self.base)
        shutil.rmtree(self.base, ignore_errors=True)


def _kill_processes_mentioning(marker: str) -> list[int]:
    """SIGKILL processes whose command line contains ``marker`` (this test's private dir)."""
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except ProcessLookupError:
                pass
    return killed


def _expert_dirs(root: Path, cluster: int) -> list[Path]:
    return sorted(p for p in (root / "experts").glob(f"c{cluster}-*") if p.is_dir())


def _registered_checkpoint_step(expert_dir: Path) -> int:
    """Step of the latest checkpoint Ray Train has registered for the run (0 if none)."""
    try:
        snap = json.loads((expert_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snap["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


# ------------------------------------------------------------------------------------- test


@pytest.fixture
def cluster():
    """A head (``train_driver``) and two GPU-type workers; always torn down."""
    c = LocalRayCluster()
    try:
        c.start_head({"train_driver": 1})
        c.add_workers({"worker-80gb": {"gpu_80gb": 1}, "worker-24gb": {"gpu_24gb": 1}})
        yield c
    finally:
        c.shutdown()


def _node(cluster: LocalRayCluster, resource: str) -> RayNode:
    return next(n for n in cluster.nodes
                if resource in n.resources and n.node_id and n.proc.poll() is None)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_campaign_places_experts_by_node_type_and_survives_losing_nodes(cluster,
                                                                         prepared_campaign):
    """Placement by node type; a killed node and a spot-drained node are both survived.

    * ``gpu_80gb`` node: its raylet's process group is SIGKILLed once the expert has its third
      registered checkpoint (a node that just dies: an ordinary failure, ``max_failures``; the
      later the loss, the fewer steps its resumed run trains again).
    * ``gpu_24gb`` node: the spot watcher (``clusters/spot_watcher.py``, the real script with
      its real ``ray drain-node`` call) polls a fake GCP metadata server; once the expert has a
      checkpoint the server announces a preemption, the watcher drains the node, Ray Train
      tells the loop, the loop checkpoints at once (at a multiple of 10 steps, which periodic
      checkpoints every 33 steps never hit below 330), and only then the node is killed,
      as the cloud would.

    Once both are lost, a replacement node of each type joins; both experts resume from those
    checkpoints and finish, and the job exits 0.
    """
    from test_clusters import FakeMetadataServer

    t0 = time.time()

    def say(msg: str) -> None:
        print(f"[{time.time() - t0:.0f} s] {msg}")

    from hdd_ray.config import load_config
    from hdd_ray.prepare import prepare_corpus

    root = Path(cluster.env["HDD_TEST_CAMPAIGN_ROOT"])
    shutil.copytree(prepared_campaign.root, root)  # its embeddings: K = 2 reuses them
    corpus = [o for o in prepared_campaign.overrides if o.startswith("corpus.")]
    prepare_corpus(load_config(overrides=[f"root={root}", *corpus, *CLUSTERING,  # session's Ray
                                          "experts.ddpm_clusters=[0]"]))
    say("corpus prepared")
    per_expert = ", ".join(
        f"{{cluster: {c}, resources: {{cpus_per_worker: 0.5, custom: {{{name}: 1}}}}}}"
        for name, c in NODE_TYPES.items())
    victims = {name: _node(cluster, name) for name in NODE_TYPES}
    submit_log, watcher_log = Path(cluster.base, "submit.log"), Path(cluster.base, "watcher.log")
    with FakeMetadataServer() as metadata:
        watcher = cluster.popen([
            sys.executable, str(REPO_ROOT / "clusters" / "spot_watcher.py"), "--cloud", "gcp",
            "--metadata-url", metadata.url, "--node-id", str(victims["gpu_24gb"].node_id),
            "--address", cluster.gcs_address, "--interval", "0.5"], watcher_log)
        submit = cluster.popen([
            RAY, "job", "submit", f"--address={cluster.dashboard_url}",
            "--working-dir", str(REPO_ROOT), '--entrypoint-resources={"train_driver": 1}', "--",
            # resolved by the driver on the head from the head's environment, the way the
            # cluster YAMLs hand MLFLOW_TRACKING_URI to jobs (`ray job submit` quotes every
            # argument, so a shell `$VAR` would reach the job unexpanded)
            # the interpreter running the tests, not whatever `python` PATH finds first (an
            # unactivated virtualenv would give a python without the project's dependencies)
            sys.executable, "jobs/train_all_experts.py", "root=${oc.env:HDD_TEST_CAMPAIGN_ROOT}",
            *corpus, *CLUSTERING, "sampling.k=1",
            "experts.ddpm_clusters=[0]",
            f"experts.train.steps={STEPS}", f"experts.train.checkpoint_every={CHECKPOINT_EVERY}",
            "experts.resources.cpus_per_worker=0.5", f"experts.list=[{per_expert}]",
            "evaluation.enabled=false",
            "ray.executor=train",  # drains and preemption budgets: Ray Train's, tested here
            "experts.model=DiT-T/2",  # the step time the kill schedule below was sized for
            "--skip-router",
        ], submit_log)

        def fail(msg: str) -> None:
            pytest.fail(f"{msg}\n{cluster.tail(submit_log, 80)}\n{cluster.tail(watcher_log, 20)}"
                        f"\n{cluster.diagnostics()}")

        killed_at: dict[str, int] = {}
        notice_at: int | None = None
        try:
            deadline = time.time() + 300
            while len(killed_at) < 2 and submit.poll() is None and time.time() < deadline:
                steps = {name: _registered_checkpoint_step(d[0]) if (d := _expert_dirs(root, c))
                         else 0 for name, c in NODE_TYPES.items()}
                if "gpu_80gb" not in killed_at and steps["gpu_80gb"] >= 3 * CHECKPOINT_EVERY:
                    if steps["gpu_80gb"] >= STEPS:
                        fail("the 80 GB expert finished before its node could be killed")
                    cluster.kill(victims["gpu_80gb"])
                    killed_at["gpu_80gb"] = steps["gpu_80gb"]
                    say(f"killed the 80 GB node after checkpoint step {steps['gpu_80gb']}")
                step24 = steps["gpu_24gb"]
                if notice_at is None and step24 >= CHECKPOINT_EVERY:
                    metadata.gcp_preempted = True
                    notice_at = step24
                    say(f"GCP preemption notice for the 24 GB node at checkpoint step {step24}")
                if notice_at is not None and "gpu_24gb" not in killed_at and step24 > notice_at:
                    if step24 >= STEPS:
                        fail(f"the 24 GB expert finished without a drain checkpoint after the "
                             f"notice at step {notice_at}")
                    if step24 % CHECKPOINT_EVERY == 0:  # a periodic one came first: wait on
                        time.sleep(0.3)
                        continue
                    cluster.kill(victims["gpu_24gb"])
                    killed_at["gpu_24gb"] = step24
                    say(f"killed the drained 24 GB node after its drain checkpoint, step {step24}")
                time.sleep(0.3)
            if len(killed_at) < 2:
                fail(f"not every node could be lost mid-training: killed {killed_at}, "
                     f"notice at {notice_at}, job exit {submit.poll()}")
            # the replacements start once both nodes are lost: a `ray start` is seconds of both
            # CPUs, which made the drain (its `ray drain-node`, Ray Train's notice) lag by over
            # a hundred steps while the 80 GB node's replacement came up
            cluster.wait_joined([cluster.start_worker(f"worker-{name[4:]}-2", {name: 1})
                                 for name in NODE_TYPES])
            say("replacement nodes joined")
            try:
                rc = submit.wait(timeout=240)
            except subprocess.TimeoutExpired:
                fail("ray job submit did not finish within 240 s of the replacements joining")
            say(f"ray job submit exited with {rc}")
            if rc != 0:
                fail(f"ray job submit exited with {rc}")
            watcher_rc = watcher.wait(timeout=30)
        finally:
            for proc in (submit, watcher):
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)

    assert watcher_rc == 0 and "drain accepted" in watcher_log.read_text(), cluster.tail(watcher_log)
    # the job reused the corpus prepared above (same settings) instead of preparing it again
    assert "prepare: reusing" in submit_log.read_text(), cluster.tail(submit_log)
    for name, c in NODE_TYPES.items():
        dirs = _expert_dirs(root, c)
        assert len(dirs) == 1, f"expected one expert dir for cluster {c}, got {dirs}"
        desc = json.loads((dirs[0] / "expert.json").read_text())
        resources = desc["node"]["resources"]
        assert resources.get(name) == 1, f"cluster {c} expert ran on {resources}, wanted {name}"
        assert not (set(NODE_TYPES) - {name}) & set(resources), f"cluster {c}: wrong node type"
        assert desc["steps"] == STEPS
        attempts = desc["attempts"]
        assert len(attempts) > 1, f"{name}: no retry recorded after losing the node: {attempts}"
        assert attempts[0]["node_id"] == victims[name].node_id
        assert attempts[-1]["node_id"] != victims[name].node_id
        resumed = [a["start_step"] for a in attempts[1:]]
        assert resumed[0] > 0, f"{name}: the retry did not resume from a checkpoint: {attempts}"
        if name == "gpu_24gb":  # resumed from (at least) the checkpoint the drain triggered
            assert killed_at[name] % CHECKPOINT_EVERY != 0 and resumed[0] >= killed_at[name]
