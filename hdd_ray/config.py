"""Typed campaign configuration: OmegaConf structured dataclasses, YAML + dotlist, validation.

A campaign is described by one :class:`CampaignConfig`. It is loaded from a YAML file (the
demo campaign ``jobs/configs/demo.yaml`` when none is given), overridden from the command line
with ``key=value`` items (``experts.train.steps=2000``, ``experts.ddpm_clusters=[0,3]``) and
validated before anything else runs. Every problem raises :class:`ConfigError` with one line
that names the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional  # noqa: UP035 - OmegaConf needs typing generics

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hdd_ray.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "jobs" / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"

OBJECTIVES = ("ddpm_eps", "fm_velocity")
SCHEDULES = ("linear", "cosine")
SAMPLERS = ("euler", "heun")
ROUTING_STRATEGIES = ("full", "top1", "topk", "threshold")
EMBEDDERS = ("pixels", "dinov2", "open_clip")
TEXT_ENCODERS = ("learned", "open_clip")
CORPUS_SOURCES = ("demo", "webdataset")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")
MIXED_PRECISION = ("no", "bf16")
FID_EXTRACTORS = ("clip", "inception", "dinov2")
SWEEP_MODES = ("grid", "n_ddpm", "list", "random", "optuna")
#: letters of an objective assignment string ("D F F D"): cluster uses ddpm_eps / the base
ASSIGNMENT_LETTERS = {"D": "ddpm_eps", "F": "fm_velocity"}


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


@dataclass
class TrainConfig:
    """Optimisation settings shared by experts and the router."""

    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-4
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


@dataclass
class ExpertsConfig:
    """One expert per cluster. ``ddpm_clusters`` train ``ddpm_eps``, the rest ``objective``."""

    objective: str = "fm_velocity"
    ddpm_clusters: List[int] = field(default_factory=list)
    schedule: str = "linear"  # VP schedule of ddpm_eps experts
    model: str = "DiT-T/2"
    text: TextConfig = field(default_factory=TextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    list: List[ExpertSpec] = field(default_factory=list)


@dataclass
class RouterConfig:
    """The router r(x_t, t) -> p(k | x_t, t), trained on cluster labels only."""

    model: str = "router-T"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(caption_dropout=0.0))
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


@dataclass
class ConversionConfig:
    """Safeguards of the DDPM -> velocity conversion near t = 1 (see ``diffusion.convert``)."""

    clamp_tau: bool = True  # clamp tau* to the schedule's [0, T]
    min_one_minus_t: float = 1e-3  # bound 1 - t away from 0 in v = (eps - x_t) / (1 - t)
    x0_clamp: Optional[float] = None  # clamp x0_hat to [-c, c] (data range), None = off


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
    conversion: ConversionConfig = field(default_factory=ConversionConfig)


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


@dataclass
class TrackingConfig:
    """MLflow: None = ``sqlite:///<root>/mlflow.db``."""

    uri: Optional[str] = None
    experiment: str = "hdd_ray"
    enabled: bool = True


@dataclass
class RayConfig:
    """How jobs reach Ray: None = join RAY_ADDRESS if set, else start a local instance."""

    address: Optional[str] = None
    num_cpus: Optional[int] = None
    max_concurrent_experts: int = 0  # 0 = all at once


@dataclass
class AshaConfig:
    """Early stopping of sweep trials: FID on a growing number of samples (ASHA rungs)."""

    sample_counts: List[int] = field(default_factory=list)  # rungs, e.g. [256, 1024]; [] = N only
    reduction_factor: int = 2


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
    asha: AshaConfig = field(default_factory=AshaConfig)
    seed: int = 0


