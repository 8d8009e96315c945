"""Ray Tune sweeps of objective assignments (which clusters use ``ddpm_eps``), routing and CFG.

The search space comes from the config's ``sweep`` section (:class:`hdd_ray.config.SweepConfig`).
The flow of :func:`run_sweep`:

1. **Experts first.** The union of the experts the whole search space can ask for is trained up
   front by one :func:`hdd_ray.training.train_campaign` call per DDPM schedule: for
   each cluster, ``ddpm_eps`` if some candidate assignment makes it DDPM and ``fm_velocity`` if
   some makes it FM, so at most 2K trainings (per schedule) for 2^K mixtures, and an expert is
   never trained twice at once (trials only read the expert cache).
2. **Trials.** A trial is a plain function (Train V2: a trial never wraps a trainer object): it
   assembles its mixture from the cache and evaluates it with
   :func:`~hdd_ray.evaluation.mixture.evaluate_mixture` at each ASHA rung's sample count
   (``sweep.asha.sample_counts``, then ``evaluation.num_samples``), reporting ``fid``,
   ``clip_score``, ``diversity`` and ``num_samples`` to Tune; ASHA stops bad trials on the
   smaller counts. Rungs already evaluated (``mixtures/<id>/metrics.json``) are reused, so a
   restarted trial costs little.
3. **MLflow.** One sweep run; one child run per trial (params: assignment ``D F F D``, number
   of DDPM experts, schedule, routing, k, guidance, steps; tag ``trial_id``; the rungs as steps
   of its metrics; the final sample grid). At the end a ranked table (CSV + markdown) and a
   plot of FID and CLIP score against the number of DDPM experts, as artifacts of the sweep run.
4. **Resume.** The Tune experiment lives in ``<root>/sweeps/<name>``; when it exists,
   ``Tuner.restore`` finishes the remaining trials without redoing finished ones.
5. The best mixture is saved as ``<root>/sweeps/<name>/best_mixture.json``;
   :func:`load_mixture_spec` reads it back (``evaluation/evaluate_mixture.py --mixture NAME``).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
from dataclasses import dataclass
from typing import Any

from hdd_ray import storage
from hdd_ray.campaign import (
    CampaignPaths,
    with_assignment,
    without_later_defaults,
)
from hdd_ray.choices import format_assignment, parse_assignment
from hdd_ray.config import CampaignConfig, ConfigError, validate_sweep
from hdd_ray.errors import SweepError

BEST_FILE = "best_mixture.json"
SPEC_FILE = "sweep_spec.json"
RANKING_COLUMNS = ("rank", "assignment", "num_ddpm", "schedule", "routing", "k", "guidance",
                   "steps", "num_samples", "fid_n", "fid", "fid_floor", "fid_vs_best",
                   "tied_with_best", "clip_score", "diversity", "stopped_early", "trial_id")


# --------------------------------------------------------------------------- search space


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
    GPUs, data loading: ``experts.data`` / ``router.data``, concurrency, CPUs per trial). The
    tracking and Ray sections and the campaign's name and root change no number.
    """
    from hdd_ray.config import to_dict
    from hdd_ray.latents import config_settings

    def without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in keys}

    experts = without(to_dict(cfg.experts), "resources", "list", "data")
    experts["train"] = without_later_defaults(experts["train"])
    experts["list"] = [without(e, "resources", "data")
                       for e in to_dict(cfg.experts).get("list", [])]
    router = without(to_dict(cfg.router), "resources", "data")
    router["train"] = without_later_defaults(router["train"])
    return {"sweep": without(to_dict(cfg.sweep), "max_concurrent_trials", "cpus_per_trial",
                             "gpus_per_trial"),
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
                     "trials": cfg.sweep.gpus_per_trial > 0}}


def _data_hash(cfg: CampaignConfig) -> str | None:
    """The prepared corpus's ``data_hash`` (None when it is not prepared or unreadable)."""
    path = CampaignPaths(cfg.root).manifest
    try:
        manifest = storage.read_json(path) if storage.exists(path) else None
    except (OSError, ValueError):
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


def _owned_sweep_dir(cfg: CampaignConfig) -> str:
    """``<root>/sweeps/<sweep.name>``, refused in one line unless it is a direct child of
    ``<root>/sweeps`` (``--force`` deletes it: it may never reach anything else)."""
    from hdd_ray.config import check_safe_name

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


# --------------------------------------------------------------------------- the trial


