"""The sweep's driver: the experts the search space needs trained first, then the Tune trials
(or the restore of an interrupted sweep), then the ranking (:func:`run_sweep`)."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

from hdd_ray import storage, tracking
from hdd_ray.campaign import CampaignPaths, with_assignment
from hdd_ray.config import CampaignConfig, check_safe_name, to_yaml, validate_sweep
from hdd_ray.errors import SweepError
from hdd_ray.sweep.ranking import rank, write_outputs
from hdd_ray.sweep.space import (
    candidate_assignments,
    comparable,
    describe,
    needed_assignments,
    param_space,
    rungs,
    swept_values,
)
from hdd_ray.sweep.trial import close_trial_runs, sweep_trial

SPEC_FILE = "sweep_spec.json"
log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """What :func:`run_sweep` returns: ranked rows, the best mixture, where things are."""

    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    table: str
    directory: str
    trainings: int  # experts trained (not reused) for this sweep
    experts_needed: int
    parent_run_id: str | None
    restored: bool
    failed_trials: int = 0
    registered: Any = None  # sweep.register_as: the version (hdd_ray.registry.Logged)


def _sweep_parent(cfg: CampaignConfig) -> str | None:
    """The sweep's MLflow parent run (reused on restore)."""
    exp = tracking.connect(cfg)
    if exp is None:
        return None
    sw = cfg.sweep
    run = exp.find_or_create(f"sweep {sw.name}", {"stage": "sweep", "sweep": sw.name,
                                                  "mode": sw.mode},
                             key=("stage", "sweep"),
                             params=tracking.flatten(describe(cfg)))
    tracking.warn_on_failure(run.log_text, to_yaml(cfg), "config.yaml")  # the resolved config
    return run.run_id


def _owned_sweep_dir(cfg: CampaignConfig) -> str:
    """``<root>/sweeps/<sweep.name>``, refused in one line unless it is a direct child of
    ``<root>/sweeps`` (``--force`` deletes it: it may never reach anything else)."""
    check_safe_name("sweep.name", cfg.sweep.name)
    paths = CampaignPaths(cfg.root)
    directory = paths.sweep_dir(cfg.sweep.name)
    parent, base = (directory.rstrip("/").rsplit("/", 1) if storage.is_uri(directory)
                    else os.path.split(os.path.normpath(directory)))
    sweeps = paths.sweeps if storage.is_uri(paths.sweeps) else os.path.normpath(paths.sweeps)
    if parent != sweeps or base != cfg.sweep.name or base in ("", ".", ".."):
        raise SweepError(f"sweep.name={cfg.sweep.name!r}: {directory} is not a folder of "
                         f"{paths.sweeps}; refusing to use (or --force delete) it")
    return directory


def train_needed_experts(cfg: CampaignConfig, parent_run_id: str | None = None) -> tuple[int, int]:
    """Train (or reuse) every expert the search space can need, before any trial starts.

    Returns ``(trained, needed)``: experts trained now and experts the sweep needs in all.
    Raises :class:`SweepError` when one fails.
    """
    from hdd_ray.training import train_campaign

    needed = needed_assignments(candidate_assignments(cfg))
    statuses = []
    for i, schedule in enumerate(swept_values(cfg)["schedule"]):
        statuses += train_campaign(with_assignment(cfg, [], schedule), include_router=(i == 0),
                                   parent_run_id=parent_run_id, assignments=needed)
    experts = {s.name: s for s in statuses if s.kind == "expert"}
    failed = [s for s in statuses if not s.ok]
    if failed:
        raise SweepError("training failed: " + "; ".join(f"{s.name}: {s.reason}" for s in failed))
    return sum(s.status != "reused" for s in experts.values()), len(experts)


