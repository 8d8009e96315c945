"""One training loop for every expert and the router, run by Ray Train on each worker (or, with
``ray.executor: task``, as one Ray task per run: :class:`TaskHooks`).

The loop never knows which objective it trains: an expert's :class:`Objective` owns the loss,
the router's task owns its cross-entropy. What the loop owns is everything a preemptible run
needs: resume from ``ray.train.get_checkpoint()`` (model, EMA, optimizer, step, RNG states),
a checkpoint every ``checkpoint_every`` steps and at once when Ray reports a drain of the node
(``ray.train.get_preemption_info()``), gradient accumulation, bf16 autocast and DDP on GPUs,
and metrics to MLflow (:class:`hdd_ray.tracking.MetricBuffer`, with the tracking URI passed in:
workers do not inherit the driver's). ``train.batch_size`` is the global batch of a micro-step,
split evenly over the run's workers (:func:`rank_batch_size`); every random draw goes through
:mod:`hdd_ray.devices` (generators on the device of the tensors they feed). Data comes from one
:class:`hdd_ray.training.data.BatchSource` per rank (in memory or streamed); every rank's data
position and generators are gathered into rank 0's checkpoint, and the samples skipped as
damaged are reported as ``skipped``.

A run resumes from the newest checkpoint of its own, whichever executor wrote it: Ray Train's
(``checkpoint_<time>/`` registered in ``checkpoint_manager_snapshot.json``) or the task
executor's (``checkpoint_task/``), so switching ``ray.executor`` mid-run loses no step.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import platform
import socket
import tempfile
import time
from typing import Any

import torch
from torch import Tensor, nn

from hdd_ray import devices, storage, tracking
from hdd_ray.config import check_global_batch
from hdd_ray.devices import TrainingStreams
from hdd_ray.diffusion import FM_TIME_SCALE, get_objective, per_sample
from hdd_ray.models.expert import ExpertModel, RouterModel
from hdd_ray.samples import Decoding
from hdd_ray.training.data import BatchSource, StreamSource, data_settings, open_source

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
PREEMPTION_CHECK_EVERY = 10
LOG_EVERY = 10


# ------------------------------------------------------------------------------------- tasks


class _DataTask:
    """What experts and the router share: a :class:`BatchSource` over their shards."""

    data: BatchSource

    def _open(self, config: dict[str, Any], shards: list[tuple[str, int]],
              num_samples: int | None, rank: int, world: int, pin_memory: bool) -> BatchSource:
        latents = config.get("latents") or {}
        how = Decoding(config["image_size"], config["channels"], bool(latents),
                       latent_bytes=4 if latents.get("dtype") == "bfloat16" else 2)
        return open_source(shards, how, data_settings(config.get("data")),
                           int(config["train"]["seed"]), rank, world, num_samples, pin_memory)

    def close(self) -> None:
        """Stop the data source's background work."""
        self.data.close()


class ExpertTask(_DataTask):
    """An expert: its cluster's data and its own objective's loss."""

    def __init__(self, config: dict[str, Any], rank: int = 0, world: int = 1,
                 pin_memory: bool = False) -> None:
        spec = config["expert"]
        self.train = config["train"]
        self.objective = get_objective(spec["objective"], spec["schedule"], self.train["timestep_sampling"])
        self.model = ExpertModel(spec["model"], spec["text"], config["image_size"], config["channels"])
        self.data = self._open(config, [(p, spec["cluster"]) for p in config["shards"]],
                               config.get("num_samples"), rank, world, pin_memory)
        # exported with the weights: the conversion's prior E[x0] near t = 1 (streaming: the
        # running mean over the samples seen, set at every step; hdd_ray.training.data)
        if not self.data.streaming:
            self.model.set_data_mean(self.data.mean()[None])

    def loss(self, model: nn.Module, batch_size: int, rng: TrainingStreams, device) -> Tensor:
        x0, captions, _ = self.data.next_batch(batch_size, rng.data)
        inner = _unwrap(model)
        if self.data.streaming:
            inner.set_data_mean(self.data.mean()[None])
        cond = inner.tokenize(captions, device)
        return self.objective.loss(model, x0.to(device, non_blocking=True), cond,
                                   self.train["caption_dropout"], rng.noise)


