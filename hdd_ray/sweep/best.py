"""The best mixture of a sweep: ``best_mixture.json`` written from the ranking's best row,
and read back by :func:`load_mixture_spec` (``jobs/sample.py --mixture``,
``evaluation/evaluate_mixture.py --mixture``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hdd_ray import storage
from hdd_ray.campaign import CampaignPaths, with_assignment
from hdd_ray.config import CampaignConfig
from hdd_ray.errors import ConfigError, SweepError

if TYPE_CHECKING:
    from hdd_ray.ensemble import MixtureSpec

BEST_FILE = "best_mixture.json"


def best_spec(cfg: CampaignConfig, row: dict[str, Any]) -> dict[str, Any]:
    """The JSON saved as ``best_mixture.json``: a full :class:`MixtureSpec` + the schedule."""
    return {
        "sweep": cfg.sweep.name, "assignment": row["assignment"],
        "schedule": row["schedule"],
        "spec": {"ddpm_clusters": row["ddpm_clusters"], "routing": row["routing"],
                 "k": int(row["k"]),
                 "threshold": cfg.sampling.threshold if row["routing"] == "threshold" else None,
                 "guidance": float(row["guidance"]), "steps": int(row["steps"]),
                 "num_samples": int(row["num_samples"]), "seed": cfg.sampling.seed,
                 "retired": list(row.get("retired", []))},
        "metrics": {key: row.get(key) for key in ("fid_n", "fid", "fid_low", "fid_high",
                                                  "fid_floor", "clip_score", "clip_score_low",
                                                  "clip_score_high", "diversity", "diversity_low",
                                                  "diversity_high")},
        "mixture_id": row.get("mixture_id"), "trial_id": row.get("trial_id"),
    }


def best_file(cfg: CampaignConfig, name_or_path: str, flag: str = "--mixture") -> str:
    """The ``best_mixture.json`` of a sweep name (``<root>/sweeps/<name>/``) or a path to
    such a file; :class:`SweepError` (one line, naming ``flag``) when it does not exist."""
    path = name_or_path
    if not (name_or_path.endswith(".json") and storage.exists(name_or_path)):
        path = storage.join(CampaignPaths(storage.absolute(cfg.root)).sweep_dir(name_or_path),
                            BEST_FILE)
    if not storage.exists(path):
        raise SweepError(f"{flag} {name_or_path!r}: no {path} (run jobs/sweep_objectives.py "
                         f"sweep.name={name_or_path} first, or give a JSON path)")
    return path


def load_mixture_spec(cfg: CampaignConfig,
                      name_or_path: str) -> tuple[CampaignConfig, MixtureSpec]:
    """A saved mixture -> ``(campaign variant, MixtureSpec)``.

    ``name_or_path`` is a sweep name (``<root>/sweeps/<name>/best_mixture.json``) or a path to
    such a JSON file. Raises :class:`SweepError` (one line) when it does not exist.
    """
    from hdd_ray.ensemble import MixtureSpec

    path = best_file(cfg, name_or_path)
    saved = storage.read_json(path)
    spec = dict(saved["spec"])
    spec["ddpm_clusters"] = tuple(spec["ddpm_clusters"])
    spec["retired"] = tuple(spec.get("retired", ()))
    for c in (*spec["ddpm_clusters"], *spec["retired"]):
        if not 0 <= c < cfg.clustering.k:
            raise ConfigError(f"{path}: cluster id {c} outside 0..{cfg.clustering.k - 1}")
    return with_assignment(cfg, spec["ddpm_clusters"], saved["schedule"]), MixtureSpec(**spec)
