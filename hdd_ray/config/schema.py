"""The whole campaign (:class:`CampaignConfig`, one field per section) and its experts, one
fully specified :class:`ResolvedExpert` per cluster."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional  # noqa: UP035 - OmegaConf needs typing generics

from omegaconf import DictConfig

from hdd_ray.config.data import ClusteringConfig, CorpusConfig, LatentsConfig
from hdd_ray.config.inference import EvaluationConfig, SamplingConfig
from hdd_ray.config.orchestration import RayConfig, SweepConfig, TrackingConfig
from hdd_ray.config.pretrained import resolve_init
from hdd_ray.config.rules import plain
from hdd_ray.config.training import (
    DistillConfig,
    ExpertsConfig,
    RouterConfig,
    merge_resources,
)


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
    distill: DistillConfig = field(default_factory=DistillConfig)


# --------------------------------------------------------------------------- resolved experts

#: the ``train`` keys an ``experts.list`` entry overrides
SPEC_TRAIN_KEYS = ("steps", "batch_size", "lr", "micro_batch_size", "activation_checkpointing")


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
    # where it starts (hdd_ray.campaign.starts resolves what that makes of it): the checkpoint
    # as configured (None: from scratch), the mode, the AdaLN variant, experts.network
    init: Optional[str] = None
    init_mode: str = "exact"
    adaln: str = "single"
    network: Optional[Dict[str, Any]] = None


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
        train = plain(ex.train)
        for key in SPEC_TRAIN_KEYS:
            if o is not None and getattr(o, key) is not None:
                train[key] = getattr(o, key)
        resources = plain(ex.resources)
        if o is not None and o.resources is not None:
            resources = plain(merge_resources(ex.resources, o.resources))
        init = o.init if o is not None and o.init is not None else ex.init
        out.append(
            ResolvedExpert(
                index=c,
                cluster=c,
                objective=objective,
                schedule=schedule if objective.startswith("ddpm") else None,
                model=(o.model if o and o.model else None) or ex.model,
                text=plain(ex.text),
                train=train,
                resources=resources,
                init=resolve_init(init),
                init_mode=ex.init_mode,
                adaln=ex.adaln,
                network=plain(ex.network),
            )
        )
    return out

