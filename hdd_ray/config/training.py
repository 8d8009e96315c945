"""The training sections: ``experts`` (with ``experts.list``), ``router`` and ``distill`` (one
dense student distilled from a mixture), and what they share: ``train``, ``resources``,
``data`` (and the experts' ``text``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional  # noqa: UP035 - OmegaConf needs typing generics

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hdd_ray.choices import (
    ADALN_VARIANTS,
    DIT_SIZES,
    GROW_MODES,
    INIT_MODES,
    OBJECTIVE_NAMES,
    ROUTER_SIZES,
    SCHEDULE_NAMES,
    TEXT_ENCODER_KINDS,
    TIMESTEP_SAMPLING,
)
from hdd_ray.config.pretrained import NetworkConfig
from hdd_ray.config.rules import (
    check_choice,
    check_fraction,
    check_positive,
    is_int,
    plain,
)
from hdd_ray.errors import ConfigError, first_line

MIXED_PRECISION = ("no", "bf16")
#: ``train.micro_batch_size``'s one named value: the most the declared GPU memory fits
MICRO_BATCH_AUTO = "auto"
LR_SCHEDULES = ("constant", "cosine")
DATA_MODES = ("auto", "memory", "stream")


@dataclass
class TrainConfig:
    """Optimisation settings shared by experts and the router."""

    steps: int = 400
    # global: the samples of one optimizer step summed over the run's workers (times
    # grad_accum, which draws that many batches per step)
    batch_size: int = 64
    lr: float = 3e-4
    # "constant", or "cosine": lr * (1 + cos(pi * step / steps)) / 2, after a linear warm-up of
    # ``warmup_steps`` (both schedules)
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_accum: int = 1
    # how a step fits in GPU memory, not part of a run's identity (the same samples, noise and
    # mean loss; hdd_ray/training/memory.py): samples per worker per forward, "auto" = the most
    # that resources.gpu_memory_gb fits (the whole per-worker batch when none is declared);
    # and recomputing each transformer block in the backward pass instead of keeping it
    micro_batch_size: Any = MICRO_BATCH_AUTO
    activation_checkpointing: bool = False
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    timestep_sampling: str = "uniform"  # uniform | logit_normal
    checkpoint_every: int = 100
    # write checkpoints in the background: the state is copied to host memory at the step (one
    # extra host copy of it, pinned on GPUs, kept for the next), then serialised and written
    # while training goes on, one write at a time; the drain and final checkpoints are written
    # before the loop goes on. false: each checkpoint is written at its step, in the training
    # thread, from the live state (hdd_ray/training/writer.py). Changes no number.
    async_checkpoint: bool = True
    mixed_precision: str = "bf16"  # bf16 autocast on GPU; ignored on CPU
    # torch.compile of the training step's model, on CUDA only (ignored on CPU); a failure to
    # compile trains eagerly after one warning line (hdd_ray/training/speed.py)
    compile: bool = True
    seed: int = 0

    def validate(self, prefix: str) -> None:
        """One-line :class:`ConfigError` naming ``prefix`` (``experts.train``, ``router.train``)."""
        for key in ("steps", "batch_size", "lr", "grad_accum", "checkpoint_every"):
            check_positive(f"{prefix}.{key}", getattr(self, key))
        check_positive(f"{prefix}.weight_decay", self.weight_decay, strict=False)
        check_positive(f"{prefix}.warmup_steps", self.warmup_steps, strict=False)
        check_choice(f"{prefix}.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.warmup_steps >= self.steps:
            raise ConfigError(f"{prefix}.warmup_steps={self.warmup_steps}: must be below "
                              f"{prefix}.steps={self.steps}")
        check_positive(f"{prefix}.grad_clip", self.grad_clip, strict=False)
        check_fraction(f"{prefix}.ema_decay", self.ema_decay)
        check_fraction(f"{prefix}.caption_dropout", self.caption_dropout)
        check_choice(f"{prefix}.timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        check_choice(f"{prefix}.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_micro_batch(f"{prefix}.micro_batch_size", self.micro_batch_size)


def check_micro_batch(key: str, value: Any) -> None:
    """One-line :class:`ConfigError` unless ``value`` is ``auto`` or an integer >= 1."""
    if value != MICRO_BATCH_AUTO and not (is_int(value) and value >= 1):
        raise ConfigError(f"{key}={value!r}: must be 'auto' or an integer >= 1")


@dataclass
class ResourcesConfig:
    """What one expert (or the router) asks Ray for."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    accelerator_type: Optional[str] = None
    custom: Dict[str, float] = field(default_factory=dict)  # e.g. {gpu_80gb: 1}
    label_selector: Dict[str, str] = field(default_factory=dict)
    max_failures: int = 3
    max_preemption_failures: int = -1  # -1 = keep retrying preemptions
    # GPU memory of the nodes a worker lands on, in GB (1e9 bytes, as sold: 24, 80): the memory
    # plan's budget (train.micro_batch_size: auto), checked against the device in the worker
    gpu_memory_gb: Optional[float] = None

    def validate(self, prefix: str) -> None:
        """One-line :class:`ConfigError` naming ``prefix`` (``experts.resources``, ...)."""
        # a run needs at least one worker: 0 would start a Ray Train run with nobody to train
        if not is_int(self.num_workers) or self.num_workers < 1:
            raise ConfigError(f"{prefix}.num_workers={self.num_workers!r}: must be an integer >= 1")
        check_positive(f"{prefix}.cpus_per_worker", self.cpus_per_worker, strict=False)
        check_positive(f"{prefix}.gpus_per_worker", self.gpus_per_worker, strict=False)
        if self.gpu_memory_gb is not None:
            check_positive(f"{prefix}.gpu_memory_gb", self.gpu_memory_gb)
            if not self.gpus_per_worker:
                raise ConfigError(f"{prefix}.gpu_memory_gb={self.gpu_memory_gb:g}: declared for "
                                  f"workers without a GPU ({prefix}.gpus_per_worker=0)")
        for name, amount in self.custom.items():
            check_positive(f"{prefix}.custom.{name}", amount, strict=False)
        for key in ("max_failures", "max_preemption_failures"):  # Ray Train: -1 = unlimited
            value = getattr(self, key)
            if not is_int(value) or value < -1:
                raise ConfigError(f"{prefix}.{key}={value!r}: must be an integer >= -1 "
                                  "(-1 = unlimited)")


