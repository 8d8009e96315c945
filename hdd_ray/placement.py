"""What a fixed (local) Ray instance can place: the gate in front of training runs and tasks.

A local instance never grows. A request no node can host would wait forever (a task) or until
Ray Train's worker-group start timeout (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``) counts it as
a failed attempt, and a request that fits but not beside the others burns ``max_failures``
waiting. The :class:`ResourceGate` refuses the first in one line before anything waits
(:meth:`ResourceGate.unfit`: CPUs, GPUs, custom resources, ``accelerator_type`` and
``label_selector``, each worker on one node) and queues the second (:meth:`ResourceGate.hold`).
On a cluster that autoscales no gate is used: pending requests are what makes it grow.

Joining Ray is here too (:func:`init_ray`, :func:`cluster_address`): the jobs, the prepare stage,
the launcher and the evaluation all ask the same question (a cluster to join, or a local
instance to start and gate).

A request is a run's resources as :class:`hdd_ray.config.ResourcesConfig` writes them:
``num_workers``, ``cpus_per_worker``, ``gpus_per_worker``, ``custom``, ``accelerator_type``,
``label_selector``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from hdd_ray.ray_noise import quiet_ray

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig

__all__ = ["RAY_ENV", "ResourceGate", "cluster_address", "init_ray", "label_matches",
           "local_gate", "task_function", "worker_task"]

#: Ray settings every job needs. Many experts starting at once on a small machine take longer
#: than Ray Train's default 60 s to bring up their worker groups. Ray Data (2.60) reads a
#: parquet folder's footers (prepare's embeddings and assignments) on a pool of up to 32 actor
#: processes of ~200 MB each, more of them alive the more files there are
#: (benchmarks/bench_scale.py saw 4 at 8x the corpus): two, each with 128 I/O threads, read
#: thousands of tiny footers as well, and keep prepare's memory from growing with the corpus.
RAY_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
           "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2"}

_EPS = 1e-9


def label_matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    """Whether a node's ``labels`` satisfy a Ray ``label_selector``.

    Values as Ray writes them: ``"a"`` (equal), ``"!a"`` (not equal or absent), ``"in(a,b)"``,
    ``"!in(a,b)"``.
    """
    for key, want in selector.items():
        have = labels.get(key)
        want = str(want).strip()
        negate = want.startswith("!")
        body = want[1:].strip() if negate else want
        if body.startswith("in(") and body.endswith(")"):
            ok = have in {v.strip() for v in body[3:-1].split(",")}
        else:
            ok = have == body
        if ok == negate:
            return False
    return True


class ResourceGate:
    """Refuses requests no node of a fixed Ray instance can host; queues those that must wait.

    ``nodes`` lists each node as ``{"resources": {...}, "labels": {...}}``; a plain resources
    dict stands for one node without labels.
    """

    def __init__(self, nodes: list[dict[str, Any]] | dict[str, float]) -> None:
        if isinstance(nodes, dict):
            nodes = [{"resources": nodes, "labels": {}}]
        self.nodes = [{"resources": {k: float(v) for k, v in n.get("resources", {}).items()},
                       "labels": dict(n.get("labels") or {})} for n in nodes]
        self.capacity: dict[str, float] = {}
        for node in self.nodes:
            for k, v in node["resources"].items():
                self.capacity[k] = self.capacity.get(k, 0.0) + v
        self.free = dict(self.capacity)
        self._cond = threading.Condition()

    @staticmethod
    def per_worker(resources: dict[str, Any]) -> dict[str, float]:
        """What one worker asks for (``accelerator_type`` as Ray Train asks: a tiny resource)."""
        need = {"CPU": float(resources.get("cpus_per_worker", 1.0)),
                "GPU": float(resources.get("gpus_per_worker", 0.0))}
        need.update({k: float(v) for k, v in (resources.get("custom") or {}).items()})
        if resources.get("accelerator_type"):
            need[f"accelerator_type:{resources['accelerator_type']}"] = 0.001
        return {k: v for k, v in need.items() if v > 0}

    @classmethod
    def need(cls, resources: dict[str, Any]) -> dict[str, float]:
        """The resources one run's worker group asks for, all workers together."""
        n = int(resources.get("num_workers", 1))
        return {k: n * v for k, v in cls.per_worker(resources).items()}

    def unfit(self, resources: dict[str, Any], key: str = "experts.resources") -> str:
        """Why the request can never start on this instance, in one line ('' when it can).

        ``key`` is the config section the request comes from, named in the message.
        """
        n = max(1, int(resources.get("num_workers", 1)))
        selector = dict(resources.get("label_selector") or {})
        nodes = [nd for nd in self.nodes if label_matches(nd["labels"], selector)]
        if not nodes:
            return (f"asks for nodes labelled {selector} ({key}.label_selector) but no node of "
                    "the local Ray instance has such labels: drop the selector or run on a "
                    "cluster whose nodes carry them")
        worker = self.per_worker(resources)
        accel = [k for k in worker if k.startswith("accelerator_type:")]
        if accel and not any(nd["resources"].get(accel[0], 0.0) > 0 for nd in nodes):
            return (f"asks for accelerator_type {accel[0].split(':', 1)[1]} but the local Ray "
                    f"instance has no such accelerator: drop {key}.accelerator_type "
                    "or run on a cluster that has it")
        for res, amount in worker.items():
            best = max(nd["resources"].get(res, 0.0) for nd in nodes)
            if amount > best + _EPS:
                return (f"asks for {amount:g} {res} per worker but no node of the local Ray "
                        f"instance has more than {best:g}: lower {key} per worker or start Ray "
                        "with more (ray.num_cpus)")
        for res, amount in self.need(resources).items():
            have = sum(nd["resources"].get(res, 0.0) for nd in nodes)
            if amount > have + _EPS:
                return (f"asks for {amount:g} {res} in all ({n} workers) but the local Ray "
                        f"instance has {have:g}: lower the run's resources or start Ray with "
                        "more (ray.num_cpus)")
        hosts = sum(self._workers_on(nd["resources"], worker) for nd in nodes)
        if hosts < n:
            return (f"asks for {n} workers of {worker} but the nodes of the local Ray instance "
                    f"can hold only {hosts} (each worker must fit on one node): lower "
                    f"{key}.num_workers or the resources per worker")
        return ""

    @staticmethod
    def _workers_on(node: dict[str, float], worker: dict[str, float]) -> int:
        """How many workers of ``worker`` fit on a node of ``node`` resources."""
        counts = [int((node.get(k, 0.0) + _EPS) // v) for k, v in worker.items() if v > 0]
        return min(counts) if counts else 1 << 30  # asks for nothing: fits anywhere

    @contextmanager
    def hold(self, resources: dict[str, Any]) -> Iterator[None]:
        """Wait until the run's resources are free, keep them while the block runs."""
        need = self.need(resources)

        def fits() -> bool:
            return all(self.free.get(k, 0.0) + _EPS >= v for k, v in need.items())

        with self._cond:
            self._cond.wait_for(fits)
            for k, v in need.items():
                self.free[k] -= v
        try:
            yield
        finally:
            with self._cond:
                for k, v in need.items():
                    self.free[k] += v
                self._cond.notify_all()


def local_gate(address: str | None) -> ResourceGate | None:
    """A gate over the local Ray instance's nodes; None when joined to a cluster (``address``)
    or when Ray is not initialised.

    The capacity is each node's total, not a snapshot of what is free now: actors of an earlier
    stage still shutting down must not shrink it for the whole campaign.
    """
    import ray

    if address or not ray.is_initialized():
        return None
    nodes = []
    for node in ray.nodes():
        if not node.get("Alive", True):
            continue
        res = {k: float(v) for k, v in node.get("Resources", {}).items()
               if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
        nodes.append({"resources": res, "labels": node.get("Labels") or {}})
    return ResourceGate(nodes)


def task_function(fn: Any, num_gpus: float) -> Any:
    """``ray.remote(fn)`` for tasks that may ask for GPUs (then ``.options(...)`` them).

    Ray reuses a worker process for the next task, but torch keeps the CUDA device (and its
    cached memory) it first saw while Ray sets ``CUDA_VISIBLE_DEVICES`` per task: a GPU task
    gets a fresh process (``max_calls=1``, which ``.options()`` cannot set), a CPU task a reused
    one (its imports are already done)."""
    import ray

    return ray.remote(max_calls=1 if float(num_gpus) > 0 else 0)(fn)


def worker_task(fn: Any, resources: dict[str, Any], **options: Any) -> Any:
    """``fn`` as a Ray task shaped like one worker of ``resources`` (a run's resources as
    :class:`hdd_ray.config.ResourcesConfig` writes them: CPUs, GPUs, custom resources,
    ``accelerator_type``, ``label_selector``); ``options`` add Ray task options or override
    those. A GPU task runs in a fresh process (:func:`task_function`)."""
    opts: dict[str, Any] = {"num_cpus": float(resources.get("cpus_per_worker") or 0),
                            "num_gpus": float(resources.get("gpus_per_worker") or 0)}
    if resources.get("custom"):
        opts["resources"] = {k: float(v) for k, v in resources["custom"].items()}
    if resources.get("accelerator_type"):
        opts["accelerator_type"] = resources["accelerator_type"]
    if resources.get("label_selector"):
        opts["label_selector"] = dict(resources["label_selector"])
    opts.update(options)
    return task_function(fn, opts["num_gpus"]).options(**opts)


def cluster_address(cfg: CampaignConfig) -> str | None:
    """The Ray cluster a job joins (``ray.address``, else ``RAY_ADDRESS``); None: start one."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def init_ray(cfg: CampaignConfig) -> None:
    """Join the configured cluster (``ray.address`` or ``RAY_ADDRESS``), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {"PYTHONPATH": _repo_pythonpath(), **RAY_ENV}}
    for key, value in RAY_ENV.items():  # a local instance started below inherits these too
        os.environ.setdefault(key, value)
    address = cluster_address(cfg)
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # address="local" always starts a fresh instance (a stale /tmp/ray cluster file would
        # make a plain ray.init(num_cpus=...) fail)
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, runtime_env=runtime_env)
    quiet_ray()  # forwarded noise (hdd_ray.ray_noise.NOISE) dropped; real errors kept


def _repo_pythonpath() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    existing = os.environ.get("PYTHONPATH", "")
    return here + (os.pathsep + existing if existing else "")
