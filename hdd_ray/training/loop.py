"""One training loop for every expert, the router and a distilled student, run by Ray Train on
each worker (or, with ``ray.executor: task``, as one Ray task per run), told what to train by a
:class:`hdd_ray.training.settings.RunSettings` (long because the loop, the tasks it trains and
their shared data handling are read together; a student's task is
:mod:`hdd_ray.training.distill`'s).

The loop never knows which objective it trains: an expert's :class:`Objective` owns the loss,
the router's task owns its cross-entropy. What the loop owns is everything a preemptible run
needs: resume from the run's newest checkpoint (model, EMA, optimizer, step, RNG states), a
checkpoint every ``checkpoint_every`` steps and at once when Ray reports a drain of the node
(written while training goes on, :mod:`hdd_ray.training.writer`),
gradient accumulation, the learning-rate schedule (:func:`hdd_ray.optim.learning_rate`), bf16
autocast and DDP on GPUs, and metrics to MLflow (:class:`hdd_ray.tracking.MetricBuffer`, with
the tracking URI passed in: workers do not inherit the driver's). Who runs it answers through
its hooks (:mod:`hdd_ray.training.hooks`: Ray Train, one Ray task, or a plain process); the
checkpoints of either executor are :mod:`hdd_ray.training.checkpoints`' business.
``train.batch_size`` is the global batch of an accumulation chunk (``grad_accum`` chunks per
step), split evenly over the run's workers (:func:`rank_batch_size`); a worker draws its share
once per chunk and runs it in micro-batches of ``train.micro_batch_size`` (the memory plan,
:mod:`hdd_ray.training.memory`), each micro-batch's loss weighted by its share of the chunk, so
the step's gradient is the mean over the global batch however it is split, and DDP
synchronises on the step's last micro-batch only. Every random draw goes through
:mod:`hdd_ray.devices` (generators on the device of the tensors they feed). Data comes from one
:class:`hdd_ray.training.data.BatchSource` per rank (in memory or streamed); every rank's data
position and generators are gathered into rank 0's checkpoint, and the samples skipped as
damaged are reported as ``skipped``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch
from torch import Tensor, nn

from hdd_ray import devices, tracking
from hdd_ray.config import check_global_batch
from hdd_ray.devices import TrainingStreams
from hdd_ray.diffusion import FM_TIME_SCALE, NoisedBatch, per_sample
from hdd_ray.models.expert import ExpertModel, RouterModel
from hdd_ray.optim import learning_rate
from hdd_ray.training.data import BatchSource, StreamSource, closed_on_error
from hdd_ray.training.hooks import (
    Hooks,
    LocalHooks,
    RayTrainHooks,
    TaskHooks,
    node_info,
    process_group_info,
)
from hdd_ray.training.memory import Network, expert_network, router_network, worker_plan
from hdd_ray.training.settings import RunSettings
from hdd_ray.training.speed import CompiledOrEager, enable_tf32, unwrap
from hdd_ray.training.starts import expert_objective, load_start
from hdd_ray.training.writer import StateSnapshot

log = logging.getLogger(__name__)

__all__ = ["EMA", "ExpertTask", "LocalHooks", "RayTrainHooks", "RouterTask", "TaskHooks",
           "rank_batch_size", "run_loop", "train_loop", "train_task"]

PREEMPTION_CHECK_EVERY = 10
LOG_EVERY = 10


# ------------------------------------------------------------------------------------- tasks


class _DataTask:
    """What experts and the router share: a :class:`BatchSource` over their shards, and the
    shape of their network for the memory plan."""

    data: BatchSource
    network: Network

    def close(self) -> None:
        """Stop the data source's background work."""
        self.data.close()