@dataclass
class DataConfig:
    """How a run reads its training data (``experts.data``, ``router.data``); the pipeline is
    described in ``hdd_ray/training/data.py``. Not part of a run's identity (like resources)."""

    mode: str = "auto"  # auto (by size) | memory (decode all once) | stream (bounded memory)
    in_memory_max_mb: float = 1024.0  # auto: keep data up to this decoded size in memory
    shuffle_buffer: int = 4096  # samples per shuffled block of the stream (undecoded bytes)
    open_shards: int = 8  # shards read at once, round-robin, into each block
    prefetch_batches: int = 4  # batches decoded ahead in the background
    decode_workers: int = 2  # threads decoding images in the stream's producer process

    def validate(self, prefix: str) -> None:
        """One-line :class:`ConfigError` naming ``prefix`` (``experts.data``, ``router.data``)."""
        check_choice(f"{prefix}.mode", self.mode, DATA_MODES)
        check_positive(f"{prefix}.in_memory_max_mb", self.in_memory_max_mb, strict=False)
        for key in ("shuffle_buffer", "open_shards", "prefetch_batches", "decode_workers"):
            value = getattr(self, key)
            if not is_int(value) or value < 1:
                raise ConfigError(f"{prefix}.{key}={value!r}: must be an integer >= 1")


