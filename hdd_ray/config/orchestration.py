"""The sections of running a campaign: ``tracking`` (MLflow), ``ray`` and ``sweep``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional  # noqa: UP035 - OmegaConf needs typing generics

from hdd_ray.choices import SCHEDULE_NAMES, STRATEGIES, parse_assignment
from hdd_ray.config.rules import check_choice, check_positive, check_safe_name
from hdd_ray.errors import ConfigError

#: how a run executes (``ray.executor``): a Ray Train TorchTrainer, or one Ray task
EXECUTORS = ("train", "task")
SWEEP_MODES = ("grid", "n_ddpm", "list", "random", "optuna")


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
        check_positive("ray.max_concurrent_experts", self.max_concurrent_experts, strict=False)
        check_choice("ray.executor", self.executor, EXECUTORS)


@dataclass
class AshaConfig:
    """Early stopping of sweep trials: FID on a growing number of samples (ASHA rungs)."""

    sample_counts: List[int] = field(default_factory=list)  # rungs, e.g. [256, 1024]; [] = N only
    reduction_factor: int = 2

    def validate(self) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``sweep.asha``."""
        counts = self.sample_counts
        for i, n in enumerate(counts):
            check_positive(f"sweep.asha.sample_counts[{i}]", n)
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
    # sets of clusters whose experts a mixture leaves out, searched like the lists above:
    # [[], [3]] = every expert, and every expert but cluster 3's (None = keep every expert)
    retire: Optional[List[List[int]]] = None
    max_concurrent_trials: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # > 0: each trial samples and scores its mixture on its GPU
    asha: AshaConfig = field(default_factory=AshaConfig)
    seed: int = 0
    # a registered model name: the best mixture is registered in MLflow's Model Registry and
    # the alias ``champion`` moves to it when its FID is lower (hdd_ray.registry)
    register_as: Optional[str] = None

    def validate(self, k: int) -> None:
        """One-line :class:`ConfigError` on the first bad value of the search space; ``k`` is
        ``clustering.k`` (assignments have one objective per cluster)."""
        check_safe_name("sweep.name", self.name)
        if self.register_as is not None:
            check_safe_name("sweep.register_as", self.register_as)
        check_choice("sweep.mode", self.mode, SWEEP_MODES)
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
        check_positive("sweep.num_samples", self.num_samples)
        for i, out in enumerate(self.retire or []):
            if any(not 0 <= c < k for c in out) or len(set(out)) >= k:
                raise ConfigError(f"sweep.retire[{i}]={list(out)}: clusters to leave out, in "
                                  f"0..{k - 1}, keeping at least one (clustering.k={k})")
        for key in ("routing", "k", "guidance", "steps", "schedule", "retire"):
            if getattr(self, key) is not None and not getattr(self, key):
                raise ConfigError(f"sweep.{key}=[]: must list at least one value (or be unset)")
        for i, r in enumerate(self.routing or []):
            check_choice(f"sweep.routing[{i}]", r, STRATEGIES)
        for i, top in enumerate(self.k or []):
            if not 1 <= top <= k:
                raise ConfigError(f"sweep.k[{i}]={top}: top-k must be in 1..{k} (clustering.k={k})")
        for i, g in enumerate(self.guidance or []):
            check_positive(f"sweep.guidance[{i}]", g, strict=False)
        for i, st in enumerate(self.steps or []):
            check_positive(f"sweep.steps[{i}]", st)
        for i, sc in enumerate(self.schedule or []):
            check_choice(f"sweep.schedule[{i}]", sc, SCHEDULE_NAMES)
        check_positive("sweep.max_concurrent_trials", self.max_concurrent_trials)
        check_positive("sweep.cpus_per_trial", self.cpus_per_trial, strict=False)
        check_positive("sweep.gpus_per_trial", self.gpus_per_trial, strict=False)
        self.asha.validate()