class RouterTask(_DataTask):
    """The router: every cluster's data with its cluster id, noised on the flow-matching path.

    It reads all clusters as one pool at their natural frequencies (hdd_ray.training.data)."""

    def __init__(self, config: dict[str, Any], rank: int = 0, world: int = 1,
                 pin_memory: bool = False) -> None:
        self.train = config["train"]
        k = config["num_clusters"]
        self.model = RouterModel(config["model"], config["image_size"], config["channels"], k)
        shards = [(p, c) for c in range(k) for p in config["cluster_shards"].get(str(c)) or []]
        counts = config.get("cluster_counts")
        total = sum(int(n) for n in counts.values()) if counts else None
        self.data = self._open(config, shards, total, rank, world, pin_memory)

    def loss(self, model: nn.Module, batch_size: int, rng: TrainingStreams, device) -> Tensor:
        x0, _, labels = self.data.next_batch(batch_size, rng.data)
        x0, labels = x0.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        t = devices.rand(batch_size, rng.noise, device)
        eps = devices.randn(x0.shape, rng.noise, device)
        tb = per_sample(t, x0)
        logits = model((1 - tb) * x0 + tb * eps, t * FM_TIME_SCALE)
        return nn.functional.cross_entropy(logits.float(), labels)


def _data_states(task: _DataTask, rng: TrainingStreams, world: int) -> list[dict[str, Any]]:
    """Every rank's data position and generator states, gathered (a collective: every rank
    calls it at the same steps, in ``report``) so that rank 0's checkpoint holds them all."""
    import torch.distributed as dist

    mine = {"source": task.data.state(), "rng": rng.state()}
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, mine)
    return out


def _restore_data(task: _DataTask, rng: TrainingStreams, state: dict[str, Any], rank: int,
                  world: int, start_step: int) -> None:
    """Each rank continues its own data position and generators from the checkpoint.

    A saved position is used only by the same kind of source: a stream's by a stream, the
    in-memory path's by the in-memory path (``data.mode`` is not part of a run's identity, so a
    run may resume under another mode). Another world size, another kind of source or a
    checkpoint from before data states restarts the data instead: other ranks reseed by
    ``(seed, rank, step)`` (with another world size); a stream starts the epoch after the
    latest one recorded, or epoch 1 after the in-memory path (whose skip count already holds
    all of the data's damage, which a stream counts on epoch 0 only). The skip count is kept:
    rank 0 carries the checkpoint's total."""
    ranks = state.get("data")
    if rank == 0:
        rng.load(state)
    sources = [r["source"] for r in ranks or []]
    same_kind = bool(sources) and all(("position" in s) == task.data.streaming for s in sources)
    if ranks is not None and len(ranks) == world:
        if rank != 0:
            rng.load(ranks[rank]["rng"])
        if same_kind:
            task.data.load_state(sources[rank])
            return
    elif rank != 0:
        rng.reseed(start_step)
    if not sources:
        return
    saved_skips = sum(int(s.get("skipped", 0)) for s in sources) if rank == 0 else 0
    if isinstance(task.data, StreamSource):
        epochs = [int(s["position"]["block"]["epoch"]) for s in sources if "position" in s]
        task.data.start_epoch(max(epochs) + 1 if epochs else 1, skipped=saved_skips)
    else:  # the in-memory path read (and counted) every sample's damage itself, on rank 0
        task.data.skipped = max(task.data.skipped, saved_skips)
        if isinstance(task, ExpertTask):  # the exact mean, not a stream's running one
            task.model.set_data_mean(task.data.mean()[None])


# ------------------------------------------------------------------------------------- helpers


class EMA:
    """Exponential moving average of a model's parameters (buffers copied)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._params = list(self.model.parameters())
        self._buffers = list(self.model.buffers())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema = decay * ema + (1 - decay) * param``: one fused ``_foreach_lerp_`` over all
        parameters (the same per-element lerp as a loop of ``lerp_``, without ~100 calls a step
        on a tiny model); buffers are copied."""
        params = [p.detach() for p in model.parameters()]
        if len(params) != len(self._params):
            raise ValueError(f"EMA: the model has {len(params)} parameters, the average "
                             f"{len(self._params)}")
        if any(p.dtype != e.dtype for p, e in zip(params, self._params, strict=True)):
            params = [p.to(e.dtype) for p, e in zip(params, self._params, strict=True)]
        torch._foreach_lerp_(self._params, params, 1 - self.decay)
        for e, b in zip(self._buffers, model.buffers(), strict=True):
            e.copy_(b)


def learning_rate(train: dict[str, Any], step: int) -> float:
    """``train.lr`` at 0-based ``step`` under ``train.lr_schedule`` and ``train.warmup_steps``
    (a function of the step alone: a resumed run continues the same schedule)."""
    lr, steps = float(train["lr"]), int(train["steps"])
    warmup = int(train.get("warmup_steps", 0))
    if step < warmup:
        return lr * (step + 1) / warmup
    if train.get("lr_schedule", "constant") == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
    return lr