class ExpertTask(_DataTask):
    """An expert: its cluster's data and its own objective's loss; a new run (``fresh``) of an
    expert with a start loads its checkpoint first (:mod:`hdd_ray.training.starts`)."""

    def __init__(self, settings: RunSettings, rank: int = 0, world: int = 1,
                 pin_memory: bool = False, fresh: bool = True) -> None:
        spec = settings.expert
        if spec is None:
            raise ValueError("an expert run needs its expert (RunSettings.expert)")
        self.train = settings.train
        self.objective = expert_objective(settings)
        self.data = settings.open_data([(p, spec.cluster) for p in settings.shards],
                                       settings.num_samples, rank, world, pin_memory,
                                       stored_text=True)
        with closed_on_error(self.data):
            if fresh:  # a stream's first block is read while the model is built
                self.data.prime(rank_batch_size(self.train.batch_size, world))
            self.model = ExpertModel(spec.model, spec.text, settings.image_size,
                                     settings.channels, adaln=spec.adaln)
            if fresh:  # a resumed run's checkpoint holds its weights: the init is not read again
                load_start(self.model, settings)
        # without caption dropout the null caption is never used: it is not trained (DDP, with
        # find_unused_parameters=False, would wait for its gradient at every step; AdamW's
        # weight decay would shrink it)
        if self.train.caption_dropout <= 0:
            self.model.net.y_null.requires_grad_(False)
        self.model.net.activation_checkpointing = bool(self.train.activation_checkpointing)
        self.network = expert_network(spec.model, spec.text, settings.image_size,
                                      settings.channels)
        # exported with the weights: the conversion's prior E[x0] near t = 1 (streaming: the
        # running mean over the samples seen, set at every step; hdd_ray.training.data)
        if not self.data.streaming:
            self.model.set_data_mean(self.data.mean()[None])

    def draw(self, model: nn.Module, batch_size: int, rng: TrainingStreams,
             device: torch.device) -> NoisedBatch:
        """The next batch, noised by the objective (every draw of it made here)."""
        x0, captions, _ = self.data.next_batch(batch_size, rng.data)
        inner = unwrap(model)
        if self.data.streaming:
            inner.set_data_mean(self.data.mean()[None])
        cond = inner.tokenize(captions, device)
        return self.objective.draw(x0.to(device, non_blocking=True), cond,
                                   self.train.caption_dropout, rng.noise, inner.prior_mean())


class RouterTask(_DataTask):
    """The router: every cluster's data with its cluster id, noised on the flow-matching path.

    It reads all clusters as one pool at their natural frequencies (hdd_ray.training.data)."""

    def __init__(self, settings: RunSettings, rank: int = 0, world: int = 1,
                 pin_memory: bool = False, fresh: bool = True) -> None:
        self.train = settings.train
        k = settings.num_clusters
        self.data = settings.open_data(*settings.every_cluster(), rank, world, pin_memory)
        with closed_on_error(self.data):
            if fresh:  # a stream's first block is read while the model is built
                self.data.prime(rank_batch_size(self.train.batch_size, world))
            self.model = RouterModel(settings.router_model, settings.image_size,
                                     settings.channels, k)
            if fresh:
                load_start(self.model, settings)
        self.model.net.activation_checkpointing = bool(self.train.activation_checkpointing)
        self.network = router_network(settings.router_model, settings.image_size,
                                      settings.channels, k)

    def draw(self, model: nn.Module, batch_size: int, rng: TrainingStreams,
             device: torch.device) -> LabelledBatch:
        """The next batch with its clusters, noised at uniform times on the flow-matching path."""
        x0, _, labels = self.data.next_batch(batch_size, rng.data)
        x0, labels = x0.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        t = devices.rand(batch_size, rng.noise, device)
        eps = devices.randn(x0.shape, rng.noise, device)
        tb = per_sample(t, x0)
        return LabelledBatch((1 - tb) * x0 + tb * eps, t * FM_TIME_SCALE, labels)