@dataclass
class CampaignConfig:
    """A whole campaign: one storage root that every stage reads and writes."""

    name: str = "demo"
    root: str = "runs/demo"
    seed: int = 0
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
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

    def identity(self, data_hash: str, image_size: int, channels: int) -> Dict[str, Any]:
        """Everything that determines the expert's weights (resources excluded)."""
        train = {k: v for k, v in self.train.items() if k not in ("checkpoint_every", "compile")}
        return {
            "cluster": self.cluster,
            "objective": self.objective,
            "schedule": self.schedule,
            "model": self.model,
            "text": self.text,
            "train": train,
            "data_hash": data_hash,
            "image_size": image_size,
            "channels": channels,
        }

    def expert_id(self, data_hash: str, image_size: int, channels: int) -> str:
        """Deterministic id: readable prefix + hash of :meth:`identity`."""
        blob = json.dumps(self.identity(data_hash, image_size, channels), sort_keys=True)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
        tag = "ddpm" if self.objective == "ddpm_eps" else "fm"
        return f"c{self.cluster}-{tag}-{digest}"


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


def _validate_train(prefix: str, t: TrainConfig) -> None:
    for key in ("steps", "batch_size", "lr", "grad_accum", "checkpoint_every"):
        _positive(f"{prefix}.{key}", getattr(t, key))
    _positive(f"{prefix}.weight_decay", t.weight_decay, strict=False)
    _positive(f"{prefix}.grad_clip", t.grad_clip, strict=False)
    _fraction(f"{prefix}.ema_decay", t.ema_decay)
    _fraction(f"{prefix}.caption_dropout", t.caption_dropout)
    _choice(f"{prefix}.timestep_sampling", t.timestep_sampling, TIMESTEP_SAMPLING)
    _choice(f"{prefix}.mixed_precision", t.mixed_precision, MIXED_PRECISION)


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


def _validate_resources(prefix: str, r: ResourcesConfig) -> None:
    _positive(f"{prefix}.num_workers", r.num_workers, strict=False)
    _positive(f"{prefix}.cpus_per_worker", r.cpus_per_worker, strict=False)
    _positive(f"{prefix}.gpus_per_worker", r.gpus_per_worker, strict=False)
    for name, amount in r.custom.items():
        _positive(f"{prefix}.custom.{name}", amount, strict=False)
    if r.max_failures < -1:
        raise ConfigError(f"{prefix}.max_failures={r.max_failures}: must be >= -1")