def _adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over all parameters; on the CPU since torch 2.4),
    else the multi-tensor one. On the CPU the per-parameter default costs ~5 ms of a ~70 ms
    DiT-T/2 demo step, fused ~1.6 ms (benchmarks/README.md, "Demo main job")."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # fused AdamW not built for this device / torch version
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def _node_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"hostname": socket.gethostname(), "platform": platform.platform(),
                            "device": str(device), "pid": os.getpid()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # get_runtime_context() would start Ray
        info["node_id"] = ray.get_runtime_context().get_node_id()
    return info


# ------------------------------------------------------------------------------------- loop


class RayTrainHooks:
    """What the loop asks of its runner, answered by Ray Train (inside a worker group)."""

    def __init__(self, run_directory: str | None = None) -> None:
        import ray.train

        _quiet_report_log()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.run_directory = run_directory

    def device(self, use_cuda: bool) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device() if use_cuda else torch.device("cpu")

    def load_state(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        state = None
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu",
                                   weights_only=True)
        # a run the task executor began (ray.executor switched to train): go on from there
        local = (_other_state(lambda: task_checkpoint_state(self.run_directory),
                              f"{self.run_directory}: the task executor's checkpoint")
                 if self.run_directory else None)
        return newest_state(state, local)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        import ray.train

        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, os.path.join(d, STATE_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def preempted(self) -> bool:
        import ray.train

        try:
            return ray.train.get_preemption_info() is not None
        except Exception:  # e.g. num_workers=0 (no worker group): nothing to ask
            return False

    def wrap(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        if self.world == 1:
            return model
        return ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": False})


class LocalHooks:
    """The same loop in a plain process: checkpoints are ``state.pt`` files in ``directory``.

    Used for the orchestration-overhead benchmark (identical loop, no Ray) and fast tests.
    """

    rank, world = 0, 1

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.reports: list[dict[str, Any]] = []

    def device(self, use_cuda: bool) -> torch.device:
        return torch.device("cuda") if use_cuda else torch.device("cpu")

    def load_state(self) -> dict[str, Any] | None:
        path = os.path.join(self.directory, STATE_FILE)
        if not os.path.exists(path):
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        self.reports.append(metrics)
        if state is not None:
            os.makedirs(self.directory, exist_ok=True)
            tmp = os.path.join(self.directory, STATE_FILE + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, os.path.join(self.directory, STATE_FILE))

    def preempted(self) -> bool:
        return False

    def wrap(self, model: nn.Module) -> nn.Module:
        return model


#: the task executor's checkpoint in a run directory (``ray.executor: task``): ``state.pt`` and
#: the metrics reported with it, each file replaced atomically
TASK_CHECKPOINT = "checkpoint_task"
TASK_METRICS = "metrics.json"
#: Ray Train's record of a run's registered checkpoints (read, never written, here)
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def _load_state_file(path: str) -> dict[str, Any] | None:
    if not storage.exists(path):
        return None
    return torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)


def _other_state(load: Any, what: str) -> dict[str, Any] | None:
    """A checkpoint state of the other executor, or ``None`` with a warning when it cannot be
    read: a damaged one must not stop a run that has its own (or can start over)."""
    try:
        return load()
    except Exception as exc:
        log.warning("%s: unreadable, not resumed from: %s", what, str(exc).splitlines()[0][:200])
        return None


def task_checkpoint_metrics(run_directory: str) -> dict[str, Any] | None:
    """The metrics (``step``, ``loss``, ...) of a run's task-executor checkpoint, or ``None``."""
    try:
        return dict(storage.read_json(storage.join(run_directory, TASK_CHECKPOINT, TASK_METRICS)))
    except Exception:
        return None


def task_checkpoint_state(run_directory: str) -> dict[str, Any] | None:
    """The state of a run's task-executor checkpoint, or ``None``."""
    return _load_state_file(storage.join(run_directory, TASK_CHECKPOINT, STATE_FILE))


def _ray_train_latest(run_directory: str) -> dict[str, Any] | None:
    """Ray Train's record of a run's latest registered checkpoint (its directory name and the
    metrics reported with it), or ``None``."""
    try:
        snap = storage.read_json(storage.join(run_directory, RAY_TRAIN_SNAPSHOT))
        return dict(snap["latest_checkpoint_result"])
    except Exception:
        return None


def ray_train_checkpoint_metrics(run_directory: str) -> dict[str, Any] | None:
    """The metrics reported with a run's latest registered Ray Train checkpoint, or ``None``."""
    latest = _ray_train_latest(run_directory)
    try:
        return dict(latest["metrics"]) if latest else None
    except (KeyError, TypeError, ValueError):
        return None


def _ray_train_state(run_directory: str) -> dict[str, Any] | None:
    latest = _ray_train_latest(run_directory)
    if not latest or "checkpoint_dir_name" not in latest:
        return None
    return _load_state_file(storage.join(run_directory, str(latest["checkpoint_dir_name"]),
                                         STATE_FILE))


def newest_state(*states: dict[str, Any] | None) -> dict[str, Any] | None:
    """The checkpoint state with the highest ``step`` among ``states`` (``None`` when none)."""
    found = [s for s in states if s is not None]
    return max(found, key=lambda s: int(s["step"])) if found else None


class TaskHooks(LocalHooks):
    """The loop as one Ray task (``ray.executor: task``): one process, no worker group
    (:class:`LocalHooks`' device, no drain notice, no DDP wrapper).

    Checkpoints go to ``<run directory>/checkpoint_task/`` through :mod:`hdd_ray.storage` (a
    local path or a bucket, like Ray Train's storage). A retried task, or a later launch, resumes
    from the newest checkpoint of the run: its own or one Ray Train registered there. A task has
    no drain notice: Ray retries it and it resumes from its last checkpoint.
    """

    def load_state(self) -> dict[str, Any] | None:
        """The run's newest checkpoint state: its own, or one Ray Train registered here."""
        ray_train = _other_state(lambda: _ray_train_state(self.directory),
                                 f"{self.directory}: Ray Train's latest checkpoint")
        return newest_state(task_checkpoint_state(self.directory), ray_train)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        """Write ``state`` (when given) then ``metrics`` into ``checkpoint_task/``."""
        self.reports.append(metrics)
        if state is None:
            return
        buffer = io.BytesIO()
        torch.save(state, buffer)
        # the state first: metrics never announce a step whose state is not written yet
        storage.write_bytes(storage.join(self.directory, TASK_CHECKPOINT, STATE_FILE),
                            buffer.getbuffer())
        storage.write_json(storage.join(self.directory, TASK_CHECKPOINT, TASK_METRICS), metrics)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point (``TorchTrainer(train_loop, train_loop_config=config)``)."""
    run_loop(config, RayTrainHooks(config.get("run_directory")))


def train_task(config: dict[str, Any]) -> dict[str, Any]:
    """Ray task entry point of ``ray.executor: task``: the whole run in this process; returns
    the last reported metrics (the final state is the run's task checkpoint)."""
    return run_loop(config, TaskHooks(config["run_directory"]))


def run_loop(config: dict[str, Any],
             hooks: RayTrainHooks | LocalHooks | TaskHooks) -> dict[str, Any]:
    """Train an expert or the router; returns the last reported metrics.

    ``config["kind"]`` is ``"expert"`` or ``"router"``; ``config["train"]`` the settings of
    :class:`hdd_ray.config.TrainConfig`. Reports ``step``, ``loss`` and a checkpoint holding
    ``state.pt`` every ``checkpoint_every`` steps, at the last step, and on a drain notice.
    """
    rank, world = hooks.rank, hooks.world
    torch.set_num_threads(max(1, int(config.get("torch_threads", 1))))
    use_cuda = torch.cuda.is_available() and config.get("use_gpu", False)
    device = hooks.device(use_cuda)
    tr = config["train"]
    torch.manual_seed(tr["seed"] + rank)

    kind = ExpertTask if config["kind"] == "expert" else RouterTask
    task = kind(config, rank, world, pin_memory=use_cuda)
    model = task.model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = _adamw(trainable, tr["lr"], tr["weight_decay"])
    ema = EMA(model, tr["ema_decay"])
    rng = TrainingStreams(tr["seed"], rank, device)
    batch = rank_batch_size(tr["batch_size"], world)
    start_step, history, wall_before = 0, [], 0.0

    state = hooks.load_state()
    if state is not None:
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        start_step, history = int(state["step"]), list(state["history"])
        wall_before = float(state["wall_time"])
        _restore_data(task, rng, state, rank, world, start_step)
        torch.set_rng_state(state["torch_rng"])
    history.append({"start_step": start_step, "time": time.time(), **_node_info(device)})

    model = hooks.wrap(model)
    if tr.get("compile") and use_cuda:
        model = torch.compile(model)
    autocast = devices.autocast(device, tr["mixed_precision"])

    tracker = tracking.MetricBuffer(config.get("tracking") if rank == 0 else None)
    steps, accum, every = tr["steps"], tr["grad_accum"], tr["checkpoint_every"]
    group = _process_group_info()
    t0, smoothed, drain_checkpointed = time.time(), None, False
    # a constant rate without warm-up leaves the optimizer's lr alone (the runs before schedules)
    scheduled = tr.get("lr_schedule", "constant") != "constant" or tr.get("warmup_steps", 0) > 0
    last: dict[str, Any] = {}

    def report(step: int, loss: float | None, final: bool = False) -> None:
        elapsed = time.time() - t0
        data = _data_states(task, rng, world)  # every rank's position, for rank 0's checkpoint
        metrics = {"step": step, "loss": float("nan") if loss is None else loss,
                   "world_size": world, "final": final,
                   "steps_per_s": (step - start_step) / elapsed if elapsed > 0 else 0.0,
                   "skipped": sum(int(d["source"].get("skipped", 0)) for d in data), **group}
        last.update(metrics)
        if rank != 0:
            hooks.report(metrics, None)
            return
        hooks.report(metrics, {
            "model": _unwrap(model).state_dict(), "ema": ema.model.state_dict(),
            "optimizer": opt.state_dict(), "step": step, "history": history,
            **rng.state(), "torch_rng": torch.get_rng_state(), "data": data,
            "wall_time": wall_before + elapsed})
        # metrics after the checkpoint, in the background: a checkpoint (a drain's included)
        # never waits on MLflow; what fails stays buffered (hdd_ray.tracking.MetricBuffer)
        tracker.flush()

    try:
        if start_step >= steps:  # a finished run re-run: re-report its state so it has a result
            report(start_step, None, final=True)
            return last
        for step in range(start_step, steps):
            model.train()
            total = 0.0
            for micro in range(accum):
                sync = contextlib.nullcontext() if (world == 1 or micro == accum - 1) else model.no_sync()
                with sync:
                    with autocast:
                        loss = task.loss(model, batch, rng, device) / accum
                    loss.backward()
                total += float(loss.detach())
            if tr["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(trainable, tr["grad_clip"])
            if scheduled:
                for param_group in opt.param_groups:
                    param_group["lr"] = learning_rate(tr, step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(_unwrap(model))
            smoothed = total if smoothed is None else 0.98 * smoothed + 0.02 * total
            done = step + 1
            if done % LOG_EVERY == 0:
                tracker.log("loss", total, done)
                tracker.log("loss_smoothed", smoothed, done)
            drain = False
            if done % PREEMPTION_CHECK_EVERY == 0 and not drain_checkpointed:
                drain = hooks.preempted()  # a barrier: every rank calls it at the same steps
                drain_checkpointed = drain
                if drain and rank == 0:
                    log.warning("drain notice at step %d: checkpointing now", done)
            if done % every == 0 or done == steps or drain:
                report(done, smoothed, final=done == steps)
            if drain:  # the node may go away any time now: keep unsent metrics in the outbox
                tracker.persist()
    finally:
        # also when the loop fails: a task's worker process lives on (ray.executor: task);
        # its data producer thread and metric buffer must not
        task.close()
        tracker.close()  # after the last checkpoint: a bounded last try, the rest to the outbox
    return last


def rank_batch_size(batch_size: int, world: int) -> int:
    """Samples each of ``world`` ranks draws per micro-step: ``train.batch_size`` is **global**.

    ``batch_size`` counts the samples of one micro-step summed over a run's workers, so an
    optimizer step sees ``batch_size * grad_accum`` samples on one worker and on many (DDP
    averages the ranks' equal-sized mean losses: the global mean). Each rank draws its share
    with its own generators, seeded by ``(seed, rank)`` (:func:`hdd_ray.devices.stream_seed`).
    """
    check_global_batch("this run", batch_size, world)
    return batch_size // max(1, world)


def _quiet_report_log() -> None:
    """Ray Train logs every report at INFO under a path-named logger that LoggingConfig misses."""
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except Exception:  # private module: best effort only
        pass


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "module") else model


def _process_group_info() -> dict[str, Any]:
    """Size of this run's collective group: an expert's group holds only its own workers."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return {"pg_world_size": dist.get_world_size(), "pg_backend": str(dist.get_backend())}
    return {"pg_world_size": 1, "pg_backend": "none"}
