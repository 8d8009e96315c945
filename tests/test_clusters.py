"""The cluster definitions (clusters/), the campaign configs for real runs and the spot watcher.

Fast and offline: nothing here reaches a cloud or a Kubernetes API.

* Cluster launcher YAMLs go through Ray's own validator, the one ``ray up`` runs:
  ``ray.autoscaler._private.util.prepare_config`` + ``validate_config`` against the
  ``ray-schema.json`` shipped in the ray wheel. Both are private API: these tests pin the
  behaviour of Ray 2.60 and may need a touch on a Ray upgrade.
* KubeRay manifests are parsed and checked structurally, and the RayCluster is converted into an
  autoscaling config by Ray's own KubeRay reader (``_derive_autoscaling_config_from_ray_cr``,
  private as well), which reads the custom resources from ``rayStartParams`` the way the
  autoscaler in the head pod will.
* The spot watcher (``clusters/spot_watcher.py``) runs against a fake metadata server on 127.0.0.1 that
  speaks the AWS IMDSv2 and GCP metadata protocols.
"""

from __future__ import annotations

import copy
import http.client
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from hdd_ray.config import load_config, resolve_experts

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "clusters"
sys.path.insert(0, str(CLUSTERS))  # the spot watcher is node-side tooling, not in the package
import spot_watcher as spot  # noqa: E402

LAUNCHER_YAMLS = [CLUSTERS / "aws.yaml", CLUSTERS / "gcp.yaml"]
KUBERAY = sorted((CLUSTERS / "kuberay").glob("*.yaml"))
CAMPAIGNS = [ROOT / "jobs" / "configs" / "paper-8x-xl.yaml",
             ROOT / "jobs" / "configs" / "single-gpu-24gb.yaml"]
GPU_TYPES = ("gpu_80gb", "gpu_24gb")
RAY_VERSION = "2.60.0"
DRIVER_RESOURCE = "train_driver"


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _validate(config: dict[str, Any]) -> dict[str, Any]:
    """What ``ray up`` does with a cluster YAML before touching a cloud (Ray 2.60)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _all_commands(config: dict[str, Any]) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in config.get(key, [])]


def _repo_paths_named(text: str) -> set[str]:
    """Repository files a command or comment names (``jobs/...py``, ``jobs/configs/...yaml``,
    ``clusters/...``), given relative to the repo root or under the node's checkout."""
    found = re.findall(r"(?:/home/ray/hdd_ray/)?((?:jobs|clusters)/[\w./-]+\.(?:py|yaml))", text)
    return set(found)


# ------------------------------------------------------------------------------------- launcher


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_passes_rays_own_validator(path):
    prepared = _validate(_load(path))
    assert prepared["provider"]["type"] == path.stem


def test_a_broken_cluster_yaml_fails_rays_validator():
    import jsonschema

    config = _load(CLUSTERS / "aws.yaml")
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu-24gb-spot"]["resources"]["gpu_24gb"] = 0.5  # must be int
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu-80gb-spot"]["max_wrkers"] = 2  # a typo is refused
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)
    bad = copy.deepcopy(config)
    del bad["available_node_types"]["head"]["node_config"]
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_has_the_heterogeneous_preemptible_shape(path):
    config = _load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    # the head hosts drivers and Train controllers, never data or training work
    assert head["resources"][DRIVER_RESOURCE] >= 1 and head["resources"]["CPU"] == 0
    for gpu in GPU_TYPES:
        offers = {name: t for name, t in types.items() if t["resources"].get(gpu)}
        markets = {_market(t["node_config"]) for t in offers.values()}
        assert markets == {"spot", "on-demand"}, f"{gpu} must be offered as spot and on-demand"
        for t in offers.values():
            assert t["resources"]["GPU"] == t["resources"][gpu], "one custom unit per GPU"
            assert t["min_workers"] == 0 and t["max_workers"] >= 1
        # spot first: autoscaler v2 prefers higher priority and falls back on failed launches
        spot_prio = min(t["priority"] for t in offers.values() if _market(t["node_config"]) == "spot")
        od_prio = max(t["priority"] for t in offers.values() if _market(t["node_config"]) != "spot")
        assert spot_prio > od_prio
    assert any(t["resources"].get("GPU", 0) == 0 and name != config["head_node_type"]
               for name, t in types.items()), "CPU workers for Ray Data"
    assert config["idle_timeout_minutes"] > 0 and config["max_workers"] >= 1
    assert not _market(head["node_config"]) == "spot", "the head must not be preemptible"
    from ray._private.label_utils import validate_node_label_syntax

    for t in types.values():
        validate_node_label_syntax(t.get("labels", {}))