def validate(cfg: CampaignConfig) -> None:
    """Check values the types cannot express; raise :class:`ConfigError` on the first problem."""
    from hdd_ray.models import DIT_SIZES, ROUTER_SIZES  # lazy: keeps config import light

    if not str(cfg.root).strip():
        raise ConfigError("root='': must be a local path or a s3:// / gs:// URI")
    c = cfg.corpus
    _choice("corpus.source", c.source, CORPUS_SOURCES)
    if c.source == "webdataset" and not c.uri:
        raise ConfigError("corpus.uri=None: required when corpus.source='webdataset'")
    _positive("corpus.image_size", c.image_size)
    if c.channels not in (1, 3):
        raise ConfigError(f"corpus.channels={c.channels!r}: allowed: 1, 3")
    _positive("corpus.shard_size", c.shard_size)

    cl = cfg.clustering
    _positive("clustering.k", cl.k)
    _choice("clustering.embedder", cl.embedder, EMBEDDERS)
    if cl.embedder != "pixels" and not cl.embedder_arch:
        raise ConfigError(
            f"clustering.embedder_arch=None: required for clustering.embedder={cl.embedder!r}"
        )
    for key in ("pixel_size", "fine_centroids", "fit_sample_cap", "kmeans_iters", "batch_size",
                "num_actors"):
        _positive(f"clustering.{key}", getattr(cl, key))
    if cl.fine_centroids < cl.k:
        raise ConfigError(
            f"clustering.fine_centroids={cl.fine_centroids}: must be >= clustering.k={cl.k}"
        )
    if cl.balance_cap is not None:
        _positive("clustering.balance_cap", cl.balance_cap)
    if cl.embedder_image_size is not None:
        _positive("clustering.embedder_image_size", cl.embedder_image_size)
    _fraction("clustering.heldout_fraction", cl.heldout_fraction)
    _positive("clustering.gpus_per_actor", cl.gpus_per_actor, strict=False)

    ex = cfg.experts
    k = cl.k
    _choice("experts.objective", ex.objective, OBJECTIVES)
    _choice("experts.schedule", ex.schedule, SCHEDULES)
    _choice("experts.model", ex.model, tuple(DIT_SIZES))
    for i, cid in enumerate(ex.ddpm_clusters):
        if not 0 <= cid < k:
            raise ConfigError(
                f"experts.ddpm_clusters[{i}]={cid}: cluster id outside 0..{k - 1} (clustering.k={k})"
            )
    t = ex.text
    _choice("experts.text.encoder", t.encoder, TEXT_ENCODERS)
    if t.encoder == "open_clip" and not t.arch:
        raise ConfigError("experts.text.arch=None: required for experts.text.encoder='open_clip'")
    for key in ("dim", "depth", "vocab_size", "max_len"):
        _positive(f"experts.text.{key}", getattr(t, key))
    _validate_train("experts.train", ex.train)
    _validate_resources("experts.resources", ex.resources)
    seen: set[int] = set()
    for i, spec in enumerate(ex.list):
        p = f"experts.list[{i}]"
        if not 0 <= spec.cluster < k:
            raise ConfigError(f"{p}.cluster={spec.cluster}: cluster id outside 0..{k - 1}")
        if spec.cluster in seen:
            raise ConfigError(f"{p}.cluster={spec.cluster}: listed twice")
        seen.add(spec.cluster)
        if spec.objective is not None:
            _choice(f"{p}.objective", spec.objective, OBJECTIVES)
        if spec.schedule is not None:
            _choice(f"{p}.schedule", spec.schedule, SCHEDULES)
        if spec.model is not None:
            _choice(f"{p}.model", spec.model, tuple(DIT_SIZES))
        for key in ("steps", "batch_size", "lr"):
            if getattr(spec, key) is not None:
                _positive(f"{p}.{key}", getattr(spec, key))
        if spec.resources is not None:
            merged = merge_resources(cfg.experts.resources, spec.resources, f"{p}.resources")
            _validate_resources(f"{p}.resources", merged)

    _choice("router.model", cfg.router.model, tuple(ROUTER_SIZES))
    _validate_train("router.train", cfg.router.train)
    _validate_resources("router.resources", cfg.router.resources)

    s = cfg.sampling
    _positive("sampling.steps", s.steps)
    _choice("sampling.sampler", s.sampler, SAMPLERS)
    _positive("sampling.time_shift", s.time_shift)
    _positive("sampling.guidance_scale", s.guidance_scale, strict=False)
    _choice("sampling.routing", s.routing, ROUTING_STRATEGIES)
    _positive("sampling.batch_size", s.batch_size)
    if not 1 <= s.k <= k:
        raise ConfigError(f"sampling.k={s.k}: top-k must be in 1..{k} (clustering.k={k})")
    if s.threshold is not None:
        _fraction("sampling.threshold", s.threshold, hi_open=False)
    if s.routing == "threshold" and s.threshold is None:
        raise ConfigError("sampling.threshold=None: required when sampling.routing='threshold'")
    cv = s.conversion
    if not 0 < cv.min_one_minus_t < 1:
        raise ConfigError(
            f"sampling.conversion.min_one_minus_t={cv.min_one_minus_t!r}: must be in (0, 1)"
        )
    if cv.x0_clamp is not None:
        _positive("sampling.conversion.x0_clamp", cv.x0_clamp)

    ev = cfg.evaluation
    _positive("evaluation.num_samples", ev.num_samples)
    _choice("evaluation.fid_extractor", ev.fid_extractor, FID_EXTRACTORS)
    for i, cid in enumerate(ev.baseline_ddpm_clusters or []):
        if not 0 <= cid < k:
            raise ConfigError(
                f"evaluation.baseline_ddpm_clusters[{i}]={cid}: cluster id outside 0..{k - 1}"
            )
    if not cfg.tracking.experiment:
        raise ConfigError("tracking.experiment='': must be a non-empty name")
    _positive("ray.max_concurrent_experts", cfg.ray.max_concurrent_experts, strict=False)
    validate_sweep(cfg)


