"""One Tune trial: a mixture assembled from the expert cache, evaluated at each ASHA rung's
sample count, reported to Tune and to its MLflow child run."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from hdd_ray import storage
from hdd_ray.campaign import CampaignPaths, with_assignment
from hdd_ray.choices import format_assignment
from hdd_ray.config import CampaignConfig
from hdd_ray.sweep.space import rungs, trial_assignment, trial_retired

if TYPE_CHECKING:
    from hdd_ray.tracking import TrackedRun


def _trial_tags(cfg: CampaignConfig, trial_id: str) -> dict[str, str]:
    return {"stage": "sweep_trial", "sweep": cfg.sweep.name, "trial_id": trial_id}


def _trial_run(cfg: CampaignConfig, parent: str | None, trial_id: str, name: str,
               params: dict[str, Any]) -> TrackedRun | None:
    """The trial's MLflow child run: found by ``trial_id`` (a restarted trial keeps it)."""
    from hdd_ray import tracking

    exp = tracking.connect(cfg)
    if exp is None:
        return None
    return exp.find_or_create(name, _trial_tags(cfg, trial_id), key=("trial_id", "sweep"),
                              parent=parent, params=params)


def close_trial_runs(cfg: CampaignConfig, results: Iterable[Any]) -> int:
    """End the MLflow runs of trials that could not end them: a trial ends its run before its
    last report, but ASHA stops a trial at an earlier rung by ending its actor, so no code of
    the trial runs after that report. ``results`` are Tune's results (``ray.tune.Result``); a
    trial still RUNNING is marked FINISHED with the tag ``stopped_early``, or FAILED with its
    error's last line. Returns how many were ended."""
    from hdd_ray import tracking

    exp = tracking.connect(cfg)
    if exp is None:
        return 0
    ended = 0
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id")
        found = exp.find(_trial_tags(cfg, str(trial_id))) if trial_id else None
        if found is None or found.status() != "RUNNING":
            continue
        error = result.error
        lines = [ln for ln in str(error or "").strip().splitlines() if ln.strip()]
        found.log(tags={"stopped_early": "true"} if error is None
                  else {"error": (lines[-1] if lines else type(error).__name__)[:500]})
        found.finish(ok=error is None)
        ended += 1
    return ended


def sweep_trial(config: dict[str, Any], cfg: CampaignConfig,
                parent_run_id: str | None = None) -> None:
    """One Tune trial: evaluate one mixture at each rung's sample count and report to Tune.

    ``config`` holds ``assignment`` (or ``c0``..), ``schedule``, ``routing``, ``k``,
    ``guidance``, ``steps``. Every expert must be in the cache (:func:`hdd_ray.sweep.driver.run_sweep` trains them
    first); a missing one fails the trial with one line instead of training it here.
    """
    import torch
    from ray import tune

    from hdd_ray.devices import pick_device
    from hdd_ray.ensemble import MixtureSpec
    from hdd_ray.evaluation.judge import Judge
    from hdd_ray.evaluation.mixture import GRID_FILE, evaluate_mixture
    from hdd_ray.evaluation.statistics import interval_columns

    torch.set_num_threads(max(1, int(round(cfg.sweep.cpus_per_trial))))
    device = pick_device(cfg.sweep.gpus_per_trial > 0)  # Tune gave the trial its GPU(s)
    k = cfg.clustering.k
    ddpm, retired = trial_assignment(config, k), trial_retired(config)
    var = with_assignment(cfg, ddpm, config["schedule"])
    quiet = dataclasses.replace(var, tracking=dataclasses.replace(var.tracking, enabled=False))
    trial_id = tune.get_context().get_trial_id() or "local"
    params = {"assignment": format_assignment(ddpm, k, retired), "num_ddpm": len(ddpm),
              "schedule": config["schedule"], "routing": config["routing"], "k": config["k"],
              "guidance": config["guidance"], "steps": config["steps"], "trial_id": trial_id}
    run = _trial_run(cfg, parent_run_id, trial_id,
                     f"trial {params['assignment']} {config['routing']}", params)
    judge = Judge(quiet, device)
    result: dict[str, Any] = {}
    counts = rungs(cfg)
    for n in counts:
        spec = MixtureSpec.from_config(var, ddpm, routing=config["routing"], k=config["k"],
                                       guidance=float(config["guidance"]),
                                       steps=int(config["steps"]), num_samples=n,
                                       retired=retired)
        result = evaluate_mixture(quiet, spec, judge)
        metrics = {key: float(result[key]) for key in ("fid", "fid_floor", "clip_score",
                                                       "diversity", "images_per_second")
                   if result.get(key) is not None}
        if run is not None:
            intervals = {key: float(result[key]) for key in interval_columns(
                ("fid", "fid_floor", "clip_score", "diversity")) if result.get(key) is not None}
            run.log({**intervals, **metrics, **{f"expert_share_{i}": float(v)
                                                for i, v in enumerate(result["expert_share"])}},
                    tags={"mixture_id": result["mixture_id"], "num_samples": str(n),
                          "diversity_metric": result["diversity_metric"],
                          "experts": ",".join(result["experts"])}, step=n)
        if run is not None and n == counts[-1]:  # Tune ends the trial at this report: first
            grid = storage.join(CampaignPaths(cfg.root).mixture_dir(result["mixture_id"]),
                                GRID_FILE)
            if storage.exists(grid):
                run.log_image(storage.read_bytes(grid), key="samples")
            run.finish()
        tune.report({**metrics, "num_samples": n, "num_ddpm": len(ddpm),
                     "assignment": params["assignment"], "mixture_id": result["mixture_id"]})
