"""The sections of using a campaign's experts: ``sampling`` (with the DDPM -> velocity
``conversion``) and ``evaluation``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional  # noqa: UP035 - OmegaConf needs typing generics

from hdd_ray.choices import BEYOND_EDGE, EXTRACTOR_KINDS, ROUTERS, SAMPLERS, check_routing
from hdd_ray.config.rules import check_choice, check_positive
from hdd_ray.config.training import MIXED_PRECISION
from hdd_ray.errors import ConfigError


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
        check_choice("sampling.conversion.beyond_edge", self.beyond_edge, BEYOND_EDGE)
        if not 0 < self.min_one_minus_t < 1:
            raise ConfigError(f"sampling.conversion.min_one_minus_t={self.min_one_minus_t!r}: "
                              "must be in (0, 1)")
        if self.x0_clamp is not None:
            check_positive("sampling.conversion.x0_clamp", self.x0_clamp)


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
    # learned (the trained router on x_t, t) | centroid (training-free, on the prompt: the
    # clusters' CLIP centroids, weights softmax(-d^2 / centroid_temperature); hdd_ray.routing)
    router: str = "learned"
    centroid_temperature: float = 0.05

    def validate(self, k: int) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``sampling``; top-k must be
        in 1..``k`` (``clustering.k``)."""
        check_positive("sampling.steps", self.steps)
        check_choice("sampling.sampler", self.sampler, SAMPLERS)
        check_positive("sampling.time_shift", self.time_shift)
        check_positive("sampling.guidance_scale", self.guidance_scale, strict=False)
        check_positive("sampling.batch_size", self.batch_size)
        check_choice("sampling.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_routing(self.routing, self.k, self.threshold, k)
        check_choice("sampling.router", self.router, ROUTERS)
        check_positive("sampling.centroid_temperature", self.centroid_temperature)
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
        check_positive("evaluation.resources.num_cpus", self.num_cpus, strict=False)
        check_positive("evaluation.resources.num_gpus", self.num_gpus, strict=False)
        for name, amount in self.custom.items():
            check_positive(f"evaluation.resources.custom.{name}", amount, strict=False)


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
        check_positive("evaluation.num_samples", self.num_samples)
        check_choice("evaluation.fid_extractor", self.fid_extractor, EXTRACTOR_KINDS)
        self.resources.validate()
        for i, cid in enumerate(self.baseline_ddpm_clusters or []):
            if not 0 <= cid < k:
                raise ConfigError(f"evaluation.baseline_ddpm_clusters[{i}]={cid}: cluster id "
                                  f"outside 0..{k - 1}")