def _trial_run(cfg: CampaignConfig, parent: str | None, trial_id: str, name: str,
               params: dict[str, Any]) -> Any:
    """The trial's MLflow child run: found by ``trial_id`` (a restarted trial keeps it)."""
    from hdd_ray import tracking

    exp = tracking.connect(cfg)
    if exp is None:
        return None
    tags = {"stage": "sweep_trial", "sweep": cfg.sweep.name, "trial_id": trial_id}
    return exp.find_or_create(name, tags, key=("trial_id", "sweep"), parent=parent, params=params)


def sweep_trial(config: dict[str, Any], cfg: CampaignConfig,
                parent_run_id: str | None = None) -> None:
    """One Tune trial: evaluate one mixture at each rung's sample count and report to Tune.

    ``config`` holds ``assignment`` (or ``c0``..), ``schedule``, ``routing``, ``k``,
    ``guidance``, ``steps``. Every expert must be in the cache (:func:`run_sweep` trains them
    first); a missing one fails the trial with one line instead of training it here.
    """
    import torch
    from ray import tune

    from hdd_ray.devices import pick_device
    from hdd_ray.evaluation.mixture import GRID_FILE, Judge, MixtureSpec, evaluate_mixture

    torch.set_num_threads(max(1, int(round(cfg.sweep.cpus_per_trial))))
    device = pick_device(cfg.sweep.gpus_per_trial > 0)  # Tune gave the trial its GPU(s)
    k = cfg.clustering.k
    ddpm = trial_assignment(config, k)
    var = with_assignment(cfg, ddpm, config["schedule"])
    quiet = dataclasses.replace(var, tracking=dataclasses.replace(var.tracking, enabled=False))
    trial_id = tune.get_context().get_trial_id() or "local"
    params = {"assignment": format_assignment(ddpm, k), "num_ddpm": len(ddpm),
              "schedule": config["schedule"], "routing": config["routing"], "k": config["k"],
              "guidance": config["guidance"], "steps": config["steps"], "trial_id": trial_id}
    run = _trial_run(cfg, parent_run_id, trial_id,
                     f"trial {params['assignment']} {config['routing']}", params)
    judge = Judge(quiet, device)
    result: dict[str, Any] = {}
    for n in rungs(cfg):
        spec = MixtureSpec.from_config(var, ddpm, routing=config["routing"], k=config["k"],
                                       guidance=float(config["guidance"]),
                                       steps=int(config["steps"]), num_samples=n)
        result = evaluate_mixture(quiet, spec, judge)
        metrics = {key: float(result[key]) for key in ("fid", "fid_floor", "clip_score",
                                                       "diversity", "images_per_second")
                   if result.get(key) is not None}
        if run is not None:
            run.log({**metrics, **{f"expert_share_{i}": float(v)
                                   for i, v in enumerate(result["expert_share"])}},
                    tags={"mixture_id": result["mixture_id"], "num_samples": str(n)}, step=n)
        tune.report({**metrics, "num_samples": n, "num_ddpm": len(ddpm),
                     "assignment": params["assignment"], "mixture_id": result["mixture_id"]})
    if run is not None:
        grid = storage.join(CampaignPaths(cfg.root).mixture_dir(result["mixture_id"]), GRID_FILE)
        if storage.exists(grid):
            run.log_image(storage.read_bytes(grid), key="samples")
        run.finish()


# --------------------------------------------------------------------------- the driver


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


def _sweep_parent(cfg: CampaignConfig) -> str | None:
    """The sweep's MLflow parent run (reused on restore)."""
    from hdd_ray import tracking

    exp = tracking.connect(cfg)
    if exp is None:
        return None
    from hdd_ray.config import to_yaml

    sw = cfg.sweep
    run = exp.find_or_create(f"sweep {sw.name}", {"stage": "sweep", "sweep": sw.name,
                                                  "mode": sw.mode},
                             key=("stage", "sweep"),
                             params=tracking.flatten(describe(cfg)))
    tracking.warn_on_failure(run.log_text, to_yaml(cfg), "config.yaml")  # the resolved config
    return run.run_id


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

    from hdd_ray.evaluation.mixture import Judge

    validate_sweep(cfg)
    cfg = dataclasses.replace(cfg, root=storage.absolute(cfg.root))
    sw = cfg.sweep
    paths = CampaignPaths(cfg.root)
    directory = _owned_sweep_dir(cfg)
    spec_path = storage.join(directory, SPEC_FILE)
    if force and storage.exists(directory):
        storage.remove(directory)  # only <root>/sweeps/<name> (checked above)
    if storage.exists(spec_path) and storage.read_json(spec_path) != describe(cfg):
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
    errors = [r.error for r in grid if r.error is not None]
    rows = rank(grid, cfg)
    if errors and not rows:
        raise SweepError(f"all {len(errors)} trials failed, the first with: "
                         f"{_one_line(errors[0])} (details in {directory})")
    table = write_outputs(cfg, rows, parent)
    return SweepResult(rows=rows, best=rows[0] if rows else None, table=table,
                       directory=directory, trainings=trained, experts_needed=needed,
                       parent_run_id=parent, restored=restored, failed_trials=len(errors))


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


