"""A sweep's results: the ranked table (best first, with intervals and the paired FID
difference from the best trial), the plot, and the files and MLflow artifacts that hold them."""

from __future__ import annotations

import io
import json
from typing import Any

from hdd_ray import storage
from hdd_ray.campaign import CampaignPaths
from hdd_ray.choices import format_assignment
from hdd_ray.config import CampaignConfig
from hdd_ray.sweep.best import BEST_FILE, best_spec
from hdd_ray.sweep.space import rungs, trial_assignment, trial_retired

RANKING_COLUMNS = ("rank", "assignment", "num_ddpm", "schedule", "routing", "k", "guidance",
                   "steps", "num_samples", "fid_n", "fid", "fid_floor", "fid_vs_best",
                   "tied_with_best", "clip_score", "diversity", "stopped_early", "trial_id")


def rank(grid: Any, cfg: CampaignConfig) -> list[dict[str, Any]]:
    """One row per finished trial, best first: full-N trials by FID, then early-stopped ones."""
    full = rungs(cfg)[-1]
    rows = []
    for result in grid:
        m, c = result.metrics or {}, result.config or {}
        if "fid" not in m:
            continue
        ddpm, retired = trial_assignment(c, cfg.clustering.k), trial_retired(c)
        rows.append({
            "assignment": format_assignment(ddpm, cfg.clustering.k, retired),
            "num_ddpm": len(ddpm), "retired": retired,
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