@dataclass
class TextConfig:
    """Text conditioning for the experts."""

    encoder: str = "learned"  # learned (demo, trained with each expert) | open_clip (frozen)
    arch: Optional[str] = None  # open_clip architecture
    pretrained: Optional[str] = None  # open_clip tag or local file
    dim: int = 64  # learned encoder width
    depth: int = 1
    vocab_size: int = 1024
    max_len: int = 16

    def validate(self) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``experts.text``."""
        check_choice("experts.text.encoder", self.encoder, TEXT_ENCODER_KINDS)
        if self.encoder == "open_clip" and not self.arch:
            raise ConfigError(
                "experts.text.arch=None: required for experts.text.encoder='open_clip'")
        for key in ("dim", "depth", "vocab_size", "max_len"):
            check_positive(f"experts.text.{key}", getattr(self, key))


@dataclass
class ExpertSpec:
    """One entry of ``experts.list``: per-expert overrides; ``None`` keeps the default."""

    cluster: int = -1
    objective: Optional[str] = None
    schedule: Optional[str] = None
    model: Optional[str] = None
    steps: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    # how this expert fits its node's GPU (train.micro_batch_size, train.activation_checkpointing)
    micro_batch_size: Optional[Any] = None
    activation_checkpointing: Optional[bool] = None
    # keys of ResourcesConfig, merged over ``experts.resources`` (only the keys given change)
    resources: Optional[Dict[str, Any]] = None
    init: Optional[str] = None  # this expert's start ("none": from scratch); None = experts.init

    def validate(self, prefix: str, k: int, default_resources: ResourcesConfig) -> None:
        """One-line :class:`ConfigError` naming ``prefix`` (``experts.list[i]``); ``k`` is
        ``clustering.k``, ``default_resources`` the ``experts.resources`` it merges over."""
        if not 0 <= self.cluster < k:
            raise ConfigError(f"{prefix}.cluster={self.cluster}: cluster id outside 0..{k - 1}")
        if self.objective is not None:
            check_choice(f"{prefix}.objective", self.objective, OBJECTIVE_NAMES)
        if self.schedule is not None:
            check_choice(f"{prefix}.schedule", self.schedule, SCHEDULE_NAMES)
        if self.model is not None:
            check_choice(f"{prefix}.model", self.model, tuple(DIT_SIZES))
        for key in ("steps", "batch_size", "lr"):
            if getattr(self, key) is not None:
                check_positive(f"{prefix}.{key}", getattr(self, key))
        if self.micro_batch_size is not None:
            check_micro_batch(f"{prefix}.micro_batch_size", self.micro_batch_size)
        if self.resources is not None:
            merged = merge_resources(default_resources, self.resources, f"{prefix}.resources")
            OmegaConf.to_object(merged).validate(f"{prefix}.resources")


@dataclass
class ExpertsConfig:
    """One expert per cluster. ``ddpm_clusters`` train ``ddpm_eps``, the rest ``objective``."""

    objective: str = "fm_velocity"
    ddpm_clusters: List[int] = field(default_factory=list)
    schedule: str = "cosine"  # VP schedule of ddpm_eps experts (the paper's; evaluation/README.md)
    model: str = "DiT-T/2"
    text: TextConfig = field(default_factory=TextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    list: List[ExpertSpec] = field(default_factory=list)
    # where the experts start (README, "Pretrained starts"): a DiT .pt, PixArt .pth, hdd_ray
    # expert or diffusers folder, a URI or a named tag; None = from scratch
    init: Optional[str] = None
    init_mode: str = "exact"  # exact (the checkpoint's network, converted in the loss) | paper
    adaln: str = "single"  # single (PixArt's AdaLN-Single) | zero (the original DiT's AdaLN-Zero)
    network: NetworkConfig = field(default_factory=NetworkConfig)

    def validate(self, k: int) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``experts``; cluster ids
        must be below ``k`` (``clustering.k``)."""
        check_choice("experts.objective", self.objective, OBJECTIVE_NAMES)
        check_choice("experts.schedule", self.schedule, SCHEDULE_NAMES)
        check_choice("experts.model", self.model, tuple(DIT_SIZES))
        for i, cid in enumerate(self.ddpm_clusters):
            if not 0 <= cid < k:
                raise ConfigError(f"experts.ddpm_clusters[{i}]={cid}: cluster id outside "
                                  f"0..{k - 1} (clustering.k={k})")
        check_choice("experts.init_mode", self.init_mode, INIT_MODES)
        check_choice("experts.adaln", self.adaln, ADALN_VARIANTS)
        self.network.validate()
        self.text.validate()
        self.train.validate("experts.train")
        self.resources.validate("experts.resources")
        self.data.validate("experts.data")
        seen: set[int] = set()
        for i, spec in enumerate(self.list):
            p = f"experts.list[{i}]"
            if 0 <= spec.cluster < k and spec.cluster in seen:
                raise ConfigError(f"{p}.cluster={spec.cluster}: listed twice")
            spec.validate(p, k, self.resources)
            seen.add(spec.cluster)