# --------------------------------------------------------------------------- results


def rank(grid: Any, cfg: CampaignConfig) -> list[dict[str, Any]]:
    """One row per finished trial, best first: full-N trials by FID, then early-stopped ones."""
    full = rungs(cfg)[-1]
    rows = []
    for result in grid:
        m, c = result.metrics or {}, result.config or {}
        if "fid" not in m:
            continue
        ddpm = trial_assignment(c, cfg.clustering.k)
        rows.append({
            "assignment": format_assignment(ddpm, cfg.clustering.k), "num_ddpm": len(ddpm),
            "ddpm_clusters": ddpm, "schedule": c["schedule"], "routing": c["routing"],
            "k": c["k"], "guidance": c["guidance"], "steps": c["steps"],
            "num_samples": m["num_samples"], "fid": m["fid"], "fid_floor": m.get("fid_floor"),
            "clip_score": m.get("clip_score"), "diversity": m.get("diversity"),
            "stopped_early": m["num_samples"] < full, "trial_id": m.get("trial_id"),
            "mixture_id": m.get("mixture_id"),
        })
    rows.sort(key=lambda r: (r["stopped_early"], r["fid"]))
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    _compare_with_best(rows, CampaignPaths(storage.absolute(cfg.root)).mixtures)
    return rows


def _compare_with_best(rows: list[dict[str, Any]], mixtures_dir: str) -> None:
    """Add each row's 95 % intervals (from its mixture's ``metrics.json``) and its paired FID
    difference from the best full-N trial: every trial samples the same prompts from the same
    noise, so trial and best are resampled with the same indices. ``tied_with_best`` is
    ``"yes"`` when that interval contains 0 (the two ranks are indistinguishable at this N),
    ``"no"`` when it excludes 0, ``"best"`` for the best and empty for early-stopped trials."""
    from hdd_ray.evaluation.mixture import METRICS_FILE, paired_difference
    from hdd_ray.evaluation.statistics import INTERVAL_KEYS, interval_columns

    keys = [*interval_columns(INTERVAL_KEYS), "fid_n"]
    for r in rows:
        path = storage.join(mixtures_dir, str(r.get("mixture_id")), METRICS_FILE)
        if r.get("mixture_id") and storage.exists(path):
            saved = storage.read_json(path)
            r.update({k: saved[k] for k in keys if k in saved})
    best = next((r for r in rows if not r["stopped_early"]), None)
    for r in rows:
        r["fid_vs_best"], r["tied_with_best"] = "", ""
        if best is None or r["stopped_early"]:
            continue
        if r is best:
            r["tied_with_best"] = "best"
            continue
        diff = paired_difference(r, best, mixtures_dir)
        if diff is None:
            r["fid_vs_best"] = "not paired"
            continue
        r["fid_vs_best"] = diff["fid"].text(3, signed=True)
        r["tied_with_best"] = "no" if diff["fid"].significant else "yes"


