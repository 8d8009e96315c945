"""A sweep's search space: the objective assignments it can produce, the swept sampling
settings, Tune's ``param_space``, the ASHA rungs, and :func:`describe` (what defines the sweep's
results: a restore must match it)."""

from __future__ import annotations

import copy
import itertools
import os
from typing import Any

from hdd_ray import storage
from hdd_ray.campaign import CampaignPaths, without_later_defaults
from hdd_ray.choices import format_assignment, parse_assignment
from hdd_ray.config import CampaignConfig, to_dict


def candidate_assignments(cfg: CampaignConfig) -> list[list[int]]:
    """Every assignment (DDPM cluster ids) the sweep's search space can produce, in order.

    ``grid``: all 2^K; ``n_ddpm`` (and ``random``/``optuna`` with ``n_ddpm``): exactly n DDPM
    experts for each listed n; ``list``: the given strings; ``random``/``optuna`` without
    ``n_ddpm``: all 2^K (each cluster drawn independently).
    """
    sw, k = cfg.sweep, cfg.clustering.k
    if sw.mode == "list":
        out = [parse_assignment(a, k, f"sweep.assignments[{i}]")
               for i, a in enumerate(sw.assignments)]
    elif sw.mode == "grid" or (sw.mode in ("random", "optuna") and not sw.n_ddpm):
        out = [[c for c in range(k) if mask >> c & 1] for mask in range(2 ** k)]
        out.sort(key=lambda a: (len(a), a))
    else:
        out = [list(combo) for n in sw.n_ddpm or [] for combo in itertools.combinations(range(k), n)]
    unique: list[list[int]] = []
    for a in out:
        if sorted(a) not in unique:
            unique.append(sorted(a))
    return unique


def needed_assignments(candidates: list[list[int]]) -> list[list[int]]:
    """At most two assignments whose experts are exactly those every candidate needs.

    Cluster c needs ``ddpm_eps`` iff some candidate makes it DDPM and ``fm_velocity`` iff some
    makes it FM: the union of DDPM sets and their intersection cover both, and nothing more.
    """
    if not candidates:
        return []
    union = sorted(set().union(*map(set, candidates)))
    inter = sorted(set.intersection(*map(set, candidates)))
    return [union] if union == inter else [union, inter]


def param_space(cfg: CampaignConfig) -> dict[str, Any]:
    """The Tune ``param_space`` of the sweep (grid searches, or choices for a search algorithm)."""
    from ray import tune

    sw, k = cfg.sweep, cfg.clustering.k
    search = sw.mode in ("random", "optuna")
    pick = tune.choice if search else tune.grid_search
    space: dict[str, Any] = {
        key: (pick(values) if len(values) > 1 else values[0])
        for key, values in swept_values(cfg).items()
    }
    if sw.retire:  # which experts to keep: "" (all), "3", "2,5", ...
        sets = [retired_text(r) for r in sw.retire]
        space["retired"] = pick(sets) if len(sets) > 1 or search else sets[0]
    if search and not sw.n_ddpm:  # each cluster's objective drawn on its own
        for c in range(k):
            space[f"c{c}"] = tune.choice(["D", "F"])
    else:
        strings = [format_assignment(a, k) for a in candidate_assignments(cfg)]
        space["assignment"] = pick(strings) if len(strings) > 1 or search else strings[0]
    return space


def swept_values(cfg: CampaignConfig) -> dict[str, list[Any]]:
    """The values of each swept sampling setting (unset lists = the campaign's own value)."""
    sw, s = cfg.sweep, cfg.sampling
    return {"schedule": list(sw.schedule or [cfg.experts.schedule]),
            "routing": list(sw.routing or [s.routing]), "k": list(sw.k or [s.k]),
            "guidance": [float(g) for g in sw.guidance or [s.guidance_scale]],
            "steps": list(sw.steps or [s.steps])}


def trial_assignment(config: dict[str, Any], k: int) -> list[int]:
    """The DDPM cluster ids of one trial's config (``assignment`` string or ``c0``..``cK-1``)."""
    if "assignment" in config:
        return parse_assignment(config["assignment"], k)
    return [c for c in range(k) if config[f"c{c}"] == "D"]


def retired_text(retired: Any) -> str:
    """A set of left-out clusters as a Tune value: ``"2,5"`` (``""``: none)."""
    return ",".join(str(int(c)) for c in sorted(set(retired)))


def trial_retired(config: dict[str, Any]) -> list[int]:
    """The left-out clusters of one trial's config (``sweep.retire``), sorted."""
    text = str(config.get("retired") or "")
    return sorted(int(c) for c in text.split(",") if c.strip())


def rungs(cfg: CampaignConfig) -> list[int]:
    """Sample counts a trial is evaluated at: the ASHA rungs below N, then N."""
    n = cfg.evaluation.num_samples
    return [c for c in cfg.sweep.asha.sample_counts if c < n] + [n]


