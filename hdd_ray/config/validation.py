"""What spans sections: :func:`validate` checks a whole campaign (each section checks itself,
then the rules between sections), :func:`validate_sweep` the sweep against the rest."""

from __future__ import annotations

from typing import Any

from hdd_ray.choices import check_routing
from hdd_ray.config.rules import check_safe_name
from hdd_ray.config.schema import CampaignConfig, resolve_experts
from hdd_ray.errors import ConfigError


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
        check_micro_batch_size(f"experts (cluster {e.cluster})", e.train["batch_size"],
                               e.train["micro_batch_size"], e.resources["num_workers"])
        if int(e.train.get("warmup_steps", 0)) >= int(e.train["steps"]):  # a per-expert steps
            raise ConfigError(
                f"experts (cluster {e.cluster}): train.warmup_steps={e.train['warmup_steps']} "
                f"must be below its train.steps={e.train['steps']}")
    check_global_batch("router", cfg.router.train.batch_size, cfg.router.resources.num_workers)
    check_micro_batch_size("router", cfg.router.train.batch_size,
                           cfg.router.train.micro_batch_size, cfg.router.resources.num_workers)
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
    validate_distill(cfg)


def validate_distill(cfg: CampaignConfig) -> None:
    """The ``distill`` section, its teacher's assignment against ``clustering.k`` and its batch
    against its workers (one-line :class:`ConfigError`)."""
    from hdd_ray.choices import parse_mixture

    d = cfg.distill
    d.validate()
    if d.teacher is not None and d.teacher != "best":
        parse_mixture(d.teacher, cfg.clustering.k, "distill.teacher")
    check_global_batch("distill", d.train.batch_size, d.resources.num_workers)
    check_micro_batch_size("distill", d.train.batch_size, d.train.micro_batch_size,
                           d.resources.num_workers)
    if cfg.ray.executor == "task" and d.resources.num_workers != 1:
        raise ConfigError(
            f"distill.resources.num_workers={d.resources.num_workers}: ray.executor=task runs "
            "each run as one Ray task (one worker); use ray.executor=train for more")


def check_global_batch(what: str, batch_size: int, num_workers: int) -> None:
    """``train.batch_size`` is global (summed over a run's workers): it must split evenly over
    them. One-line :class:`ConfigError` naming ``what`` (an expert, the router) otherwise."""
    if num_workers > 1 and batch_size % num_workers:
        raise ConfigError(
            f"{what}: train.batch_size={batch_size} is the global batch and must split evenly "
            f"over resources.num_workers={num_workers}: make it a multiple of {num_workers}")


def check_micro_batch_size(what: str, batch_size: int, micro_batch_size: Any,
                           num_workers: int) -> None:
    """A given ``train.micro_batch_size`` (samples per worker per forward) is at most the
    per-worker batch, ``batch_size / num_workers``. One-line :class:`ConfigError` otherwise."""
    share = batch_size // max(1, num_workers)
    if isinstance(micro_batch_size, int) and micro_batch_size > share:
        raise ConfigError(
            f"{what}: train.micro_batch_size={micro_batch_size} is more than the per-worker "
            f"batch {share} (train.batch_size={batch_size} / resources.num_workers="
            f"{num_workers}): use at most {share}, or auto")


def validate_sweep(cfg: CampaignConfig) -> None:
    """Check the sweep's search space (one-line :class:`ConfigError` on the first problem).

    ``sweep.mode=optuna`` needs the ``optuna`` package (the ``optuna`` extra; an environment
    without it fails here, before any training, naming the install command).
    """
    cfg.sweep.validate(cfg.clustering.k)
    if cfg.sweep.mode == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise ConfigError("sweep.mode=optuna needs the optuna package: "
                              "pip install 'hdd_ray[optuna]'")
    check_swept_routing(cfg)


def check_swept_routing(cfg: CampaignConfig) -> None:
    """The cross-section form of :func:`~hdd_ray.choices.check_routing`: a trial of a
    ``sweep.routing`` strategy routes with ``sampling.threshold``, so each strategy must pass the
    one routing check with it (``threshold`` needs one). One-line :class:`ConfigError` naming the
    swept value otherwise."""
    s = cfg.sampling
    if "threshold" in (cfg.sweep.routing or []) and s.threshold is None:
        raise ConfigError("sampling.threshold=None: required when sweep.routing has 'threshold'")
    for i, routing in enumerate(cfg.sweep.routing or []):
        try:
            check_routing(routing, s.k, s.threshold, cfg.clustering.k)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (sweep.routing[{i}]={routing!r} routes with "
                              "sampling.threshold)") from None