def ranking_markdown(rows: list[dict[str, Any]]) -> str:
    """The ranked table as markdown: metrics as estimate ± half their 95 % interval, and which
    trials are indistinguishable from the best (paired FID difference, ``tied_with_best``)."""
    from hdd_ray.evaluation.statistics import cell

    lines = ["| " + " | ".join(RANKING_COLUMNS) + " |", "|" + "---|" * len(RANKING_COLUMNS)]
    lines += ["| " + " | ".join(cell(r, c) for c in RANKING_COLUMNS) + " |" for r in rows]
    lines += ["", "± = half the 95 % bootstrap interval; fid_vs_best = paired FID difference "
              "from the best full-N trial (same prompts and noise); tied_with_best = yes when its "
              "interval contains 0. No correction for comparing many trials with the one that "
              "looked best: read 'no' as evidence, 'yes' as 'not separable at this N'."]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], k: int) -> bytes:
    """PNG: FID and CLIP score against the number of DDPM experts (every trial + the mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "fid", "FID (lower is better)"),
                           (axes[1], "clip_score", "CLIP score (higher is better)")):
        pts = [(r["num_ddpm"], r[key]) for r in rows if r.get(key) is not None
               and not r["stopped_early"]]
        early = [(r["num_ddpm"], r[key]) for r in rows if r.get(key) is not None
                 and r["stopped_early"]]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=18, label="trials")
            means = {n: [v for m, v in pts if m == n] for n in sorted({n for n, _ in pts})}
            ax.plot(list(means), [sum(v) / len(v) for v in means.values()], "-o", color="C1",
                    label="mean")
        if early:
            ax.scatter(*zip(*early, strict=True), s=12, marker="x", color="gray",
                       label="stopped early (fewer samples)")
        ax.set_xlabel(f"number of DDPM experts (of {k})")
        ax.set_ylabel(label)
        ax.set_xticks(range(k + 1))
        ax.grid(alpha=0.3)
    if rows:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(cfg: CampaignConfig, rows: list[dict[str, Any]], parent: str | None) -> str:
    """Ranking CSV + markdown, the plot and ``best_mixture.json``; artifacts of the sweep run."""
    import csv

    from hdd_ray.evaluation.statistics import interval_columns

    directory = CampaignPaths(storage.absolute(cfg.root)).sweep_dir(cfg.sweep.name)
    columns = interval_columns(RANKING_COLUMNS)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for r in rows:
        writer.writerow([r.get(c) for c in columns])
    md = ranking_markdown(rows)
    files = {"ranking.csv": buf.getvalue().encode(), "ranking.md": (md + "\n").encode(),
             "fid_clip_vs_num_ddpm.png": plot(rows, cfg.clustering.k)}
    best = next((r for r in rows if not r["stopped_early"]), None)
    if best is not None:
        files[BEST_FILE] = json.dumps(best_spec(cfg, best), indent=2).encode()
    for name, data in files.items():
        storage.write_bytes(storage.join(directory, name), data)
    if parent is not None:
        from hdd_ray import tracking

        run = tracking.Experiment(cfg).run(parent)
        for name, data in files.items():
            if name.endswith(".png"):
                run.log_image(data, artifact_file=name)
            else:
                run.log_text(data.decode(), name)
        if best is not None:
            run.log({"best_fid": float(best["fid"])},
                    tags={"best_assignment": best["assignment"]})
        run.finish()
    return md


def best_spec(cfg: CampaignConfig, row: dict[str, Any]) -> dict[str, Any]:
    """The JSON saved as ``best_mixture.json``: a full :class:`MixtureSpec` + the schedule."""
    return {
        "sweep": cfg.sweep.name, "assignment": row["assignment"],
        "schedule": row["schedule"],
        "spec": {"ddpm_clusters": row["ddpm_clusters"], "routing": row["routing"],
                 "k": int(row["k"]),
                 "threshold": cfg.sampling.threshold if row["routing"] == "threshold" else None,
                 "guidance": float(row["guidance"]), "steps": int(row["steps"]),
                 "num_samples": int(row["num_samples"]), "seed": cfg.sampling.seed},
        "metrics": {key: row.get(key) for key in ("fid_n", "fid", "fid_low", "fid_high",
                                                  "fid_floor", "clip_score", "clip_score_low",
                                                  "clip_score_high", "diversity", "diversity_low",
                                                  "diversity_high")},
        "mixture_id": row.get("mixture_id"), "trial_id": row.get("trial_id"),
    }


def load_mixture_spec(cfg: CampaignConfig, name_or_path: str) -> tuple[CampaignConfig, Any]:
    """A saved mixture -> ``(campaign variant, MixtureSpec)``.

    ``name_or_path`` is a sweep name (``<root>/sweeps/<name>/best_mixture.json``) or a path to
    such a JSON file. Raises :class:`SweepError` (one line) when it does not exist.
    """
    from hdd_ray.evaluation.mixture import MixtureSpec

    path = name_or_path
    if not (name_or_path.endswith(".json") and storage.exists(name_or_path)):
        path = storage.join(CampaignPaths(storage.absolute(cfg.root)).sweep_dir(name_or_path),
                            BEST_FILE)
    if not storage.exists(path):
        raise SweepError(f"--mixture {name_or_path!r}: no {path} (run jobs/sweep_objectives.py "
                         f"sweep.name={name_or_path} first, or give a JSON path)")
    saved = storage.read_json(path)
    spec = dict(saved["spec"])
    spec["ddpm_clusters"] = tuple(spec["ddpm_clusters"])
    for c in spec["ddpm_clusters"]:
        if not 0 <= c < cfg.clustering.k:
            raise ConfigError(f"{path}: cluster id {c} outside 0..{cfg.clustering.k - 1}")
    return with_assignment(cfg, spec["ddpm_clusters"], saved["schedule"]), MixtureSpec(**spec)


__all__ = [
    "SweepError", "SweepResult", "candidate_assignments",
    "load_mixture_spec", "needed_assignments", "param_space", "rank", "run_sweep",
    "sweep_trial", "train_needed_experts",
]