class LabelledBatch:
    """The router's drawn batch: ``x_t`` at network time ``time`` and its cluster ``labels``."""

    def __init__(self, x: Tensor, time: Tensor, labels: Tensor) -> None:
        self.x, self.time, self.labels = x, time, labels

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def split(self, size: int) -> list[LabelledBatch]:
        """Consecutive micro-batches of at most ``size`` samples (itself if it fits)."""
        if size >= len(self):
            return [self]
        return [LabelledBatch(self.x[i:i + size], self.time[i:i + size],
                              self.labels[i:i + size]) for i in range(0, len(self), size)]

    def loss(self, model: nn.Module) -> Tensor:
        """Cross-entropy of ``model``'s logits against the clusters (mean over this batch)."""
        return nn.functional.cross_entropy(model(self.x, self.time).float(), self.labels)


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
    all of the data's damage, which a stream counts on epoch 0 only), as does a stream whose
    position was taken under other ``shuffle_buffer`` / ``open_shards`` settings. The skip
    count is kept: rank 0 carries the checkpoint's total."""
    ranks = state.get("data")
    if rank == 0:
        rng.load(state)
    sources = [r["source"] for r in ranks or []]
    same_kind = bool(sources) and all(("position" in s) == task.data.streaming for s in sources)
    if same_kind and isinstance(task.data, StreamSource):
        # a position recorded before layouts were saved (None) is taken as this one's
        saved = [s.get("layout") for s in sources]
        if any(layout not in (None, task.data.layout()) for layout in saved):
            same_kind = False  # the position means other blocks now: start the next epoch
            if rank == 0:
                log.warning("data settings changed since the checkpoint (%s, now %s): the "
                            "stream starts its next epoch", saved[0], task.data.layout())
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
    """Exponential moving average of a model's **trainable** parameters.

    A frozen part (an open_clip text tower) is neither copied nor averaged: it never changes.
    :meth:`exported` gives the model's exported weights with the average in place of each
    trainable parameter (buffers, such as an expert's data mean, are the live model's)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self._params = [p.detach().clone() for _, p in named]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema = decay * ema + (1 - decay) * param``: one fused ``_foreach_lerp_`` over the
        trainable parameters (the same per-element lerp as a loop of ``lerp_``, without ~100
        calls a step on a tiny model)."""
        params = [p.detach() for p in model.parameters() if p.requires_grad]
        if len(params) != len(self._params):
            raise ValueError(f"EMA: the model has {len(params)} trainable parameters, the "
                             f"average {len(self._params)}")
        if any(p.dtype != e.dtype for p, e in zip(params, self._params, strict=True)):
            params = [p.to(e.dtype) for p, e in zip(params, self._params, strict=True)]
        torch._foreach_lerp_(self._params, params, 1 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged parameters by name."""
        return dict(zip(self.names, self._params, strict=True))

    @torch.no_grad()
    def load(self, weights: dict[str, Tensor]) -> None:
        """Continue from ``weights`` (exported weights, as :meth:`exported` gives them)."""
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise ValueError(f"EMA: the checkpoint's average lacks {missing[:3]}")
        for name, param in zip(self.names, self._params, strict=True):
            param.copy_(weights[name])

    def exported(self, model: nn.Module) -> dict[str, Tensor]:
        """``model``'s exported weights (``exported_state()``) with the average in place."""
        averaged = self.state_dict()
        state = model.exported_state() if hasattr(model, "exported_state") else model.state_dict()
        return {k: averaged.get(k, v) for k, v in state.items()}


def _adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over all parameters; on the CPU since torch 2.4),
    else the multi-tensor one. On the CPU the per-parameter default costs ~5 ms of a ~70 ms
    DiT-T/2 demo step, fused ~1.6 ms (benchmarks/README.md, "Demo main job")."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # fused AdamW not built for this device / torch version
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


# ------------------------------------------------------------------------------------- loop


def train_loop(settings: RunSettings) -> None:
    """Ray Train worker entry point (``TorchTrainer(partial(train_loop, settings))``)."""
    run_loop(settings, RayTrainHooks(settings.run_directory))