def run_sweep(cfg: CampaignConfig, force: bool = False, verbose: int = 1) -> SweepResult:
    """Run (or resume) the configured sweep; Ray must be initialised.

    Trains the experts the search space needs, runs the Tune trials (or restores an interrupted
    sweep from ``<root>/sweeps/<name>``), then writes the ranked table, the plot and
    ``best_mixture.json``. ``force`` starts the sweep over (the mixture cache is still reused).
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from hdd_ray.evaluation.judge import Judge

    validate_sweep(cfg)
    cfg = dataclasses.replace(cfg, root=storage.absolute(cfg.root))
    sw = cfg.sweep
    paths = CampaignPaths(cfg.root)
    directory = _owned_sweep_dir(cfg)
    spec_path = storage.join(directory, SPEC_FILE)
    if force and storage.exists(directory):
        storage.remove(directory)  # only <root>/sweeps/<name> (checked above)
    if storage.exists(spec_path) and comparable(storage.read_json(spec_path)) != describe(cfg):
        raise SweepError(f"sweep {sw.name!r} at {directory} was started with another search "
                         "space: pick another sweep.name, or pass --force to start it over")
    parent = _sweep_parent(cfg)
    trained, needed = train_needed_experts(cfg, parent)
    Judge(with_assignment(cfg, [], swept_values(cfg)["schedule"][0]))  # builds the shared caches (reference CLIP, stats)
    storage.write_json(spec_path, describe(cfg))

    trainable = tune.with_resources(tune.with_parameters(sweep_trial, cfg=cfg,
                                                         parent_run_id=parent),
                                    {"cpu": sw.cpus_per_trial, "gpu": sw.gpus_per_trial})
    restored = tune.Tuner.can_restore(directory)
    if restored:
        tuner = tune.Tuner.restore(directory, trainable=trainable, resume_errored=True)
    else:
        steps = rungs(cfg)
        scheduler = None
        if len(steps) > 1:
            scheduler = ASHAScheduler(time_attr="num_samples", max_t=steps[-1],
                                      grace_period=steps[0],
                                      reduction_factor=sw.asha.reduction_factor)
        search_alg = None
        if sw.mode == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(seed=sw.seed)
        elif sw.mode == "random":
            from ray.tune.search import BasicVariantGenerator

            search_alg = BasicVariantGenerator(random_state=sw.seed)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                metric="fid", mode="min", scheduler=scheduler, search_alg=search_alg,
                num_samples=sw.num_samples if sw.mode in ("random", "optuna") else 1,
                max_concurrent_trials=sw.max_concurrent_trials),
            run_config=tune.RunConfig(name=sw.name, storage_path=paths.sweeps,
                                      verbose=verbose),
        )
    grid = tuner.fit()
    tracking.warn_on_failure(close_trial_runs, cfg, grid)  # trials ASHA stopped, or failed
    errors = [r.error for r in grid if r.error is not None]
    rows = rank(grid, cfg)
    if errors and not rows:
        raise SweepError(f"all {len(errors)} trials failed, the first with: "
                         f"{_one_line(errors[0])} (details in {directory})")
    table = write_outputs(cfg, rows, parent)
    return SweepResult(rows=rows, best=rows[0] if rows else None, table=table,
                       directory=directory, trainings=trained, experts_needed=needed,
                       parent_run_id=parent, restored=restored, failed_trials=len(errors),
                       registered=_register(cfg, rows, parent))


def _register(cfg: CampaignConfig, rows: list[dict[str, Any]], parent: str | None) -> Any:
    """``sweep.register_as``: the best full-N mixture registered in MLflow's Model Registry
    (:func:`hdd_ray.sharing.register_best`); a failure is one warning line, never a failed
    sweep (its results are written)."""
    if not cfg.sweep.register_as or all(r["stopped_early"] for r in rows):
        return None
    from hdd_ray.sharing import register_best

    try:
        return register_best(cfg, parent)
    except Exception as exc:
        log.warning("sweep.register_as=%s: not registered: %s", cfg.sweep.register_as,
                    _one_line(exc))
        return None


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]