def parse_assignment(text: str, k: int, key: str = "assignment") -> List[int]:
    """``"D F F D"`` (or ``"DFFD"``, or objective names) -> the clusters using ``ddpm_eps``.

    One letter (or objective name) per cluster: ``D`` = ``ddpm_eps``, ``F`` = ``fm_velocity``.
    Raises :class:`ConfigError` naming ``key`` on an unknown objective or a wrong length.
    """
    tokens = text.replace(",", " ").split()
    if len(tokens) == 1 and len(tokens[0]) > 1 and tokens[0] not in OBJECTIVES:
        tokens = list(tokens[0])
    names = {**ASSIGNMENT_LETTERS, **{o: o for o in OBJECTIVES}}
    for c, tok in enumerate(tokens):
        if tok not in names:
            raise ConfigError(f"{key}={text!r}: unknown objective {tok!r} for cluster {c}, "
                              "allowed: D (ddpm_eps), F (fm_velocity)")
    if len(tokens) != k:
        raise ConfigError(f"{key}={text!r}: {len(tokens)} objectives, expected one per cluster "
                          f"(clustering.k={k})")
    return [c for c, tok in enumerate(tokens) if names[tok] == "ddpm_eps"]


def validate_sweep(cfg: CampaignConfig) -> None:
    """Check the sweep's search space (one-line :class:`ConfigError` on the first problem)."""
    sw, k = cfg.sweep, cfg.clustering.k
    if not sw.name or "/" in sw.name:
        raise ConfigError(f"sweep.name={sw.name!r}: must be a non-empty name without '/'")
    _choice("sweep.mode", sw.mode, SWEEP_MODES)
    if sw.mode == "n_ddpm" and not sw.n_ddpm:
        raise ConfigError(f"sweep.n_ddpm={sw.n_ddpm!r}: required (non-empty) for sweep.mode='n_ddpm'")
    for i, n in enumerate(sw.n_ddpm or []):
        if not 0 <= n <= k:
            raise ConfigError(f"sweep.n_ddpm[{i}]={n}: number of DDPM experts must be in 0..{k} "
                              f"(clustering.k={k})")
    if sw.mode == "list" and not sw.assignments:
        raise ConfigError("sweep.assignments=[]: required (non-empty) for sweep.mode='list'")
    for i, text in enumerate(sw.assignments):
        parse_assignment(text, k, f"sweep.assignments[{i}]")
    _positive("sweep.num_samples", sw.num_samples)
    for key in ("routing", "k", "guidance", "steps", "schedule"):
        if getattr(sw, key) is not None and not getattr(sw, key):
            raise ConfigError(f"sweep.{key}=[]: must list at least one value (or be unset)")
    for i, r in enumerate(sw.routing or []):
        _choice(f"sweep.routing[{i}]", r, ROUTING_STRATEGIES)
    if "threshold" in (sw.routing or []) and cfg.sampling.threshold is None:
        raise ConfigError("sampling.threshold=None: required when sweep.routing has 'threshold'")
    for i, top in enumerate(sw.k or []):
        if not 1 <= top <= k:
            raise ConfigError(f"sweep.k[{i}]={top}: top-k must be in 1..{k} (clustering.k={k})")
    for i, g in enumerate(sw.guidance or []):
        _positive(f"sweep.guidance[{i}]", g, strict=False)
    for i, st in enumerate(sw.steps or []):
        _positive(f"sweep.steps[{i}]", st)
    for i, sc in enumerate(sw.schedule or []):
        _choice(f"sweep.schedule[{i}]", sc, SCHEDULES)
    _positive("sweep.max_concurrent_trials", sw.max_concurrent_trials)
    _positive("sweep.cpus_per_trial", sw.cpus_per_trial, strict=False)
    counts = sw.asha.sample_counts
    for i, n in enumerate(counts):
        _positive(f"sweep.asha.sample_counts[{i}]", n)
    if list(counts) != sorted(set(counts)):
        raise ConfigError(f"sweep.asha.sample_counts={list(counts)}: must be strictly increasing")
    if sw.asha.reduction_factor < 2:
        raise ConfigError(f"sweep.asha.reduction_factor={sw.asha.reduction_factor}: must be >= 2")


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