def describe(cfg: CampaignConfig) -> dict[str, Any]:
    """What defines the sweep's results (stored beside it; a restore must match it).

    The search space, and everything else a trial's numbers depend on: the corpus and
    clustering settings, the experts (objective, schedule, model, text encoder, training), the
    router, the sampling and evaluation settings, the latent space (the VAE's content, scaling,
    shift and dtype: not where it lies), the prepared corpus's ``data_hash`` (None before it is
    prepared), and where precision changes results (bf16 applies only on GPUs: the experts',
    the router's and the trials'). Only how fast things run is left out (resources other than
    GPUs, data loading: ``experts.data`` / ``router.data``, concurrency, CPUs per trial), and so is
    the model name the best is registered as (``sweep.register_as``). The
    tracking and Ray sections and the campaign's name and root change no number.
    """
    from hdd_ray.latents import config_settings

    def without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in keys}

    experts = _starts(without(to_dict(cfg.experts), "resources", "list", "data"))
    experts["train"] = without_later_defaults(experts["train"])
    experts["list"] = [_starts(without(e, "resources", "data"))
                       for e in to_dict(cfg.experts).get("list", [])]
    router = _starts(without(to_dict(cfg.router), "resources", "data"))
    router["train"] = without_later_defaults(router["train"])
    sweep = without(to_dict(cfg.sweep), "max_concurrent_trials", "cpus_per_trial",
                    "gpus_per_trial", "register_as")
    if sweep.get("retire") is None:  # a sweep from before the setting keeps its description
        sweep.pop("retire", None)
    return comparable({"sweep": sweep,
            "latents": config_settings(cfg), "data_hash": _data_hash(cfg),
            "num_samples": cfg.evaluation.num_samples, "k": cfg.clustering.k,
            "corpus": to_dict(cfg.corpus), "clustering": without(to_dict(cfg.clustering),
                                                                 "num_actors", "gpus_per_actor"),
            "experts": experts,
            "router": router,
            "sampling": to_dict(cfg.sampling),
            "evaluation": without(to_dict(cfg.evaluation), "resources", "enabled"),
            "gpus": {"experts": _uses_gpus(cfg.experts.resources, cfg.experts.list),
                     "router": cfg.router.resources.gpus_per_worker > 0,
                     "trials": cfg.sweep.gpus_per_trial > 0}})


#: settings added after sweeps were first described, at the values that change nothing: a
#: description without them (an older sweep's) compares equal (:func:`comparable`)
_LATER_DEFAULTS = {("sampling", "router"): "learned", ("sampling", "centroid_temperature"): 0.05}


def comparable(spec: dict[str, Any]) -> dict[str, Any]:
    """A sweep description as :func:`describe` compares it: without ``train.compile`` and
    ``train.async_checkpoint`` (they change no number), a grown router's settings (``router.grow``: they train no router of
    the sweep's cluster set) and the later settings of :data:`_LATER_DEFAULTS` at their
    defaults, so a sweep described before those settings existed is restored, not refused."""
    spec = copy.deepcopy(spec)
    for section in ("experts", "router"):
        part = spec.get(section) or {}
        for train in [part.get("train") or {}, *[(e or {}).get("train") or {}
                                                  for e in part.get("list") or []]]:
            train.pop("compile", None)
            train.pop("async_checkpoint", None)
        part.pop("grow", None)
    for (section, key), default in _LATER_DEFAULTS.items():
        if (spec.get(section) or {}).get(key, default) == default:
            (spec.get(section) or {}).pop(key, None)
    return spec


#: start settings left out of a sweep's description at these (default) values, so sweeps
#: described before starts existed are restored
START_DEFAULTS = {"init": None, "init_mode": "exact", "adaln": "single",
                  "network": {"parameterization": "auto", "schedule": None}}


def _starts(section: dict[str, Any]) -> dict[str, Any]:
    """``section`` without the start settings at their defaults, and a local ``init`` by the
    content of its weights (a moved file is the same start)."""
    out = {k: v for k, v in section.items()
           if not (k in START_DEFAULTS and v == START_DEFAULTS[k])}
    init = out.get("init")
    if init and not storage.is_uri(str(init)):
        from hdd_ray.campaign.starts import weights_sha256
        from hdd_ray.config.pretrained import resolve_init

        path = resolve_init(init)
        if path is not None and os.path.exists(path):
            out["init"] = {"sha256": weights_sha256(path)}
    return out


def _data_hash(cfg: CampaignConfig) -> str | None:
    """The prepared corpus's ``data_hash`` (None when it is not prepared or unreadable): that
    of the cluster set of ``clustering.k`` in a campaign that grew
    (:func:`hdd_ray.campaign.generation_view`)."""
    from hdd_ray.campaign import generation_view

    path = CampaignPaths(cfg.root).manifest
    try:
        manifest = storage.read_json(path) if storage.exists(path) else None
        if isinstance(manifest, dict) and manifest.get("generations"):
            manifest = generation_view(manifest, cfg.clustering.k) or manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest.get("data_hash") if isinstance(manifest, dict) else None


def _uses_gpus(resources: Any, overrides: Any) -> list[bool]:
    """Whether the default expert resources and each ``experts.list`` override ask for GPUs."""
    out = [float(resources.gpus_per_worker) > 0]
    for spec in overrides or []:
        res = dict(spec.resources or {}) if not isinstance(spec, dict) else dict(spec.get("resources") or {})
        if "gpus_per_worker" in res:
            out.append(float(res["gpus_per_worker"]) > 0)
    return out
