"""What one training run's workers are told: :class:`RunSettings`, typed and picklable.

The launcher builds one per run (:mod:`hdd_ray.training.jobs`) from the campaign config and the
manifest; Ray pickles it to the run's workers (a Ray Train worker group or one Ray task), where
:func:`hdd_ray.training.loop.run_loop` reads it. Every field is a plain value or one of the
config's dataclasses, so nothing on a worker needs the whole campaign config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hdd_ray.config import DataConfig, ResolvedExpert, TrainConfig
from hdd_ray.samples import Decoding
from hdd_ray.training.data import BatchSource, Shard, data_settings, open_source

__all__ = ["RunSettings"]


@dataclass(frozen=True)
class RunSettings:
    """One run (an expert, the router or a distilled student) as its workers train it."""

    kind: str  # "expert" | "router" | "student"
    train: TrainConfig
    image_size: int  # the model's input: the latent shape in latent space
    channels: int
    data: DataConfig = field(default_factory=DataConfig)  # how the workers read their data
    # the manifest's latents record (VAE identity, shape, scaling): the shards hold
    # ``latent.npy`` members instead of images; None in pixel space
    latents: dict[str, Any] | None = None
    # the manifest's text_features record (hdd_ray.models.text_features): an expert with a
    # frozen text tower reads its captions' stored features and never runs the tower; None:
    # the captions themselves
    text_features: dict[str, Any] | None = None
    use_gpu: bool = False
    torch_threads: int = 1
    # the memory plan's budget (resources.gpu_memory_gb, GB; None = the device's own) and the
    # share of a GPU each worker gets (hdd_ray.training.memory.worker_plan)
    gpu_memory_gb: float | None = None
    gpus_per_worker: float = 0.0
    # an expert (a student: its network, cluster -1): what it is, its cluster's shards and
    # their sample count
    expert: ResolvedExpert | None = None
    shards: list[str] = field(default_factory=list)
    num_samples: int | None = None
    # the router (and a student): its size, and every cluster's shards and sample count
    router_model: str = ""
    num_clusters: int = 0
    cluster_shards: dict[int, list[str]] = field(default_factory=dict)
    cluster_counts: dict[int, int] | None = None
    # set by the launcher for each launch: where rank 0 logs metrics
    # (:class:`hdd_ray.tracking.MetricBuffer`'s target) and the run's directory
    tracking: dict[str, Any] | None = None
    run_directory: str | None = None
    # where a new run starts (hdd_ray.campaign.starts, resolved by the launcher): ``init``
    # ({"path", "format", "sha256"} or None), ``mode``, ``network`` (what the network predicts)
    # and ``conversion`` (the loss's conversion settings); the router's: ``init`` only.
    # None: from scratch, the objective's own network
    start: dict[str, Any] | None = None
    # a student (hdd_ray.training.distill): ``data_weight`` and ``teacher``, the mixture it
    # learns from (hdd_ray.training.distill.campaign_teacher or folder_teacher; None for the monolith baseline)
    distill: dict[str, Any] | None = None

    def open_data(self, shards: list[Shard], num_samples: int | None, rank: int = 0,
                  world: int = 1, pin_memory: bool = False,
                  stored_text: bool = False) -> BatchSource:
        """The run's data source over ``shards`` (``(path, cluster)`` pairs), decoded to its
        input (pixels, or latents at their stored width), for ``rank`` of ``world``;
        ``stored_text``: conditioned on the captions' stored features when the run has them
        (:attr:`text_features`), else on the captions."""
        latents = self.latents or {}
        text = (self.text_features or {}) if stored_text else {}
        how = Decoding(self.image_size, self.channels, bool(latents),
                       latent_bytes=4 if latents.get("dtype") == "bfloat16" else 2,
                       text_length=int(text.get("context_length", 0)),
                       text_width=int(text.get("width", 0)))
        return open_source(shards, how, self.data, int(self.train.seed), rank, world,
                           num_samples, pin_memory)

    def every_cluster(self) -> tuple[list[Shard], int | None]:
        """Every cluster's shards as ``(path, cluster)`` pairs, and their sample count (None when
        not recorded): the data of the router and of a student."""
        shards = [(p, c) for c in range(self.num_clusters)
                  for p in self.cluster_shards.get(c) or []]
        counts = self.cluster_counts
        return shards, sum(int(n) for n in counts.values()) if counts else None

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> RunSettings:
        """Settings from their plain-dict form (scripts and tests that build a run by hand):
        the field names as keys, ``expert`` and ``train`` as dicts (``dataclasses.asdict``),
        ``model`` for the router's size; missing keys keep their defaults."""
        expert = config.get("expert")
        shards = config.get("cluster_shards") or {}
        counts = config.get("cluster_counts")
        return cls(
            kind=str(config.get("kind") or ("expert" if expert else "router")),
            train=TrainConfig(**dict(config.get("train") or {})),
            image_size=int(config["image_size"]), channels=int(config["channels"]),
            data=data_settings(config.get("data")), latents=config.get("latents") or None,
            text_features=config.get("text_features") or None,
            use_gpu=bool(config.get("use_gpu", False)),
            torch_threads=int(config.get("torch_threads", 1)),
            gpu_memory_gb=config.get("gpu_memory_gb"),
            gpus_per_worker=float(config.get("gpus_per_worker", 0.0) or 0.0),
            expert=ResolvedExpert(**expert) if expert else None,
            shards=list(config.get("shards") or []), num_samples=config.get("num_samples"),
            router_model=str(config.get("model") or ""),
            num_clusters=int(config.get("num_clusters") or 0),
            cluster_shards={int(c): list(p or []) for c, p in shards.items()},
            cluster_counts={int(c): int(n) for c, n in counts.items()} if counts else None,
            tracking=config.get("tracking"), run_directory=config.get("run_directory"),
            start=config.get("start") or None, distill=config.get("distill") or None,
        )
