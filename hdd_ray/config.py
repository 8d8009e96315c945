"""Typed campaign configuration: OmegaConf structured dataclasses, YAML + dotlist, validation.

Longer than ~500 lines on purpose: it is the whole schema of a campaign, and each section's
dataclass carries its own ``validate`` method, so every option, its default and its rule are
read in one place (cross-section checks: :func:`validate`). Splitting it would part options
from their checks.

A campaign is described by one :class:`CampaignConfig`. It is loaded from a YAML file (the
demo campaign ``jobs/configs/demo.yaml`` when none is given), overridden from the command line
with ``key=value`` items (``experts.train.steps=2000``, ``experts.ddpm_clusters=[0,3]``) and
validated before anything else runs. Every problem raises :class:`ConfigError` with one line
that names the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional  # noqa: UP035 - OmegaConf needs typing generics

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hdd_ray.choices import (
    BEYOND_EDGE,
    DIT_SIZES,
    EXTRACTOR_KINDS,
    OBJECTIVE_NAMES,
    ROUTER_SIZES,
    SAMPLERS,
    SCHEDULE_NAMES,
    STRATEGIES,
    TEXT_ENCODER_KINDS,
    TIMESTEP_SAMPLING,
    check_routing,
    parse_assignment,
)
from hdd_ray.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "jobs" / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"

# Choices owned by this module. The others come from hdd_ray.choices, the torch-free registries
# the implementing modules share (this module must load without torch).
EMBEDDERS = ("pixels", "dinov2", "open_clip")
CORPUS_SOURCES = ("demo", "webdataset")
MIXED_PRECISION = ("no", "bf16")
LR_SCHEDULES = ("constant", "cosine")
#: how a run executes (``ray.executor``): a Ray Train TorchTrainer, or one Ray task
EXECUTORS = ("train", "task")
SWEEP_MODES = ("grid", "n_ddpm", "list", "random", "optuna")
LATENT_DTYPES = ("float16", "bfloat16")
DATA_MODES = ("auto", "memory", "stream")


# --------------------------------------------------------------------------- sections


@dataclass
class CorpusConfig:
    """Where the image-caption pairs come from."""

    source: str = "demo"  # demo | webdataset
    uri: Optional[str] = None  # shards: dir, file, brace pattern or s3:// gs:// URI
    image_key: str = "png"
    caption_key: str = "txt"
    image_size: int = 8  # images are resized (square) to this many pixels
    channels: int = 1  # 1 = grayscale, 3 = RGB
    shard_size: int = 1000  # samples per written shard

    def validate(self) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``corpus``."""
        _choice("corpus.source", self.source, CORPUS_SOURCES)
        if self.source == "webdataset" and not self.uri:
            raise ConfigError("corpus.uri=None: required when corpus.source='webdataset'")
        _positive("corpus.image_size", self.image_size)
        if self.channels not in (1, 3):
            raise ConfigError(f"corpus.channels={self.channels!r}: allowed: 1, 3")
        _positive("corpus.shard_size", self.shard_size)