def train_task(settings: RunSettings) -> dict[str, Any]:
    """Ray task entry point of ``ray.executor: task``: the whole run in this process; returns
    the last reported metrics (the final state is the run's task checkpoint)."""
    if not settings.run_directory:
        raise ValueError("a task run needs its run directory (RunSettings.run_directory)")
    return run_loop(settings, TaskHooks(settings.run_directory))


def run_loop(settings: RunSettings, hooks: Hooks) -> dict[str, Any]:
    """Train an expert, the router or a student (``settings.kind``); returns the last metrics.

    Reports ``step``, ``loss`` and a checkpoint holding ``state.pt`` every ``checkpoint_every``
    steps of ``settings.train``, at the last step, and on a drain notice.
    """
    return _Run(settings, hooks).train()


class _Run:
    """One run of the loop: its model, optimizer, EMA and generators, built (and resumed from
    the hooks' state) at construction, trained by :meth:`train`."""

    def __init__(self, settings: RunSettings, hooks: Hooks) -> None:
        self.hooks, self.rank, self.world = hooks, hooks.rank, hooks.world
        tr = self.tr = settings.train
        torch.set_num_threads(max(1, int(settings.torch_threads)))
        use_cuda = torch.cuda.is_available() and settings.use_gpu
        self.device = hooks.device(use_cuda)
        torch.manual_seed(tr.seed + self.rank)

        kind = _task_kind(settings.kind)
        state = hooks.load_state()
        self.task = kind(settings, self.rank, self.world, pin_memory=use_cuda,
                         fresh=state is None)
        with closed_on_error(self.task.data):  # a primed stream stops with the run
            model = self.task.model.to(self.device)
            self.trainable = [p for p in model.parameters() if p.requires_grad]
            self.opt = _adamw(self.trainable, tr.lr, tr.weight_decay)
            self.ema = EMA(model, tr.ema_decay)
            self.rng = TrainingStreams(tr.seed, self.rank, self.device)
            self.batch = rank_batch_size(tr.batch_size, self.world)
            self.plan = worker_plan(self.task.network, tr, self.batch, self.world, self.device,
                                    settings.gpu_memory_gb, settings.gpus_per_worker,
                                    settings.kind)
            self.micro = int(self.plan.micro_batch or self.batch)
            if self.rank == 0 and self.micro < self.batch:
                log.info("memory plan: %s", self.plan.line())
            self.start_step, self.history, self.wall_before = 0, [], 0.0
            self._resume(model, state)
            self.history.append({"start_step": self.start_step, "time": time.time(),
                                 **node_info(self.device)})

            model = hooks.wrap(model)
            if use_cuda:
                enable_tf32()
            # compiled on CUDA only (train.compile, on by default), eager again if it fails
            self.model = CompiledOrEager(model) if tr.compile and use_cuda else model
            self.autocast = devices.autocast(self.device, tr.mixed_precision)
            self.tracker = tracking.MetricBuffer(settings.tracking if self.rank == 0 else None)
            self.group = process_group_info()
            self.t0, self.smoothed = time.time(), None
            #: host seconds spent getting batches (the data path's share of the loop: a stream that
            #: falls behind the model shows here; reported as ``data_wait_share``; a student's
            #: batch includes its teacher's forward, hdd_ray.training.distill)
            self.data_wait = 0.0
            #: each step's micro-batch losses on the device, since the last read (:meth:`_settle`)
            self.pending: list[list[Tensor]] = []
            # a constant rate without warm-up leaves the optimizer's lr alone (the runs before schedules)
            self.scheduled = tr.lr_schedule != "constant" or tr.warmup_steps > 0
            self.last: dict[str, Any] = {}
            #: train.async_checkpoint: the state copied to the host here, written in the background
            self.snapshot = StateSnapshot() if tr.async_checkpoint else None

    def _resume(self, model: nn.Module, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        model.load_state_dict(state["model"])
        self.ema.load(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.start_step, self.history = int(state["step"]), list(state["history"])
        self.wall_before = float(state["wall_time"])
        _restore_data(self.task, self.rng, state, self.rank, self.world, self.start_step)
        torch.set_rng_state(state["torch_rng"])

    def train(self) -> dict[str, Any]:
        """Every step left, the checkpoints and the metrics; the last reported metrics."""
        steps, every = self.tr.steps, self.tr.checkpoint_every
        drain_checkpointed = failed = False
        try:
            if self.start_step >= steps:  # a finished run re-run: re-report its state
                self.report(self.start_step, None, final=True, wait=True)
                return self.last
            for step in range(self.start_step, steps):
                self.pending.append(self.step(step))
                done = step + 1
                if done % LOG_EVERY == 0:
                    total = self._settle()  # the one host read of the interval's losses
                    self.tracker.log("loss", total, done)
                    self.tracker.log("loss_smoothed", self.smoothed, done)
                drain = False
                if done % PREEMPTION_CHECK_EVERY == 0 and not drain_checkpointed:
                    drain = self.hooks.preempted()  # a barrier: every rank calls it at the same steps
                    drain_checkpointed = drain
                    if drain and self.rank == 0:
                        log.warning("drain notice at step %d: checkpointing now", done)
                if done % every == 0 or done == steps or drain:
                    self._settle()  # the drain's and the last checkpoint are written when done
                    self.report(done, self.smoothed, final=done == steps,
                                wait=drain or done == steps)
                if drain:  # the node may go away any time now: keep unsent metrics in the outbox
                    self.tracker.persist()
        except BaseException:
            failed = True
            raise
        finally:
            self._finish(failed)
        return self.last

    def _finish(self, failed: bool) -> None:
        """On every way out: wait for the checkpoint write in flight (its failure raised, or
        logged when the loop itself ``failed``), then stop the data source and the metrics
        (a task's worker process lives on, ``ray.executor: task``: its threads must not)."""
        try:
            self.hooks.flush()
        except Exception as exc:
            if not failed:
                raise
            log.error("%s", exc)  # the loop's own failure is the one raised
        finally:
            self.task.close()
            self.tracker.close()  # after the last checkpoint: a bounded last try, the rest to the outbox

    def step(self, step: int) -> list[Tensor]:
        """One optimizer step at 0-based ``step`` -> its micro-batches' losses, still on the
        device (:meth:`_settle` reads them): ``grad_accum`` chunks of the
        per-worker batch, each drawn once and run in micro-batches of at most ``self.micro``
        samples, each loss weighted by its share of the step (the mean over the step's
        samples); DDP synchronises on the last micro-batch only."""
        tr, model, accum = self.tr, self.model, self.tr.grad_accum
        model.train()
        losses: list[Tensor] = []
        for chunk in range(accum):
            t = time.perf_counter()
            drawn = self.task.draw(model, self.batch, self.rng, self.device)
            self.data_wait += time.perf_counter() - t
            parts = drawn.split(self.micro)
            for i, part in enumerate(parts):
                last = chunk == accum - 1 and i == len(parts) - 1
                sync = (contextlib.nullcontext() if (self.world == 1 or last)
                        else model.no_sync())
                with sync:
                    # a whole chunk: / accum, as before micro-batches (the same bits)
                    losses.append(self._backward(part, accum * self.batch / len(part)))
        if tr.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, tr.grad_clip)
        if self.scheduled:
            for param_group in self.opt.param_groups:
                param_group["lr"] = learning_rate(step, tr.lr, tr.steps, tr.warmup_steps,
                                                  tr.lr_schedule)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(unwrap(model))
        return losses

    def _backward(self, part: Any, share: float) -> Tensor:
        """One micro-batch's forward and backward -> its weighted loss, still on the device
        (read at the logging interval). A compiler failure at either runs it again eagerly
        (:class:`hdd_ray.training.speed.CompiledOrEager`): nothing was accumulated by it."""
        def forward_backward() -> Tensor:
            with self.autocast:
                loss = part.loss(self.model) / share
            loss.backward()
            return loss.detach()

        try:
            return forward_backward()
        except Exception as exc:
            if not (isinstance(self.model, CompiledOrEager) and self.model.fall_back(exc)):
                raise
        return forward_backward()

    def _settle(self) -> float:
        """The losses of the steps since the last call, read from the device at once (the
        loop's one host sync per logging interval), folded into the smoothed loss step by
        step -> the last step's loss (the sum of its micro-batches' weighted losses)."""
        flat = [loss.float() for losses in self.pending for loss in losses]
        values = iter(torch.stack(flat).tolist() if flat else [])
        total = 0.0
        for losses in self.pending:
            total = 0.0
            for _ in losses:
                total += next(values)
            self.smoothed = total if self.smoothed is None else 0.98 * self.smoothed + 0.02 * total
        self.pending.clear()
        return total

    def report(self, step: int, loss: float | None, final: bool = False,
               wait: bool = False) -> None:
        """Metrics to the hooks (rank 0: with the checkpoint's state, written before this
        returns when ``wait`` or without ``train.async_checkpoint``), then MLflow's in the
        background."""
        elapsed = time.time() - self.t0
        data = _data_states(self.task, self.rng, self.world)  # every rank's, for rank 0's checkpoint
        metrics = {"step": step, "loss": float("nan") if loss is None else loss,
                   "world_size": self.world, "final": final,
                   "steps_per_s": (step - self.start_step) / elapsed if elapsed > 0 else 0.0,
                   "data_wait_share": self.data_wait / elapsed if elapsed > 0 else 0.0,
                   "skipped": sum(int(d["source"].get("skipped", 0)) for d in data), **self.group}
        self.last.update(metrics)
        if self.rank != 0:
            self.hooks.report(metrics, None, wait=wait)
            return
        state = {
            "model": unwrap(self.model).state_dict(), "ema": self.ema.exported(unwrap(self.model)),
            "optimizer": self.opt.state_dict(), "step": step, "history": self.history,
            **self.rng.state(), "torch_rng": torch.get_rng_state(), "data": data,
            "wall_time": self.wall_before + elapsed}
        if self.snapshot is not None:  # hdd_ray.training.writer: copied now, written meanwhile
            self.hooks.flush()  # the previous write is done with the snapshot's buffers
            state = self.snapshot.take(state)
        self.hooks.report(metrics, state, wait=wait or self.snapshot is None)
        # metrics after the checkpoint, in the background: a checkpoint (a drain's included)
        # never waits on MLflow; what fails stays buffered (hdd_ray.tracking.MetricBuffer)
        if step > self.start_step:  # a finished run re-run has waited for nothing
            self.tracker.log("data_wait_share", metrics["data_wait_share"], step)
        self.tracker.flush()


def rank_batch_size(batch_size: int, world: int) -> int:
    """Samples each of ``world`` ranks draws per micro-step: ``train.batch_size`` is **global**.

    ``batch_size`` counts the samples of one micro-step summed over a run's workers, so an
    optimizer step sees ``batch_size * grad_accum`` samples on one worker and on many (DDP
    averages the ranks' equal-sized mean losses: the global mean). Each rank draws its share
    with its own generators, seeded by ``(seed, rank)`` (:func:`hdd_ray.devices.stream_seed`).
    """
    check_global_batch("this run", batch_size, world)
    return batch_size // max(1, world)


def _task_kind(kind: str) -> type:
    """What a run of ``kind`` trains: an expert, the router or a student (a distillation)."""
    from hdd_ray.training import distill

    return {"expert": ExpertTask, "router": RouterTask, "student": distill.DistillTask}[kind]