def _market(node_config: dict[str, Any]) -> str:
    if node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot":  # AWS
        return "spot"
    if node_config.get("scheduling", {}).get("provisioningModel") == "SPOT":  # GCP
        return "spot"
    return "on-demand"


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_pins_ray_and_listens_on_no_public_address(path):
    config = _load(path)
    docker = config["docker"]
    images = [docker["image"], docker.get("head_image", docker["image"])] + [
        t["docker"]["worker_image"] for t in config["available_node_types"].values()
        if "worker_image" in t.get("docker", {})]
    assert all(image.startswith(f"rayproject/ray:{RAY_VERSION}-") for image in images), images
    commands = _all_commands(config)
    # every command key is set explicitly: Ray's defaults.yaml would otherwise install a
    # nightly Ray wheel (setup_commands) or open the dashboard on 0.0.0.0 (head start)
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config, key
    assert any("==" + RAY_VERSION in c and "pip install" in c for c in config["setup_commands"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in " ".join(commands)
    assert "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    # MLflow: on the head's private address, artifacts on object storage
    mlflow = next(c for c in commands if "mlflow server" in c and "nohup" in c)
    assert "--host $(hostname -I" in mlflow and "--artifacts-destination" in mlflow
    assert "spot_watcher.py" in " ".join(config["worker_start_ray_commands"])


@pytest.mark.parametrize("path", LAUNCHER_YAMLS + KUBERAY + [CLUSTERS / "kuberay" / "Dockerfile"],
                         ids=lambda p: p.name)
def test_every_job_and_config_a_cluster_file_names_exists(path):
    text = path.read_text()
    named = _repo_paths_named(text)
    if path.name in ("aws.yaml", "gcp.yaml") or path.name.startswith("rayjob"):
        assert any(n.startswith("jobs/") and n.endswith(".py") for n in named), named
    missing = [n for n in named if not (ROOT / n).exists()]
    assert not missing, f"{path.name} names files that do not exist: {missing}"


def test_readme_commands_name_existing_files_and_every_placeholder():
    readme = (CLUSTERS / "README.md").read_text()
    named = _repo_paths_named(readme)
    assert "jobs/train_all_experts.py" in named and "jobs/train_expert.py" in named
    assert not [n for n in named if not (ROOT / n).exists()]
    placeholders = set()
    for path in [*LAUNCHER_YAMLS, *KUBERAY, *CAMPAIGNS, CLUSTERS / "kuberay" / "Dockerfile"]:
        placeholders |= set(re.findall(r"REPLACE_ME_[A-Z_]+", path.read_text()))
    assert placeholders, "the fill-in markers moved?"
    undocumented = sorted(p for p in placeholders if p not in readme)
    assert not undocumented, f"placeholders missing from clusters/README.md: {undocumented}"


# ------------------------------------------------------------------------------------- kuberay


def _kuberay_docs() -> list[dict[str, Any]]:
    return [doc for path in KUBERAY for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_kuberay_manifests_parse_and_name_their_kinds():
    kinds = {(d["apiVersion"], d["kind"]) for d in _kuberay_docs()}
    assert ("ray.io/v1", "RayCluster") in kinds and ("ray.io/v1", "RayJob") in kinds
    for d in _kuberay_docs():
        assert d["metadata"]["name"]


def _raycluster() -> dict[str, Any]:
    return next(d for d in _kuberay_docs() if d["kind"] == "RayCluster")


def test_raycluster_has_a_worker_group_per_gpu_type_with_autoscaling():
    cr = _raycluster()
    spec = cr["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == RAY_VERSION
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP", "nothing exposed outside the cluster"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for gpu in GPU_TYPES:
        (group,) = [g for g in groups.values() if gpu in g["rayStartParams"].get("resources", "")]
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert group["rayStartParams"]["num-gpus"] == "1"
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
        selector = group["template"]["spec"]["nodeSelector"]
        assert selector.get("cloud.google.com/gke-spot") == "true", "spot through node selectors"
    assert any("gpu" not in json.dumps(g["rayStartParams"]) for g in groups.values()), "CPU group"


def test_rays_kuberay_reader_sees_the_custom_resources_and_groups():
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    cr = copy.deepcopy(_raycluster())
    cr["metadata"].setdefault("namespace", "default")
    config = _derive_autoscaling_config_from_ray_cr(cr)  # also runs validate_config
    types = config["available_node_types"]
    assert types["headgroup"]["resources"][DRIVER_RESOURCE] >= 1
    assert types["headgroup"]["resources"]["CPU"] == 0
    for gpu in GPU_TYPES:
        (name,) = [n for n, t in types.items() if gpu in t["resources"]]
        assert types[name]["resources"][gpu] == types[name]["resources"]["GPU"] == 1
        assert types[name]["labels"]["hdd-ray/market"] == "spot"
    broken = copy.deepcopy(cr)
    broken["spec"]["workerGroupSpecs"][0]["rayStartParams"]["resources"] = '"{\\"gpu_80gb\\": 0.5}"'
    with pytest.raises(AssertionError):  # Ray's reader: custom resources must be integers
        _derive_autoscaling_config_from_ray_cr(broken)


def test_rayjob_runs_the_main_job_on_the_raycluster():
    job = next(d for d in _kuberay_docs() if d["kind"] == "RayJob")
    spec = job["spec"]
    assert spec["clusterSelector"]["ray.io/cluster"] == _raycluster()["metadata"]["name"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/train_all_experts.py"]
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file()
    assert json.loads(spec["entrypointResources"]) == {DRIVER_RESOURCE: 1}
    overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
    load_config(ROOT / config, overrides)  # the entrypoint's own config + overrides load


def test_kuberay_image_pins_ray():
    dockerfile = (CLUSTERS / "kuberay" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{RAY_VERSION}-" in dockerfile
    assert f"ray[default,train,tune,data]=={RAY_VERSION}" in dockerfile


# ------------------------------------------------------------------------------------- campaigns


def test_paper_campaign_resolves_to_the_papers_experts_on_the_node_types():
    cfg = load_config(CAMPAIGNS[0])
    experts = resolve_experts(cfg)
    assert len(experts) == 8
    assert sorted(e.objective for e in experts).count("ddpm_eps") == 2
    assert {e.objective for e in experts} == {"ddpm_eps", "fm_velocity"}
    assert {e.model for e in experts} == {"DiT-XL/2"}
    assert cfg.clustering.embedder == "dinov2" and cfg.experts.text.encoder == "open_clip"
    assert cfg.experts.text.arch == "ViT-L-14" and cfg.corpus.image_size == 256
    assert cfg.sampling.routing == "topk" and cfg.sampling.k == 2
    placement = {e.cluster: set(e.resources["custom"]) for e in experts}
    assert all(len(p) == 1 and p <= set(GPU_TYPES) for p in placement.values()), placement
    # heterogeneous hardware: each kind hosts experts, and one DDPM expert runs on each
    by_type = {gpu: [e for e in experts if gpu in e.resources["custom"]] for gpu in GPU_TYPES}
    assert all(by_type.values())
    assert all(any(e.objective == "ddpm_eps" for e in es) for es in by_type.values())
    for e in experts:  # one expert = one GPU, and it fits every GPU node type of the YAMLs
        assert e.resources["num_workers"] == 1 and e.resources["gpus_per_worker"] == 1
        assert e.resources["cpus_per_worker"] <= 10
    # the paper's model: DiT-XL/2 on SD-VAE latents (256 px -> 32x32x4), nothing in pixel space
    assert cfg.latents.vae and cfg.latents.vae.endswith("sd-vae-ft-mse")
    header = CAMPAIGNS[0].read_text().split("\nname:")[0]
    assert "32x32x4" in header and "fit the node's RAM" not in header


def test_single_gpu_campaign_runs_one_expert_at_a_time_on_the_gpu():
    cfg = load_config(CAMPAIGNS[1])
    experts = resolve_experts(cfg)
    assert len(experts) == 8 and [e.objective for e in experts].count("ddpm_eps") == 2
    assert cfg.ray.max_concurrent_experts == 1
    assert all(e.resources["gpus_per_worker"] == 1 and not e.resources["custom"] for e in experts)
    assert cfg.router.resources.gpus_per_worker == 1
    assert cfg.latents.vae and cfg.latents.vae.endswith("sd-vae-ft-mse")
    assert {e.model for e in experts} == {"DiT-B/2"}  # DiT-XL/2 does not train on 24 GB


def test_paper_campaign_takes_the_mlflow_server_from_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.2:5000")
    assert load_config(CAMPAIGNS[0]).tracking.uri == "http://10.0.0.2:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert load_config(CAMPAIGNS[0]).tracking.uri is None


# ------------------------------------------------------------------------------------- spot watcher


#: misbehaviours of a metadata server, one per request while ``FakeMetadataServer.faults`` lasts
FAULTS = ("status-500", "garbage", "drop", "bad-status-line", "truncated", "too-many-headers",
          "slow")


class FakeMetadataServer:
    """AWS IMDSv2 and GCP metadata endpoints on 127.0.0.1 (a random port), in a thread.

    Set ``aws_action`` (a dict) or ``gcp_preempted`` (bool) to announce an interruption;
    ``expire_tokens()`` makes every issued IMDSv2 token stale (the next use answers 401).
    ``requests`` records ``(method, path, headers with lower-case names)``. ``faults`` is a list
    of :data:`FAULTS`: each request takes the first one and answers with it instead (an error
    status, a garbage body, a dropped connection, a malformed status line, a body shorter than
    its Content-Length, 101 headers, or an answer after ``slow_s`` seconds); ``served_faults``
    records what was served.
    """

    def __init__(self, slow_s: float = 1.0) -> None:
        self.aws_action: dict[str, str] | None = None
        self.gcp_preempted = False
        self.tokens: set[str] = set()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.faults: list[str] = []
        self.served_faults: list[str] = []
        self.slow_s = slow_s
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _headers(self) -> dict[str, str]:
                return {k.lower(): v for k, v in self.headers.items()}

            def _send(self, status: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _fault(self) -> bool:
                """Serve the next queued fault instead of an answer; False when none is left."""
                with server.lock:
                    if not server.faults:
                        return False
                    fault = server.faults.pop(0)
                    server.served_faults.append(fault)
                self.close_connection = True
                if fault == "status-500":
                    self._send(500, "Internal Server Error")
                elif fault == "garbage":
                    self._send(200, "\x00\ufffd<html>{not json")
                elif fault == "bad-status-line":
                    self.wfile.write(b"GARBAGE\r\n\r\n")
                elif fault == "truncated":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\nFAL")
                elif fault == "too-many-headers":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n"
                                     + b"".join(b"X-H%d: v\r\n" % i for i in range(101))
                                     + b"Content-Length: 0\r\n\r\n")
                elif fault == "slow":
                    time.sleep(server.slow_s)
                    self._send(200, "FALSE")
                # "drop": nothing at all, the connection just closes
                return True

            def do_PUT(self) -> None:
                server.requests.append(("PUT", self.path, self._headers()))
                if self._fault():
                    return
                if self.path != "/latest/api/token":
                    return self._send(404)
                if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._send(400, "missing TTL header")
                token = f"token-{len(server.tokens)}"
                server.tokens.add(token)
                self._send(200, token)

            def do_GET(self) -> None:
                server.requests.append(("GET", self.path, self._headers()))
                if self._fault():
                    return
                if self.path.startswith("/latest/"):
                    if self.headers.get("X-aws-ec2-metadata-token") not in server.tokens:
                        return self._send(401)
                    if self.path == "/latest/meta-data/spot/instance-action":
                        if server.aws_action is None:
                            return self._send(404, "Not Found")
                        return self._send(200, json.dumps(server.aws_action))
                    return self._send(404)
                if self.path.startswith("/computeMetadata/v1/"):
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._send(403, "Missing Metadata-Flavor:Google header.")
                    if self.path == "/computeMetadata/v1/instance/preempted":
                        return self._send(200, "TRUE" if server.gcp_preempted else "FALSE")
                return self._send(404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def expire_tokens(self) -> None:
        self.tokens.clear()

    def __enter__(self) -> FakeMetadataServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def metadata():
    with FakeMetadataServer() as server:
        yield server


class Recorder:
    """A drain action that records its notices (optionally failing the first ``fail`` calls)."""

    def __init__(self, fail: int = 0) -> None:
        self.notices: list[spot.Notice] = []
        self.fail = fail

    def __call__(self, notice: spot.Notice) -> None:
        self.notices.append(notice)
        if len(self.notices) <= self.fail:
            raise spot.DrainError("not accepted")


def test_aws_watcher_drains_once_on_an_interruption_notice(metadata):
    source = spot.AwsSpotNotices(metadata.url)
    drain = Recorder()
    assert spot.watch(source, drain, interval_s=0, max_polls=3) is None  # 404: no notice
    assert drain.notices == []
    metadata.aws_action = {"action": "terminate", "time": "2030-01-01T00:02:00Z"}
    notice = spot.watch(source, drain, interval_s=0, max_polls=3)
    assert notice is not None and drain.notices == [notice]
    assert notice.cloud == "aws" and notice.action == "terminate"
    assert notice.deadline == 1893456120.0  # 2030-01-01T00:02:00Z
    assert notice.remaining_s(now=1893456000.0) == 120
    puts = [r for r in metadata.requests if r[0] == "PUT"]
    assert len(puts) == 1, "one IMDSv2 token, reused across polls"
    gets = [r for r in metadata.requests if r[0] == "GET"]
    assert all(r[2].get("x-aws-ec2-metadata-token") == "token-0" for r in gets)


def test_aws_watcher_renews_a_rejected_token(metadata):
    source = spot.AwsSpotNotices(metadata.url)
    assert source.poll() is None
    metadata.expire_tokens()
    metadata.aws_action = {"action": "stop", "time": "2030-01-01T00:02:00Z"}
    notice = source.poll()
    assert notice is not None and notice.action == "stop"
    assert [r[0] for r in metadata.requests] == ["PUT", "GET", "GET", "PUT", "GET"]


def test_aws_watcher_renews_its_token_before_the_ttl(metadata):
    now = [1000.0]
    source = spot.AwsSpotNotices(metadata.url, token_ttl_s=100, clock=lambda: now[0])
    source.poll()
    now[0] += 95  # past 90% of the TTL
    source.poll()
    assert [r[0] for r in metadata.requests] == ["PUT", "GET", "PUT", "GET"]


def test_gcp_watcher_drains_once_when_the_vm_is_preempted(metadata):
    source = spot.GcpPreemptionNotices(metadata.url, clock=lambda: 5000.0)
    drain = Recorder()
    assert spot.watch(source, drain, interval_s=0, max_polls=2) is None
    metadata.gcp_preempted = True
    notice = spot.watch(source, drain, interval_s=0, max_polls=2)
    assert drain.notices == [notice]
    assert notice.cloud == "gcp" and notice.deadline == 5000.0 + spot.GCP_SPOT_NOTICE_S
    assert all(r[2].get("metadata-flavor") == "Google" for r in metadata.requests)


def test_gcp_metadata_without_the_flavor_header_is_refused(metadata):
    status, _ = spot._request(f"{metadata.url}/computeMetadata/v1/instance/preempted")
    assert status == 403  # the fake behaves like GCE: the watcher must send the header


def test_watcher_keeps_polling_through_metadata_errors_and_retries_the_drain(metadata):
    class Flaky:
        cloud = "gcp"

        def __init__(self) -> None:
            self.calls = 0
            self.inner = spot.GcpPreemptionNotices(metadata.url)

        def poll(self) -> spot.Notice | None:
            self.calls += 1
            if self.calls == 1:
                raise OSError("metadata server unreachable")
            if self.calls == 2:
                raise spot.MetadataError("odd answer")
            return self.inner.poll()

    metadata.gcp_preempted = True
    drain = Recorder(fail=1)
    notice = spot.watch(Flaky(), drain, interval_s=0, max_polls=5, sleep=lambda s: None)
    assert notice is not None and len(drain.notices) == 2  # one refused, one accepted


def test_watcher_stops_when_asked(metadata):
    stop = threading.Event()
    stop.set()
    assert spot.watch(spot.GcpPreemptionNotices(metadata.url), Recorder(), stop=stop) is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing Ray's CLI imports Serve
def test_default_drain_is_rays_drain_node_cli_with_a_preemption_reason():
    cmd = spot.drain_command("ab" * 28, 117.9, "gcp spot interruption: preempted",
                             "10.0.0.1:6379", ray_executable="ray")
    assert cmd == ["ray", "drain-node", "--address", "10.0.0.1:6379", "--node-id", "ab" * 28,
                   "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message",
                   "gcp spot interruption: preempted", "--deadline-remaining-seconds", "117"]
    # Ray 2.60's own CLI definition accepts exactly these options and this reason
    from ray.scripts.scripts import drain_node

    ctx = drain_node.make_context("drain-node", cmd[2:])
    assert ctx.params["reason"] == "DRAIN_NODE_REASON_PREEMPTION"
    assert ctx.params["deadline_remaining_seconds"] == 117
    assert ctx.params["node_id"] == "ab" * 28


def test_drain_with_ray_cli_reports_a_refused_drain():
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        return SimpleNamespace(returncode=1, stdout="",
                               stderr="Error: The drain request is not accepted: node busy\n")

    with pytest.raises(spot.DrainError, match="not accepted: node busy"):
        spot.drain_with_ray_cli("cd" * 28, 30, "aws spot interruption: terminate", run=run)
    assert calls[0][1] == "drain-node" and "--address" not in calls[0]
    spot.drain_with_ray_cli("cd" * 28, 30, "m", run=lambda cmd, **kw: SimpleNamespace(
        returncode=0, stdout="", stderr=""))


def test_watcher_script_drains_the_given_node_on_a_notice(metadata, monkeypatch):
    calls = []
    monkeypatch.setattr(spot, "drain_with_ray_cli",
                        lambda node_id, remaining, message, address: calls.append(
                            (node_id, remaining, message, address)))
    metadata.gcp_preempted = True
    rc = spot.main(["--cloud", "gcp", "--metadata-url", metadata.url, "--node-id", "ef" * 28,
                    "--address", "127.0.0.1:6379", "--interval", "0"])
    assert rc == 0
    ((node_id, remaining, message, address),) = calls
    assert node_id == "ef" * 28 and address == "127.0.0.1:6379"
    assert 0 < remaining <= spot.GCP_SPOT_NOTICE_S and "preempted" in message


def test_watcher_script_fails_when_ray_refuses_the_drain(metadata, monkeypatch):
    def refuse(*args, **kwargs):
        raise spot.DrainError("The drain request is not accepted")

    monkeypatch.setattr(spot, "drain_with_ray_cli", refuse)
    # a notice whose deadline has passed: the drain is retried 3 times, then given up
    metadata.aws_action = {"action": "terminate", "time": "2020-01-01T00:02:00Z"}
    assert spot.main(["--cloud", "aws", "--metadata-url", metadata.url,
                      "--node-id", "ef" * 28, "--interval", "0", "--max-backoff", "0.1"]) == 1


# ------------------------------------------------------------------------------------- spot watcher:
# a service that survives a misbehaving metadata server, a missing raylet and its own crash


def _fresh_poll_error(source: Any) -> BaseException:
    try:
        source.poll()
    except BaseException as exc:  # noqa: BLE001 - we want to see exactly what escapes
        return exc
    raise AssertionError("the fault did not make the poll fail")


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_metadata_faults_raise_more_than_oserror_from_a_bare_poll(metadata, cloud):
    source = spot.notice_source(cloud, metadata.url, timeout=0.3)
    metadata.slow_s = 0.8
    escaped = {}
    for fault in FAULTS:
        metadata.faults = [fault]
        escaped[fault] = _fresh_poll_error(source)
        assert metadata.served_faults[-1] == fault
    # malformed HTTP is not an OSError: the watcher used to die on exactly these
    assert isinstance(escaped["bad-status-line"], http.client.HTTPException)
    assert not isinstance(escaped["bad-status-line"], OSError)
    assert isinstance(escaped["truncated"], http.client.IncompleteRead)
    assert isinstance(escaped["too-many-headers"], http.client.HTTPException)
    assert isinstance(escaped["slow"], (TimeoutError, OSError))
    assert isinstance(escaped["status-500"], spot.MetadataError)


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_watcher_survives_every_metadata_fault_then_drains_a_real_notice(metadata, cloud, caplog):
    metadata.slow_s = 0.8
    metadata.faults = list(FAULTS) * 2
    source = spot.notice_source(cloud, metadata.url, timeout=0.3)
    drain = Recorder()
    sleeps: list[float] = []
    with caplog.at_level(logging.WARNING, logger="spot_watcher"):
        # nothing announced yet: every fault is survived, then polling goes on normally
        assert spot.watch(source, drain, interval_s=0.01, max_polls=len(FAULTS) * 2 + 3,
                          sleep=sleeps.append) is None
        assert metadata.faults == [] and drain.notices == []
        assert sorted(set(metadata.served_faults)) == sorted(FAULTS)
        if cloud == "aws":
            metadata.aws_action = {"action": "terminate", "time": "2030-01-01T00:02:00Z"}
        else:
            metadata.gcp_preempted = True
        metadata.faults = ["drop", "bad-status-line"]
        notice = spot.watch(source, drain, interval_s=0.01, max_polls=5, sleep=sleeps.append)
    assert notice is not None and notice.cloud == cloud and drain.notices == [notice]
    failures = [r.getMessage() for r in caplog.records if "poll failed" in r.getMessage()]
    assert len(failures) == len(FAULTS) * 2 + 2, failures
    assert any("BadStatusLine" in m for m in failures)
    assert any("IncompleteRead" in m for m in failures)


def test_watcher_backs_off_while_polls_fail_and_resets_after_a_good_one(metadata):
    metadata.faults = ["drop"] * 7
    source = spot.GcpPreemptionNotices(metadata.url, timeout=0.3)
    sleeps: list[float] = []
    spot.watch(source, Recorder(), interval_s=1.0, max_polls=9, max_backoff_s=5.0,
               sleep=sleeps.append)
    # 7 failures: 1, 2, 4, 5, 5, 5, 5 s; then two good polls at the normal interval
    assert sleeps == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0, 1.0, 1.0]


def test_watcher_survives_any_exception_a_source_raises():
    class Buggy:
        cloud = "aws"

        def __init__(self) -> None:
            self.errors = [KeyError("x"), ZeroDivisionError("y"), RuntimeError("z"),
                           http.client.LineTooLong("header line")]

        def poll(self) -> spot.Notice | None:
            if self.errors:
                raise self.errors.pop(0)
            return spot.Notice("aws", "terminate", time.time() + 120)

    drain = Recorder()
    notice = spot.watch(Buggy(), drain, interval_s=0, max_polls=10, sleep=lambda s: None)
    assert notice is not None and drain.notices == [notice]


def test_refused_drain_is_retried_until_accepted_or_past_the_deadline():
    now = [1000.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    class Once:
        cloud = "gcp"

        def __init__(self, deadline: float) -> None:
            self.deadline = deadline

        def poll(self) -> spot.Notice | None:
            return spot.Notice("gcp", "preempted", self.deadline)

    drain = Recorder(fail=5)  # refused 5 times, then accepted: well inside a 30 s notice
    spot.watch(Once(1030.0), drain, interval_s=1, sleep=sleep, clock=lambda: now[0])
    assert len(drain.notices) == 6 and sleeps == [0.5, 1.0, 2.0, 4.0, 5.0]
    never = Recorder(fail=10**6)  # always refused: given up once the deadline has passed
    now[0] = 1000.0
    sleeps.clear()
    spot.watch(Once(1010.0), never, interval_s=1, sleep=sleep, clock=lambda: now[0])
    assert now[0] >= 1010.0 and len(never.notices) == len(sleeps) + 1 >= 3


def test_local_node_id_waits_for_the_raylet_with_backoff_and_never_gives_up():
    looks: list[str | None] = []
    sleeps: list[float] = []

    def probe(address: str | None) -> str:
        looks.append(address)
        if len(looks) <= 12:  # 12 looks without a raylet: far past the old 60 s give-up
            raise ConnectionRefusedError("GCS not up")
        return "ab" * 28

    node = spot.local_node_id("10.0.0.1:6379", probe=probe, sleep=sleeps.append)
    assert node == "ab" * 28 and len(looks) == 13
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 16.0] + [30.0] * 7
    assert sum(sleeps) > 60

    def refused(address: str | None) -> str:
        raise ConnectionRefusedError("GCS not up")

    with pytest.raises(RuntimeError, match="after 3 attempts: ConnectionRefusedError"):
        spot.local_node_id("10.0.0.1:6379", attempts=3, probe=refused, sleep=lambda s: None)


def test_probe_refuses_quickly_when_no_gcs_listens():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(OSError):
        spot.probe_node_id(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5, "no driver is started while nothing listens"


class _WatcherLog:
    """The log of a watcher subprocess, and waiting on it (fails with its tail)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc: Any = None

    def text(self) -> str:
        return self.path.read_text(errors="replace") if self.path.exists() else ""

    def wait_until(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"the supervisor exited ({self.proc.returncode}) before {what}:\n"
                            f"{self.text()[-4000:]}")
            time.sleep(0.2)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.text()[-4000:]}")


def test_supervisor_restarts_a_killed_watcher_and_stops_on_sigterm(metadata, tmp_path):
    """``--supervise`` as the cluster YAMLs use it: the watcher runs as a child; SIGKILLed, it
    is restarted and polls on; SIGTERM to the supervisor (``kill $(cat PIDFILE)`` in the
    YAMLs) stops both and removes the pid file."""
    log, pidfile = _WatcherLog(tmp_path / "watcher.log"), tmp_path / "watcher.pid"
    metadata.faults = ["drop", "bad-status-line", "truncated"]
    with open(log.path, "w") as out:
        log.proc = subprocess.Popen([
            sys.executable, str(CLUSTERS / "spot_watcher.py"), "--supervise", "--pidfile",
            str(pidfile), "--cloud", "gcp", "--metadata-url", metadata.url, "--node-id", "ab" * 28,
            "--interval", "0.1", "--max-backoff", "0.3"], stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        log.wait_until(lambda: not metadata.faults and len(metadata.requests) > 6, 30,
                       "polls through the faults")
        assert pidfile.read_text().strip() == str(log.proc.pid)
        (first,) = re.findall(r"started watcher pid (\d+)", log.text())
        os.kill(int(first), signal.SIGKILL)
        log.wait_until(lambda: len(re.findall(r"started watcher pid (\d+)", log.text())) == 2, 30,
                       "the restart")
        assert "watcher exited with -9; restarting in" in log.text()
        second = re.findall(r"started watcher pid (\d+)", log.text())[-1]
        polls = len(metadata.requests)
        log.wait_until(lambda: len(metadata.requests) > polls + 3, 30, "the new watcher's polls")
        os.kill(log.proc.pid, signal.SIGTERM)
        assert log.proc.wait(timeout=30) == 0
        assert not pidfile.exists()
        assert not os.path.exists(f"/proc/{second}") or "zombie" in Path(
            f"/proc/{second}/status").read_text().lower(), "the watcher outlived its supervisor"
    finally:
        if log.proc.poll() is None:
            os.killpg(log.proc.pid, signal.SIGKILL)


@pytest.mark.ray
@pytest.mark.slow  # a real Ray head, started and drained
@pytest.mark.timeout(300)
def test_supervised_watcher_waits_for_its_raylet_survives_faults_then_drains_it():
    """The real script, as the cluster YAMLs start it (``--supervise --pidfile``), against a
    real Ray head started in a private session (``tests/test_multinode.py``'s ``ray start``
    machinery: own ports, temp dir and token):

    1. started before Ray: it keeps looking for its raylet with backoff (no give-up);
    2. Ray comes up: it finds the node, then survives a metadata server answering errors,
       garbage, malformed HTTP and dropped connections;
    3. a real GCP preemption notice: ``ray drain-node`` drains the node, the watcher exits 0,
       the supervisor stops and removes its pid file, and Ray takes the node out.
    """
    from test_multinode import LocalRayCluster

    cluster = LocalRayCluster()
    t0 = time.time()

    def say(msg: str) -> None:
        print(f"[{time.time() - t0:.0f} s] {msg}")

    log, pidfile = _WatcherLog(Path(cluster.base, "watcher.log")), Path(cluster.base, "watcher.pid")
    try:
        with FakeMetadataServer() as metadata:
            metadata.faults = [f for f in FAULTS if f != "slow"]
            log.proc = cluster.popen([
                sys.executable, str(CLUSTERS / "spot_watcher.py"), "--supervise",
                "--pidfile", str(pidfile), "--cloud", "gcp", "--metadata-url", metadata.url,
                "--address", cluster.gcs_address, "--interval", "0.2", "--max-backoff", "0.4",
                "--raylet-max-backoff", "1"], log.path)
            # 1. no Ray yet
            log.wait_until(lambda: log.text().count("no Ray node on this machine yet") >= 3, 60,
                           "three looks for the raylet")
            say("the watcher is waiting for its raylet; starting the Ray head")
            cluster.start_head({"train_driver": 1})
            log.wait_until(lambda: len(cluster.alive_nodes()) == 1, 60, "the head node")
            (head,) = cluster.alive_nodes()
            # 2. found, and every fault survived
            log.wait_until(lambda: "for Ray node" in log.text(), 120, "the watcher to find its node")
            assert re.findall(r"for Ray node ([0-9a-f]{56})", log.text()) == [head["node_id"]]
            say("the watcher found its node")
            log.wait_until(lambda: not metadata.faults, 60, "the faults to be served")
            assert log.text().count("metadata poll failed") >= len(FAULTS) - 1
            # 3. a real notice
            say("faults survived; preemption notice")
            metadata.gcp_preempted = True
            rc = log.proc.wait(timeout=120)
        out = log.text()
        say(f"the supervisor exited with {rc}")
        assert rc == 0, out[-4000:]
        assert "drain accepted" in out and "watcher finished (drain accepted)" in out
        assert "restarting in" not in out, "the watcher itself never failed"
        assert not pidfile.exists()
        log.proc = None
        log.wait_until(lambda: not cluster.alive_nodes(), 60, "Ray to take the drained node out")
    finally:
        if log.proc is not None and log.proc.poll() is None:
            os.killpg(log.proc.pid, signal.SIGKILL)
        cluster.shutdown()


# ------------------------------------------------------------------------------------- security


def _dry_run(script: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTERS / "security" / script)], capture_output=True,
                          text=True, env={**os.environ, "DRY_RUN": "1", **env}, timeout=60)


def _commands(out: str) -> list[list[str]]:
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yamls_supervise_the_watcher_and_put_mlflow_behind_a_password(path):
    config = _load(path)
    workers = " ".join(config["worker_start_ray_commands"])
    assert "spot_watcher.py --supervise --pidfile /tmp/spot_watcher.pid" in workers
    assert "kill $(cat /tmp/spot_watcher.pid" in workers and "pkill" not in workers
    mlflow = next(c for c in _all_commands(config) if "nohup mlflow server" in c)
    assert "--app-name basic-auth" in mlflow
    ini = re.search(r"MLFLOW_AUTH_CONFIG_PATH=/home/ray/hdd_ray/(\S+)", mlflow).group(1)
    assert (ROOT / ini).is_file() and "MLFLOW_AUTH_ADMIN_PASSWORD=$(cat" in mlflow
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY=$(" in mlflow  # the auth app refuses to start without
    creds = "MLFLOW_TRACKING_USERNAME=hdd-ray MLFLOW_TRACKING_PASSWORD=$(cat"
    assert creds in " ".join(config["head_start_ray_commands"]) and creds in workers
    assert "/home/ray/.hdd_ray/mlflow_password" in config["file_mounts"]
    assert any('"mlflow[auth]"' in c for c in config["setup_commands"])


def test_aws_yaml_uses_the_closed_group_and_bucket_scoped_workers():
    config = _load(CLUSTERS / "aws.yaml")
    assert "security_group" not in config["provider"], "Ray's default group admits SSH from anywhere"
    for name, t in config["available_node_types"].items():
        node = t["node_config"]
        assert node["SecurityGroupIds"] == ["REPLACE_ME_AWS_SECURITY_GROUP_ID"], name
        if name != config["head_node_type"]:
            assert node["IamInstanceProfile"]["Arn"].endswith(":instance-profile/hdd-ray-worker")
    for policy in ("aws-worker-policy.json", "aws-head-policy.json"):
        doc = json.loads((CLUSTERS / "security" / policy).read_text())
        for st in doc["Statement"]:
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            assert not any(a.endswith("*") for a in actions), (policy, actions)
            assert st["Resource"] in ("arn:aws:s3:::REPLACE_ME_BUCKET", "arn:aws:s3:::REPLACE_ME_BUCKET/*",
                                      "arn:aws:iam::REPLACE_ME_AWS_ACCOUNT_ID:role/hdd-ray-worker")
    out = _dry_run("aws.sh", BUCKET="campaigns", SSH_SOURCE_RANGE="203.0.113.7/32")
    assert out.returncode == 0, out.stderr
    cmds = _commands(out.stdout)
    ingress = [c for c in cmds if c[:3] == ["aws", "ec2", "authorize-security-group-ingress"]]
    assert len(ingress) == 2
    assert "IpProtocol=-1,UserIdGroupPairs=[{GroupId=sg-dryrun}]" in ingress[0]
    assert ingress[1][-2:] == ["--cidr", "203.0.113.7/32"] and "22" in ingress[1]
    attached = [c[-1] for c in cmds if c[:3] == ["aws", "iam", "attach-role-policy"]]
    assert attached == ["arn:aws:iam::aws:policy/AmazonEC2FullAccess"], "head only; no S3FullAccess"
    refused = _dry_run("aws.sh", BUCKET="b", SSH_SOURCE_RANGE="0.0.0.0/0")
    assert refused.returncode == 2 and "ALLOW_SSH_FROM_ANYWHERE" in refused.stderr


def test_gcp_yaml_sits_on_its_own_network_with_explicit_firewall_rules():
    config = _load(CLUSTERS / "gcp.yaml")
    for name, t in config["available_node_types"].items():
        node = t["node_config"]
        (nic,) = node["networkInterfaces"]
        assert nic["subnetwork"].endswith("/regions/us-central1/subnetworks/hdd-ray"), name
        assert node["tags"]["items"] == ["hdd-ray"], name
        if name != config["head_node_type"]:
            (sa,) = node["serviceAccounts"]
            assert sa["email"].startswith("hdd-ray-worker@"), name
            assert sa["scopes"] == ["https://www.googleapis.com/auth/devstorage.read_write"]
    assert config["provider"]["region"] == "us-central1"
    out = _dry_run("gcp.sh", PROJECT="p", BUCKET="campaigns", SSH_SOURCE_RANGE="203.0.113.7/32")
    assert out.returncode == 0, out.stderr
    cmds = _commands(out.stdout)
    assert "--subnet-mode=custom" in next(c for c in cmds if c[:4] == ["gcloud", "compute", "networks", "create"])
    rules = {c[4]: c[5:] for c in cmds if c[:4] == ["gcloud", "compute", "firewall-rules", "create"]}
    assert set(rules) == {"hdd-ray-internal", "hdd-ray-ssh"}
    internal, ssh = rules["hdd-ray-internal"], rules["hdd-ray-ssh"]
    assert {"--network=hdd-ray", "--source-tags=hdd-ray", "--target-tags=hdd-ray"} <= set(internal)
    assert not any(a.startswith("--source-ranges") for a in internal)
    assert {"--rules=tcp:22", "--source-ranges=203.0.113.7/32", "--target-tags=hdd-ray"} <= set(ssh)
    (binding,) = [c for c in cmds if "add-iam-policy-binding" in c]
    assert binding[4] == "gs://campaigns" and "--role=roles/storage.objectAdmin" in binding
    assert "serviceAccount:hdd-ray-worker@p.iam.gserviceaccount.com" in binding[5]
    assert not [c for c in cmds if "projects" in c and "add-iam-policy-binding" in c]
    assert "compute.admin" not in out.stdout + (CLUSTERS / "gcp.yaml").read_text()
    refused = _dry_run("gcp.sh", PROJECT="p", BUCKET="b", SSH_SOURCE_RANGE="0.0.0.0/0")
    assert refused.returncode == 2


def test_kuberay_network_policies_admit_only_the_clusters_pods():
    docs = _kuberay_docs()
    cluster_label = {"ray.io/cluster": _raycluster()["metadata"]["name"]}
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    mlflow_deploy = next(d for d in docs if d["kind"] == "Deployment")
    ray_policy, mlflow_policy = policies["hdd-ray-cluster"], policies["hdd-ray-mlflow"]
    assert ray_policy["podSelector"]["matchLabels"] == cluster_label
    assert mlflow_policy["podSelector"]["matchLabels"] == mlflow_deploy["spec"]["template"]["metadata"]["labels"]
    for spec in policies.values():
        assert spec["policyTypes"] == ["Ingress"]
        for rule in spec["ingress"]:
            for peer in rule["from"]:
                assert "ipBlock" not in peer
                if "podSelector" in peer:
                    assert peer["podSelector"]["matchLabels"] == cluster_label
                else:  # the KubeRay operator: the head's job API and GCS only
                    assert set(peer) == {"namespaceSelector"}
                    assert {p["port"] for p in rule["ports"]} <= {8265, 6379}
    ((rule,),) = [mlflow_policy["ingress"]]
    assert [p["port"] for p in rule["ports"]] == [5000]
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["spec"]["submissionMode"] == "HTTPMode", "no submitter pod outside the policy"


def test_kuberay_mlflow_requires_the_secrets_password_and_ray_pods_carry_it():
    docs = _kuberay_docs()
    container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--app-name=basic-auth" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "hdd-ray-mlflow-auth"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "hdd-ray-mlflow-auth"
    ini = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["basic_auth.ini"]
    assert "admin_username = hdd-ray" in ini and "default_permission = NO_PERMISSIONS" in ini
    spec = _raycluster()["spec"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for group in pods:
        for c in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            if "MLFLOW_TRACKING_URI" in env:
                for key, field_ in (("MLFLOW_TRACKING_USERNAME", "username"),
                                    ("MLFLOW_TRACKING_PASSWORD", "password")):
                    ref = env[key]["valueFrom"]["secretKeyRef"]
                    assert ref == {"name": "hdd-ray-mlflow-auth", "key": field_}


def test_dockerignore_keeps_runs_stores_weights_and_caches_out_of_images():
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")}
    for needed in (".git", "runs/", "mlruns/", "mlflow.db", "*.safetensors", "checkpoints/",
                   "data/", ".venv/", "venv/", "**/__pycache__/", ".pytest_cache/", "*.pth"):
        assert needed in lines, needed


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # an MLflow server start with two fresh stores: 30-90 s on a loaded 2-core box
@pytest.mark.timeout(240)
def test_mlflow_basic_auth_settings_refuse_requests_without_the_password(tmp_path):
    """The cluster's MLflow settings (clusters/mlflow_basic_auth.ini, the admin password from the
    environment) on a real ``mlflow server --app-name basic-auth`` on 127.0.0.1."""
    pytest.importorskip("flask_wtf", reason="mlflow[auth] is not installed")
    import base64
    import urllib.error
    import urllib.request

    ini = (CLUSTERS / "mlflow_basic_auth.ini").read_text().replace(
        "sqlite:////home/ray/mlflow/basic_auth.db", f"sqlite:///{tmp_path}/basic_auth.db")
    assert f"{tmp_path}/basic_auth.db" in ini
    (tmp_path / "auth.ini").write_text(ini)
    port, password = _free_port(), "s3cret-" + os.urandom(6).hex()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 64,
           # MLflow's GenAI job runner (seven huey consumer processes) is not what is under
           # test: without it the server starts in a third of the time on 2 cores
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host",
             "127.0.0.1", "--port", str(port), "--workers", "1", "--backend-store-uri",
             f"sqlite:///{tmp_path}/mlflow.db"], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"

    def status(user: str | None, pw: str | None) -> int:
        req = urllib.request.Request(url)
        if user:
            req.add_header("Authorization",
                           "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code

    try:
        deadline = time.time() + 90
        while True:
            try:
                first = status(None, None)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail((tmp_path / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        assert first == 401
        assert status("hdd-ray", "wrong") == 401
        assert status("hdd-ray", password) == 200
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