@dataclass
class LatentsConfig:
    """Latent space: experts and the router train on VAE latents (``vae=None``: pixel space).

    ``vae`` is a local folder of a diffusers ``AutoencoderKL`` (nothing is downloaded);
    ``scaling_factor`` / ``shift_factor`` None = read from the VAE's config (hdd_ray.latents).
    """

    vae: Optional[str] = None  # local AutoencoderKL folder; None = pixel space
    subfolder: Optional[str] = None  # e.g. "vae" inside a pipeline folder
    scaling_factor: Optional[float] = None  # None = the VAE config's (0.18215 if absent)
    shift_factor: Optional[float] = None  # None = the VAE config's (0 if absent)
    dtype: str = "float16"  # storage of the latents in the shards: float16 | bfloat16

    def validate(self) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``latents``."""
        _choice("latents.dtype", self.dtype, LATENT_DTYPES)
        if self.vae is not None and not str(self.vae).strip():
            raise ConfigError("latents.vae='': a local AutoencoderKL folder, or null for pixels")
        if self.vae is None:
            for key in ("subfolder", "scaling_factor", "shift_factor"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"latents.{key}={getattr(self, key)!r}: only used with "
                                      "latents.vae (a local AutoencoderKL folder)")
        if self.scaling_factor is not None:
            _positive("latents.scaling_factor", self.scaling_factor)
        if self.shift_factor is not None and self.shift_factor != self.shift_factor:
            raise ConfigError("latents.shift_factor=nan: must be a number")


@dataclass
class ClusteringConfig:
    """Embedding + hierarchical k-means into K clusters."""

    k: int = 8
    embedder: str = "pixels"  # pixels | dinov2 | open_clip
    embedder_arch: Optional[str] = None  # timm / open_clip architecture name
    embedder_weights: Optional[str] = None  # local weights file or open_clip pretrained tag
    embedder_image_size: Optional[int] = None  # feature embedders' input size (None = arch default)
    pixel_size: int = 8  # pixels embedder: downsample to this size
    fine_centroids: int = 32
    fit_sample_cap: int = 100_000
    kmeans_iters: int = 50
    balance_cap: Optional[int] = None  # max samples per cluster (None = no balancing)
    heldout_fraction: float = 0.1
    batch_size: int = 256
    num_actors: int = 1
    gpus_per_actor: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``clustering``."""
        _positive("clustering.k", self.k)
        _choice("clustering.embedder", self.embedder, EMBEDDERS)
        if self.embedder != "pixels" and not self.embedder_arch:
            raise ConfigError(
                f"clustering.embedder_arch=None: required for clustering.embedder={self.embedder!r}"
            )
        for key in ("pixel_size", "fine_centroids", "fit_sample_cap", "kmeans_iters",
                    "batch_size", "num_actors"):
            _positive(f"clustering.{key}", getattr(self, key))
        if self.fine_centroids < self.k:
            raise ConfigError(
                f"clustering.fine_centroids={self.fine_centroids}: must be >= clustering.k={self.k}"
            )
        if self.balance_cap is not None:
            _positive("clustering.balance_cap", self.balance_cap)
        if self.embedder_image_size is not None:
            _positive("clustering.embedder_image_size", self.embedder_image_size)
        _fraction("clustering.heldout_fraction", self.heldout_fraction)
        _positive("clustering.gpus_per_actor", self.gpus_per_actor, strict=False)