@dataclass
class RouterGrowConfig:
    """How the router of a grown campaign (an expert added: ``jobs/add_expert.py``) trains:
    ``incremental`` fine-tunes the previous cluster set's router, one output more, for
    ``steps`` steps on the new cluster and at most ``replay_samples`` samples of the old
    clusters (benchmarks/README.md, "Add an expert"); ``scratch`` trains it as ``router.train``
    says on every cluster."""

    mode: str = "incremental"
    steps: int = 200
    replay_samples: int = 1024

    def validate(self) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``router.grow``."""
        check_choice("router.grow.mode", self.mode, GROW_MODES)
        check_positive("router.grow.steps", self.steps)
        check_positive("router.grow.replay_samples", self.replay_samples)


@dataclass
class RouterConfig:
    """The router r(x_t, t) -> p(k | x_t, t), trained on cluster labels only."""

    model: str = "router-T"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(caption_dropout=0.0))
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    init: Optional[str] = None  # a finished hdd_ray router (folder or safetensors) to start from
    grow: RouterGrowConfig = field(default_factory=RouterGrowConfig)  # a grown campaign's

    def validate(self) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``router``."""
        check_choice("router.model", self.model, tuple(ROUTER_SIZES))
        self.grow.validate()
        self.train.validate("router.train")
        self.resources.validate("router.resources")
        self.data.validate("router.data")


@dataclass
class DistillConfig:
    """One dense flow-matching student distilled from a mixture (``jobs/distill.py``).

    ``teacher``: the mixture it learns from: ``None`` (the config's own: experts.ddpm_clusters
    and ``sampling``), an assignment (``"D F - D ..."``) or ``best`` (the best mixture of the
    sweep ``sweep.name``). ``data_weight``: the share of the data target ``eps - x0`` in the
    student's target; the teacher's velocity has the rest (1.0: the monolith baseline, no
    teacher). ``model`` (None: ``experts.model``) and the ``text`` encoder are the experts'."""

    teacher: Optional[str] = None
    data_weight: float = 0.0
    model: Optional[str] = None
    # caption dropout 0: a dropped caption's target is the teacher's unconditional velocity,
    # never used by a student that samples at guidance 1 (the monolith baseline wants 0.1)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(caption_dropout=0.0))
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``distill`` (the teacher's
        assignment is checked against ``clustering.k`` by :func:`hdd_ray.config.validate`)."""
        if not 0.0 <= float(self.data_weight) <= 1.0:
            raise ConfigError(f"distill.data_weight={self.data_weight!r}: must be in [0, 1] "
                              "(1 = the monolith baseline, trained on data alone)")
        if self.model is not None:
            check_choice("distill.model", self.model, tuple(DIT_SIZES))
        if self.teacher is not None and not str(self.teacher).strip():
            raise ConfigError("distill.teacher='': an assignment ('D F F ...'), 'best' or None")
        self.train.validate("distill.train")
        self.resources.validate("distill.resources")
        self.data.validate("distill.data")


def merge_resources(base: Any, override: Any, prefix: str = "experts.list[].resources") -> Any:
    """``base`` (a ``ResourcesConfig`` node) with the keys of ``override`` replaced.

    Nested maps (``custom``, ``label_selector``) are merged key by key. An unknown key or a value
    of the wrong type raises :class:`ConfigError` naming ``prefix``.
    """
    override = plain(override) if not isinstance(override, dict) else override
    unknown = sorted(set(override) - set(ResourcesConfig.__dataclass_fields__))
    if unknown:
        allowed = ", ".join(ResourcesConfig.__dataclass_fields__)
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key, allowed: {allowed}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ResourcesConfig), base, override)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        value = getattr(exc, "value", None)
        raise ConfigError(
            f"{prefix}.{key}={value!r}: {first_line(getattr(exc, 'msg', exc))}"
        ) from None
    return merged
