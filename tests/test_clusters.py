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
import json
import re
import shlex
import sys
import threading
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
    header = CAMPAIGNS[0].read_text().split("\nname:")[0]
    assert "VAE latents" in header and "pixel space" in header


def test_single_gpu_campaign_runs_one_expert_at_a_time_on_the_gpu():
    cfg = load_config(CAMPAIGNS[1])
    experts = resolve_experts(cfg)
    assert len(experts) == 8 and [e.objective for e in experts].count("ddpm_eps") == 2
    assert cfg.ray.max_concurrent_experts == 1
    assert all(e.resources["gpus_per_worker"] == 1 and not e.resources["custom"] for e in experts)
    assert cfg.router.resources.gpus_per_worker == 1
    assert "VAE latents" in CAMPAIGNS[1].read_text().split("\nname:")[0]


def test_paper_campaign_takes_the_mlflow_server_from_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.2:5000")
    assert load_config(CAMPAIGNS[0]).tracking.uri == "http://10.0.0.2:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert load_config(CAMPAIGNS[0]).tracking.uri is None


# ------------------------------------------------------------------------------------- spot watcher


class FakeMetadataServer:
    """AWS IMDSv2 and GCP metadata endpoints on 127.0.0.1 (a random port), in a thread.

    Set ``aws_action`` (a dict) or ``gcp_preempted`` (bool) to announce an interruption;
    ``expire_tokens()`` makes every issued IMDSv2 token stale (the next use answers 401).
    ``requests`` records ``(method, path, headers with lower-case names)``.
    """

    def __init__(self) -> None:
        self.aws_action: dict[str, str] | None = None
        self.gcp_preempted = False
        self.tokens: set[str] = set()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
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

            def do_PUT(self) -> None:
                server.requests.append(("PUT", self.path, self._headers()))
                if self.path != "/latest/api/token":
                    return self._send(404)
                if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._send(400, "missing TTL header")
                token = f"token-{len(server.tokens)}"
                server.tokens.add(token)
                self._send(200, token)

            def do_GET(self) -> None:
                server.requests.append(("GET", self.path, self._headers()))
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
    metadata.aws_action = {"action": "terminate", "time": "2030-01-01T00:02:00Z"}
    assert spot.main(["--cloud", "aws", "--metadata-url", metadata.url,
                      "--node-id", "ef" * 28, "--interval", "0"]) == 1