@dataclass
class TrainConfig:
    """Optimisation settings shared by experts and the router."""

    steps: int = 400
    batch_size: int = 64  # global: one micro-step's samples summed over the run's workers
    lr: float = 3e-4
    # "constant", or "cosine": lr * (1 + cos(pi * step / steps)) / 2, after a linear warm-up of
    # ``warmup_steps`` (both schedules)
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_accum: int = 1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    timestep_sampling: str = "uniform"  # uniform | logit_normal
    checkpoint_every: int = 100
    mixed_precision: str = "bf16"  # bf16 autocast on GPU; ignored on CPU
    compile: bool = False
    seed: int = 0

    def validate(self, prefix: str) -> None:
        """One-line :class:`ConfigError` naming ``prefix`` (``experts.train``, ``router.train``)."""

        for key in ("steps", "batch_size", "lr", "grad_accum", "checkpoint_every"):
            _positive(f"{prefix}.{key}", getattr(self, key))
        _positive(f"{prefix}.weight_decay", self.weight_decay, strict=False)
        _positive(f"{prefix}.warmup_steps", self.warmup_steps, strict=False)
        _choice(f"{prefix}.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.warmup_steps >= self.steps:
            raise ConfigError(f"{prefix}.warmup_steps={self.warmup_steps}: must be below "
                              f"{prefix}.steps={self.steps}")
        _positive(f"{prefix}.grad_clip", self.grad_clip, strict=False)
        _fraction(f"{prefix}.ema_decay", self.ema_decay)
        _fraction(f"{prefix}.caption_dropout", self.caption_dropout)
        _choice(f"{prefix}.timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        _choice(f"{prefix}.mixed_precision", self.mixed_precision, MIXED_PRECISION)


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

    def validate(self, prefix: str) -> None:
        """One-line :class:`ConfigError` naming ``prefix`` (``experts.resources``, ...)."""
        # a run needs at least one worker: 0 would start a Ray Train run with nobody to train
        if not _is_int(self.num_workers) or self.num_workers < 1:
            raise ConfigError(f"{prefix}.num_workers={self.num_workers!r}: must be an integer >= 1")
        _positive(f"{prefix}.cpus_per_worker", self.cpus_per_worker, strict=False)
        _positive(f"{prefix}.gpus_per_worker", self.gpus_per_worker, strict=False)
        for name, amount in self.custom.items():
            _positive(f"{prefix}.custom.{name}", amount, strict=False)
        for key in ("max_failures", "max_preemption_failures"):  # Ray Train: -1 = unlimited
            value = getattr(self, key)
            if not _is_int(value) or value < -1:
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
    decode_workers: int = 2  # threads decoding images

    def validate(self, prefix: str) -> None:
        """One-line :class:`ConfigError` naming ``prefix`` (``experts.data``, ``router.data``)."""
        _choice(f"{prefix}.mode", self.mode, DATA_MODES)
        _positive(f"{prefix}.in_memory_max_mb", self.in_memory_max_mb, strict=False)
        for key in ("shuffle_buffer", "open_shards", "prefetch_batches", "decode_workers"):
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
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

        _choice("experts.text.encoder", self.encoder, TEXT_ENCODER_KINDS)
        if self.encoder == "open_clip" and not self.arch:
            raise ConfigError(
                "experts.text.arch=None: required for experts.text.encoder='open_clip'")
        for key in ("dim", "depth", "vocab_size", "max_len"):
            _positive(f"experts.text.{key}", getattr(self, key))


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
    # keys of ResourcesConfig, merged over ``experts.resources`` (only the keys given change)
    resources: Optional[Dict[str, Any]] = None

    def validate(self, prefix: str, k: int, default_resources: ResourcesConfig) -> None:
        """One-line :class:`ConfigError` naming ``prefix`` (``experts.list[i]``); ``k`` is
        ``clustering.k``, ``default_resources`` the ``experts.resources`` it merges over."""

        if not 0 <= self.cluster < k:
            raise ConfigError(f"{prefix}.cluster={self.cluster}: cluster id outside 0..{k - 1}")
        if self.objective is not None:
            _choice(f"{prefix}.objective", self.objective, OBJECTIVE_NAMES)
        if self.schedule is not None:
            _choice(f"{prefix}.schedule", self.schedule, SCHEDULE_NAMES)
        if self.model is not None:
            _choice(f"{prefix}.model", self.model, tuple(DIT_SIZES))
        for key in ("steps", "batch_size", "lr"):
            if getattr(self, key) is not None:
                _positive(f"{prefix}.{key}", getattr(self, key))
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

    def validate(self, k: int) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``experts``; cluster ids
        must be below ``k`` (``clustering.k``)."""

        _choice("experts.objective", self.objective, OBJECTIVE_NAMES)
        _choice("experts.schedule", self.schedule, SCHEDULE_NAMES)
        _choice("experts.model", self.model, tuple(DIT_SIZES))
        for i, cid in enumerate(self.ddpm_clusters):
            if not 0 <= cid < k:
                raise ConfigError(f"experts.ddpm_clusters[{i}]={cid}: cluster id outside "
                                  f"0..{k - 1} (clustering.k={k})")
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
class RouterConfig:
    """The router r(x_t, t) -> p(k | x_t, t), trained on cluster labels only."""

    model: str = "router-T"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(caption_dropout=0.0))
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``router``."""

        _choice("router.model", self.model, tuple(ROUTER_SIZES))
        self.train.validate("router.train")
        self.resources.validate("router.resources")
        self.data.validate("router.data")


@dataclass
class ConversionConfig:
    """The DDPM -> velocity conversion near t = 1: the fields of ``diffusion.Safeguards``
    (documented there, formulas in ``diffusion.convert``); the defaults are the library's."""

    clamp_tau: bool = True  # keep tau inside the schedule's [0, T] (its end is an edge)
    min_one_minus_t: float = 5e-2  # eps experts' edge: never divide by 1 - t below this
    x0_clamp: Optional[float] = None  # clamp x0_hat to [-c, c] (data range), None = off
    beyond_edge: str = "shrink"  # shrink (to the expert's data mean) | divide (the old scheme)

    def validate(self) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``sampling.conversion``."""

        _choice("sampling.conversion.beyond_edge", self.beyond_edge, BEYOND_EDGE)
        if not 0 < self.min_one_minus_t < 1:
            raise ConfigError(f"sampling.conversion.min_one_minus_t={self.min_one_minus_t!r}: "
                              "must be in (0, 1)")
        if self.x0_clamp is not None:
            _positive("sampling.conversion.x0_clamp", self.x0_clamp)


@dataclass
class SamplingConfig:
    """ODE sampling in flow-matching time and routing of the mixture."""

    steps: int = 50
    sampler: str = "euler"  # euler | heun
    time_shift: float = 1.0
    guidance_scale: float = 1.0
    routing: str = "topk"  # full | top1 | topk | threshold
    k: int = 2
    threshold: Optional[float] = None
    batch_size: int = 64
    seed: int = 0
    mixed_precision: str = "bf16"  # bf16 autocast of the network calls on GPU; ignored on CPU
    conversion: ConversionConfig = field(default_factory=ConversionConfig)

    def validate(self, k: int) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``sampling``; top-k must be
        in 1..``k`` (``clustering.k``)."""

        _positive("sampling.steps", self.steps)
        _choice("sampling.sampler", self.sampler, SAMPLERS)
        _positive("sampling.time_shift", self.time_shift)
        _positive("sampling.guidance_scale", self.guidance_scale, strict=False)
        _positive("sampling.batch_size", self.batch_size)
        _choice("sampling.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_routing(self.routing, self.k, self.threshold, k)
        self.conversion.validate()


@dataclass
class EvaluationResources:
    """What the main job's evaluation task asks Ray for (it runs on the GPU when given one)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    accelerator_type: Optional[str] = None
    custom: Dict[str, float] = field(default_factory=dict)
    label_selector: Dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        """One-line :class:`ConfigError` on a bad ``evaluation.resources`` value."""
        _positive("evaluation.resources.num_cpus", self.num_cpus, strict=False)
        _positive("evaluation.resources.num_gpus", self.num_gpus, strict=False)
        for name, amount in self.custom.items():
            _positive(f"evaluation.resources.custom.{name}", amount, strict=False)


@dataclass
class EvaluationConfig:
    """How mixtures are judged."""

    num_samples: int = 500
    fid_extractor: str = "clip"  # clip | inception | dinov2
    extractor_arch: Optional[str] = None  # open_clip / timm architecture of the extractor
    extractor_weights: Optional[str] = None  # local file (or open_clip tag)
    clip_arch: Optional[str] = None
    clip_weights: Optional[str] = None
    baseline_ddpm_clusters: Optional[List[int]] = None  # evaluate this mixture too
    enabled: bool = True
    resources: EvaluationResources = field(default_factory=EvaluationResources)

    def validate(self, k: int) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``evaluation``; cluster ids
        must be below ``k`` (``clustering.k``)."""

        _positive("evaluation.num_samples", self.num_samples)
        _choice("evaluation.fid_extractor", self.fid_extractor, EXTRACTOR_KINDS)
        self.resources.validate()
        for i, cid in enumerate(self.baseline_ddpm_clusters or []):
            if not 0 <= cid < k:
                raise ConfigError(f"evaluation.baseline_ddpm_clusters[{i}]={cid}: cluster id "
                                  f"outside 0..{k - 1}")


@dataclass
class TrackingConfig:
    """MLflow: None = ``sqlite:///<root>/mlflow.db``."""

    uri: Optional[str] = None
    experiment: str = "hdd_ray"
    enabled: bool = True

    def validate(self) -> None:
        """One-line :class:`ConfigError` on a bad ``tracking`` value."""
        check_safe_name("tracking.experiment", self.experiment)


@dataclass
class RayConfig:
    """How jobs reach Ray: None = join RAY_ADDRESS if set, else start a local instance."""

    address: Optional[str] = None
    num_cpus: Optional[int] = None
    max_concurrent_experts: int = 0  # 0 = all at once
    # how each run executes: "train" = a Ray Train TorchTrainer (worker group, DDP, drain
    # checkpoints); "task" = one Ray task on a reused worker process (runs of one worker only)
    executor: str = "train"

    def validate(self) -> None:
        """One-line :class:`ConfigError` on a bad ``ray`` value."""
        _positive("ray.max_concurrent_experts", self.max_concurrent_experts, strict=False)
        _choice("ray.executor", self.executor, EXECUTORS)


@dataclass
class AshaConfig:
    """Early stopping of sweep trials: FID on a growing number of samples (ASHA rungs)."""

    sample_counts: List[int] = field(default_factory=list)  # rungs, e.g. [256, 1024]; [] = N only
    reduction_factor: int = 2

    def validate(self) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``sweep.asha``."""
        counts = self.sample_counts
        for i, n in enumerate(counts):
            _positive(f"sweep.asha.sample_counts[{i}]", n)
        if list(counts) != sorted(set(counts)):
            raise ConfigError(
                f"sweep.asha.sample_counts={list(counts)}: must be strictly increasing")
        if self.reduction_factor < 2:
            raise ConfigError(
                f"sweep.asha.reduction_factor={self.reduction_factor}: must be >= 2")


@dataclass
class SweepConfig:
    """A Ray Tune sweep over objective assignments (which clusters use ``ddpm_eps``) and sampling.

    ``mode``: ``grid`` = every one of the 2^K assignments, ``n_ddpm`` = the assignments with
    exactly n DDPM experts for each n in ``n_ddpm``, ``list`` = the ``assignments`` given
    (strings like ``"D F F D"``), ``random`` / ``optuna`` = ``num_samples`` trials drawn by Tune's
    random search / OptunaSearch (from the ``n_ddpm`` assignments when set, else per cluster).
    The other lists are crossed with the assignments (grid modes) or sampled (search modes);
    left unset they hold the campaign's own value.
    """

    name: str = "objectives"
    mode: str = "n_ddpm"  # grid | n_ddpm | list | random | optuna
    n_ddpm: Optional[List[int]] = field(default_factory=lambda: [0, 1])
    assignments: List[str] = field(default_factory=list)  # mode=list: "D F F D F F F F", ...
    num_samples: int = 8  # trials of random / optuna
    # the lists below: None = the campaign's own value (sampling.*, experts.schedule)
    routing: Optional[List[str]] = None
    k: Optional[List[int]] = None
    guidance: Optional[List[float]] = None
    steps: Optional[List[int]] = None
    schedule: Optional[List[str]] = None  # VP schedule of the ddpm_eps experts
    max_concurrent_trials: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # > 0: each trial samples and scores its mixture on its GPU
    asha: AshaConfig = field(default_factory=AshaConfig)
    seed: int = 0

    def validate(self, k: int) -> None:
        """One-line :class:`ConfigError` on the first bad value of the search space; ``k`` is
        ``clustering.k`` (assignments have one objective per cluster)."""

        check_safe_name("sweep.name", self.name)
        _choice("sweep.mode", self.mode, SWEEP_MODES)
        if self.mode == "n_ddpm" and not self.n_ddpm:
            raise ConfigError(
                f"sweep.n_ddpm={self.n_ddpm!r}: required (non-empty) for sweep.mode='n_ddpm'")
        for i, n in enumerate(self.n_ddpm or []):
            if not 0 <= n <= k:
                raise ConfigError(f"sweep.n_ddpm[{i}]={n}: number of DDPM experts must be in "
                                  f"0..{k} (clustering.k={k})")
        if self.mode == "list" and not self.assignments:
            raise ConfigError("sweep.assignments=[]: required (non-empty) for sweep.mode='list'")
        for i, text in enumerate(self.assignments):
            parse_assignment(text, k, f"sweep.assignments[{i}]")
        _positive("sweep.num_samples", self.num_samples)
        for key in ("routing", "k", "guidance", "steps", "schedule"):
            if getattr(self, key) is not None and not getattr(self, key):
                raise ConfigError(f"sweep.{key}=[]: must list at least one value (or be unset)")
        for i, r in enumerate(self.routing or []):
            _choice(f"sweep.routing[{i}]", r, STRATEGIES)
        for i, top in enumerate(self.k or []):
            if not 1 <= top <= k:
                raise ConfigError(f"sweep.k[{i}]={top}: top-k must be in 1..{k} (clustering.k={k})")
        for i, g in enumerate(self.guidance or []):
            _positive(f"sweep.guidance[{i}]", g, strict=False)
        for i, st in enumerate(self.steps or []):
            _positive(f"sweep.steps[{i}]", st)
        for i, sc in enumerate(self.schedule or []):
            _choice(f"sweep.schedule[{i}]", sc, SCHEDULE_NAMES)
        _positive("sweep.max_concurrent_trials", self.max_concurrent_trials)
        _positive("sweep.cpus_per_trial", self.cpus_per_trial, strict=False)
        _positive("sweep.gpus_per_trial", self.gpus_per_trial, strict=False)
        self.asha.validate()


@dataclass
class CampaignConfig:
    """A whole campaign: one storage root that every stage reads and writes."""

    name: str = "demo"
    root: str = "runs/demo"
    seed: int = 0
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    latents: LatentsConfig = field(default_factory=LatentsConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


# --------------------------------------------------------------------------- resolved experts


@dataclass(frozen=True)
class ResolvedExpert:
    """A fully specified expert: what determines its weights, plus where it runs."""

    index: int
    cluster: int
    objective: str
    schedule: Optional[str]  # None for fm_velocity
    model: str
    text: Dict[str, Any]
    train: Dict[str, Any]
    resources: Dict[str, Any]



def resolve_experts(cfg: CampaignConfig | DictConfig) -> List[ResolvedExpert]:
    """Expand ``experts`` into one fully specified expert per cluster, in cluster order."""
    ex = cfg.experts
    k = int(cfg.clustering.k)
    overrides = {int(s.cluster): s for s in ex.list}
    out = []
    for c in range(k):
        o = overrides.get(c)
        objective = (o.objective if o and o.objective else None) or (
            "ddpm_eps" if c in set(ex.ddpm_clusters) else ex.objective
        )
        schedule = (o.schedule if o and o.schedule else None) or ex.schedule
        train = _plain(ex.train)
        for key in ("steps", "batch_size", "lr"):
            if o is not None and getattr(o, key) is not None:
                train[key] = getattr(o, key)
        resources = _plain(ex.resources)
        if o is not None and o.resources is not None:
            resources = _plain(merge_resources(ex.resources, o.resources))
        out.append(
            ResolvedExpert(
                index=c,
                cluster=c,
                objective=objective,
                schedule=schedule if objective.startswith("ddpm") else None,
                model=(o.model if o and o.model else None) or ex.model,
                text=_plain(ex.text),
                train=train,
                resources=resources,
            )
        )
    return out


def _plain(node: Any) -> Dict[str, Any]:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    if dataclasses.is_dataclass(node):
        return dataclasses.asdict(node)
    return dict(node)


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None, overrides: List[str] | None = None
) -> CampaignConfig:
    """Load a campaign: schema <- YAML file (demo when None) <- ``key=value`` overrides.

    Returns a validated :class:`CampaignConfig` object (plain dataclasses, not a DictConfig).
    Raises :class:`ConfigError` with a one-line message on any problem.
    """
    path = Path(path) if path is not None else DEMO_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    schema = OmegaConf.structured(CampaignConfig)
    try:
        file_cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml errors are multi-line; keep the first line
        raise ConfigError(f"config file {path} is not valid YAML: {_first_line(exc)}") from None
    merged = _merge(schema, file_cfg, f"config file {path}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            dot = OmegaConf.from_dotlist([item])
        except Exception as exc:
            raise ConfigError(f"override {item!r} cannot be parsed: {_first_line(exc)}") from None
        merged = _merge(merged, dot, f"override {item!r}")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _from_omegaconf(exc, "config") from None
    validate(cfg)  # type: ignore[arg-type]
    return cfg  # type: ignore[return-value]


def _merge(base: DictConfig, other: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _from_omegaconf(exc, where) from None


def _from_omegaconf(exc: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = _first_line(exc)
    if type(exc).__name__ == "ConfigKeyError" or ("Key '" in msg and "not in" in msg):
        return ConfigError(f"{key}: unknown key (from {where})")
    expected = _expected_type(key)
    value = getattr(exc, "value", None)
    if expected and value is not None:
        return ConfigError(f"{key}={value!r}: wrong type, expected {expected} (from {where})")
    return ConfigError(f"{key}: {_first_line(getattr(exc, 'msg', msg))} (from {where})")


def _expected_type(key: str) -> str | None:
    """The schema's type of a dotted key path, as a readable name (None if unknown)."""
    import re
    import typing

    node: Any = CampaignConfig
    for part in re.sub(r"\[\d+\]", "", key).split("."):
        if not dataclasses.is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = hints[part]
        while typing.get_origin(node) in (typing.Union, list, List):
            args = [a for a in typing.get_args(node) if a is not type(None)]
            node = args[0] if args else None
            if "[" in key and typing.get_origin(node) is None:
                break
    return getattr(node, "__name__", None) or (str(node) if node else None)


def _first_line(exc: Any) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def to_yaml(cfg: CampaignConfig) -> str:
    """The config as YAML (what a job logs and stores beside its outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain nested dict of a config section."""
    return _plain(cfg)


# --------------------------------------------------------------------------- validation


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: unknown value, allowed: {', '.join(allowed)}")


#: a name that becomes one path segment (sweep, campaign, MLflow experiment): letters, digits,
#: ``.``, ``_``, ``-``, not starting with ``.`` (so never ``.``, ``..`` or a hidden file)
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def check_safe_name(key: str, value: Any) -> None:
    """One-line :class:`ConfigError` unless ``value`` is a single safe path segment.

    Names that become paths or MLflow filter values (``sweep.name``, ``name``,
    ``tracking.experiment``) may hold only letters, digits, ``.``, ``_`` and ``-``, must not
    start with ``.`` and must not be empty: no ``/``, ``\\``, ``..``, quotes or control
    characters, so ``<root>/sweeps/<name>`` can never point outside ``<root>/sweeps``.
    """
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or len(value) > 128:
        raise ConfigError(f"{key}={value!r}: must be a single safe name (letters, digits, '.', "
                          "'_', '-'; not starting with '.'; at most 128 characters)")


def _is_int(value: Any) -> bool:
    """``value`` is an integer (``bool`` is not, though Python calls it one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(key: str, value: Any, strict: bool = True) -> None:
    if value is None or (value <= 0 if strict else value < 0):
        want = "> 0" if strict else ">= 0"
        raise ConfigError(f"{key}={value!r}: must be {want}")


def _fraction(key: str, value: float, lo_open: bool = False, hi_open: bool = True) -> None:
    lo_ok = value > 0 if lo_open else value >= 0
    hi_ok = value < 1 if hi_open else value <= 1
    if not (lo_ok and hi_ok):
        rng = ("(" if lo_open else "[") + "0, 1" + (")" if hi_open else "]")
        raise ConfigError(f"{key}={value!r}: must be in {rng}")


def merge_resources(base: Any, override: Any, prefix: str = "experts.list[].resources") -> Any:
    """``base`` (a ``ResourcesConfig`` node) with the keys of ``override`` replaced.

    Nested maps (``custom``, ``label_selector``) are merged key by key. An unknown key or a value
    of the wrong type raises :class:`ConfigError` naming ``prefix``.
    """
    override = _plain(override) if not isinstance(override, dict) else override
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
            f"{prefix}.{key}={value!r}: {_first_line(getattr(exc, 'msg', exc))}"
        ) from None
    return merged


def validate(cfg: CampaignConfig) -> None:
    """Check values the types cannot express; raise :class:`ConfigError` on the first problem.

    Each section checks itself (its ``validate``); what spans sections is checked here.
    """
    if not str(cfg.root).strip():
        raise ConfigError("root='': must be a local path or a s3:// / gs:// URI")
    check_safe_name("name", cfg.name)
    k = cfg.clustering.k
    cfg.corpus.validate()
    cfg.clustering.validate()
    cfg.latents.validate()
    cfg.experts.validate(k)
    cfg.router.validate()
    for e in resolve_experts(cfg):
        check_global_batch(f"experts (cluster {e.cluster})", e.train["batch_size"],
                      e.resources["num_workers"])
        if int(e.train.get("warmup_steps", 0)) >= int(e.train["steps"]):  # a per-expert steps
            raise ConfigError(
                f"experts (cluster {e.cluster}): train.warmup_steps={e.train['warmup_steps']} "
                f"must be below its train.steps={e.train['steps']}")
    check_global_batch("router", cfg.router.train.batch_size, cfg.router.resources.num_workers)
    cfg.sampling.validate(k)
    cfg.evaluation.validate(k)
    cfg.tracking.validate()
    cfg.ray.validate()
    if cfg.ray.executor == "task":
        for key, workers in (("experts", max((e.resources["num_workers"]
                                              for e in resolve_experts(cfg)), default=1)),
                             ("router", cfg.router.resources.num_workers)):
            if workers != 1:
                raise ConfigError(
                    f"{key}.resources.num_workers={workers}: ray.executor=task runs each run as "
                    "one Ray task (one worker); use ray.executor=train for more")
    validate_sweep(cfg)


def check_global_batch(what: str, batch_size: int, num_workers: int) -> None:
    """``train.batch_size`` is global (summed over a run's workers): it must split evenly over
    them. One-line :class:`ConfigError` naming ``what`` (an expert, the router) otherwise."""
    if num_workers > 1 and batch_size % num_workers:
        raise ConfigError(
            f"{what}: train.batch_size={batch_size} is the global batch and must split evenly "
            f"over resources.num_workers={num_workers}: make it a multiple of {num_workers}")


def validate_sweep(cfg: CampaignConfig) -> None:
    """Check the sweep's search space (one-line :class:`ConfigError` on the first problem).

    ``sweep.mode=optuna`` needs the ``optuna`` package (a main dependency; an environment built
    without it fails here, before any training, naming the install command).
    """
    cfg.sweep.validate(cfg.clustering.k)
    if cfg.sweep.mode == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise ConfigError("sweep.mode=optuna needs the optuna package: "
                              "pip install 'optuna>=3.6' (or pip install -e .)")
    if "threshold" in (cfg.sweep.routing or []) and cfg.sampling.threshold is None:
        raise ConfigError("sampling.threshold=None: required when sweep.routing has 'threshold'")


def describe_options() -> str:
    """Every option with its default, for ``--help`` of the jobs."""
    lines = []

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                lines.append(f"  {key} = {value!r}")

    walk(CampaignConfig(), "")
    return "\n".join(lines)
