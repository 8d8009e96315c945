"""Evaluate a mixture: sample it, score it (FID with its floor, CLIP score, diversity), record it.

A mixture is a campaign + a :class:`~hdd_ray.ensemble.MixtureSpec` (objective assignment, routing,
guidance, sampling steps, N samples). Its id hashes all of that plus the ids of the experts it
uses, so the same mixture is evaluated once (``mixtures/<id>/metrics.json`` is reused).

Protocol (``evaluation/README.md``): prompts are the held-out split's captions, cycled to N;
FID compares the samples with the training split's cached reference statistics, and the floor
is the FID of real held-out images (never trained on) against the same statistics (what a perfect
generator of new images would score), both at ``n = min(N, held-out)``; every metric carries a
95 % bootstrap interval, and the per-sample data (``per_sample.safetensors``) lets two mixtures
sampled from the same prompts be compared pairwise (:func:`paired_difference`). The
scoring is the :class:`~hdd_ray.evaluation.judge.Judge`'s; the tables that show the results are
:mod:`hdd_ray.evaluation.tables`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hdd_ray import storage
from hdd_ray.campaign import (
    CampaignPaths,
    expert_id,
    load_manifest,
    router_id,
    short_hash,
    with_assignment,
)
from hdd_ray.evaluation import statistics
from hdd_ray.evaluation.grids import save_grid
from hdd_ray.evaluation.judge import EVALUATION_VERSION, Judge
from hdd_ray.evaluation.statistics import Interval
from hdd_ray.progress import Progress, sampling_progress

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig
    from hdd_ray.ensemble import MixtureSpec

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
GRID_FILE = "grid.png"
#: pages of an evaluated mixture's grid (16 prompts each): a look at the samples, not all of
#: them; the log says when prompts are left out
GRID_PAGES = 2
SAMPLES_FILE = "per_sample.safetensors"


def mixture_id(cfg: CampaignConfig, spec: MixtureSpec, expert_ids: list[str],
               router: str | None = None, device_type: str = "cpu") -> str:
    """Deterministic id of an evaluated mixture: the cache key of ``mixtures/<id>/``.

    It hashes everything its numbers depend on: the spec (its left-out experts too), the ids
    of the experts it uses, the router's id
    (``router``: a retrained router is evaluated again), the sampler, the conversion, the FID
    extractor and the CLIP model (architecture, and local weights by content: replaced weights
    are evaluated again), bf16 sampling when it applies (``device_type`` ``cuda``), and
    :data:`EVALUATION_VERSION`.
    """
    from hdd_ray.campaign import content_identity

    ev = cfg.evaluation
    bf16 = device_type == "cuda" and cfg.sampling.mixed_precision == "bf16"
    described = dataclasses.asdict(spec)
    if not spec.retired:  # a mixture of every expert keeps the id it had before retirement
        del described["retired"]
    if spec.router == "learned":  # the learned router keeps the id it had before the other
        del described["router"], described["temperature"]
    digest = short_hash({"spec": described, "experts": expert_ids,
                         "sampler": cfg.sampling.sampler, "shift": cfg.sampling.time_shift,
                         "conversion": dataclasses.asdict(cfg.sampling.conversion),
                         "extractor": ev.fid_extractor, "router": router,
                         "extractor_arch": content_identity(ev.extractor_arch),
                         "extractor_weights": content_identity(ev.extractor_weights),
                         "clip_arch": content_identity(ev.clip_arch),
                         "clip_weights": content_identity(ev.clip_weights),
                         "precision": "bf16" if bf16 else "fp32",
                         "evaluation_version": EVALUATION_VERSION})
    return f"d{len(spec.ddpm_clusters)}-{spec.routing}-{digest}"


def _with_router(cfg: CampaignConfig, spec: MixtureSpec) -> CampaignConfig:
    """``cfg`` routing as ``spec`` says (``sampling.router`` and the centroid temperature)."""
    if spec.router == cfg.sampling.router and spec.router == "learned":
        return cfg
    return dataclasses.replace(cfg, sampling=dataclasses.replace(
        cfg.sampling, router=spec.router,
        centroid_temperature=spec.temperature or cfg.sampling.centroid_temperature))


def evaluate_mixture(
    cfg: CampaignConfig,
    spec: MixtureSpec,
    judge: Judge | None = None,
    parent_run_id: str | None = None,
    force: bool = False,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Sample and score one mixture; writes ``mixtures/<id>/`` and an MLflow run.

    Everything runs on the ``judge``'s device (a new judge is built on ``device``).

    Returns the metrics dict (also ``mixtures/<id>/metrics.json``); reuses it unless ``force``.
    """
    from hdd_ray.config import resolve_experts
    from hdd_ray.ensemble import load_mixture

    manifest = load_manifest(cfg)
    variant = with_assignment(cfg, list(spec.ddpm_clusters))
    ids = [expert_id(variant, e, manifest) for e in resolve_experts(variant)
           if e.cluster not in spec.retired]
    device_type = (judge.device if judge is not None else torch.device(device)).type
    mid = mixture_id(cfg, spec, ids, router=router_id(cfg, manifest), device_type=device_type)
    directory = CampaignPaths(cfg.root).mixture_dir(mid)
    metrics_path = storage.join(directory, METRICS_FILE)
    if not force and storage.exists(metrics_path):
        cached = storage.read_json(metrics_path)
        # a mixture evaluated by an older version lacks intervals and per-sample data: redo it
        if (cached.get("evaluation_version") == EVALUATION_VERSION
                and storage.exists(storage.join(directory, SAMPLES_FILE))):
            return {**cached, "reused": True}
        log.info("mixture %s: cached metrics are of evaluation version %s, not %s; "
                    "evaluating again", mid, cached.get("evaluation_version"), EVALUATION_VERSION)

    judge = judge or Judge(cfg, device)
    cfg = _with_router(cfg, spec)
    mixture = load_mixture(cfg, spec.ddpm_clusters, judge.device, retired=spec.retired)
    prompts = judge.prompts(spec.num_samples)
    started = time.time()
    with sampling_progress(mixture, len(prompts), spec.steps, cfg.sampling.sampler,
                           cfg.sampling.batch_size, f"sampling {spec.assignment(cfg.clustering.k)}"):
        samples = mixture.sample(prompts, seed=spec.seed, strategy=spec.routing, k=spec.k,
                                 threshold=spec.threshold, guidance=spec.guidance,
                                 steps=spec.steps)
    sample_s = time.time() - started
    with Progress(2, f"scoring {spec.assignment(cfg.clustering.k)}", unit="stages",
                  interval_s=5.0) as scoring:
        per_sample = judge.sample_scores(samples, prompts)  # features, CLIP, diversity
        scoring.update()
        started = time.time()
        scores, replicates, plan = judge.summarize(per_sample)  # bootstrap intervals
        scoring.update()
    scores["statistics_seconds"] = time.time() - started
    evals = mixture.last_evaluations
    total = max(1, sum(evals))
    k = cfg.clustering.k
    result = {
        "mixture_id": mid,
        "assignment": spec.assignment(k),
        "num_ddpm": len(spec.ddpm_clusters),
        **dataclasses.asdict(spec),
        "ddpm_clusters": list(spec.ddpm_clusters),
        "retired": list(spec.retired),
        "experts": ids,
        **scores,
        "expert_share": [e / total for e in evals],
        "expert_evaluations": evals,
        "sampling_seconds": sample_s,
        "images_per_second": len(samples) / sample_s if sample_s > 0 else 0.0,
        "sampler": cfg.sampling.sampler,
        "extractor": judge.extractor.name,
        "reference_hash": judge.data_hash,
        "reference_clip_retrieval": judge.clip_info.get("retrieval_top1"),
    }
    grid = save_grid(storage.join(directory, GRID_FILE), samples, prompts,
                     max_pages=GRID_PAGES)
    storage.write_bytes(storage.join(directory, SAMPLES_FILE), per_sample.to_bytes(replicates, plan))
    storage.write_json(storage.join(directory, METRICS_FILE), result)
    _track(cfg, result, grid, parent_run_id)
    return {**result, "reused": False}


def _track(cfg: CampaignConfig, r: dict[str, Any], grid_pngs: list[bytes],
           parent_run_id: str | None) -> None:
    from hdd_ray import tracking

    tags = {"stage": "mixture", "extractor": r["extractor"], "num_samples": str(r["num_samples"]),
            "reference_hash": r["reference_hash"], "sampler": r["sampler"],
            "steps": str(r["steps"]), "guidance": str(r["guidance"]),
            "diversity_metric": r["diversity_metric"], "mixture_id": r["mixture_id"],
            "experts": ",".join(r["experts"])}
    name = f"mixture {r['assignment']} {r['routing']}"
    with tracking.run(cfg, name, tags, parent_run_id=parent_run_id) as run:
        if run is None:
            return
        keys = statistics.interval_columns(("fid", "fid_floor", "clip_score", "diversity"))
        metrics = {key: r[key] for key in (*keys, "fid_n", "fid_full_n", "clip_score_real",
                                           "images_per_second") if r.get(key) is not None}
        metrics.update({f"expert_share_{i}": v for i, v in enumerate(r["expert_share"])})
        if r.get("reference_clip_retrieval") is not None:
            metrics["reference_clip_retrieval"] = r["reference_clip_retrieval"]
        run.log(metrics, params={
            "assignment": r["assignment"], "num_ddpm": r["num_ddpm"], "routing": r["routing"],
            "k": r["k"], "threshold": r["threshold"], "guidance": r["guidance"],
            "steps": r["steps"], "num_samples": r["num_samples"], "seed": r["seed"]})
        for page, png in enumerate(grid_pngs):
            run.log_image(png, key="samples" if page == 0 else f"samples_p{page + 1}")


def load_per_sample(mixtures_dir: str, mixture_id: str) -> tuple[
        statistics.SampleScores, dict[str, Tensor], statistics.BootstrapPlan | None] | None:
    """A mixture's per-sample data, replicates and bootstrap plan, or ``None`` if not saved."""
    path = storage.join(mixtures_dir, mixture_id, SAMPLES_FILE)
    if not storage.exists(path):
        return None
    return statistics.SampleScores.from_bytes(storage.read_bytes(path))


def paired_difference(a: dict[str, Any], b: dict[str, Any],
                      mixtures_dir: str) -> dict[str, Interval] | None:
    """``a - b`` (metrics rows of two evaluated mixtures) per metric with its paired 95 %
    interval, or ``None`` when they do not pair: per-sample data missing, other prompts, or
    another bootstrap plan (N, n, replicates, seed)."""
    la, lb = (load_per_sample(mixtures_dir, r["mixture_id"]) for r in (a, b))
    if la is None or lb is None:
        return None
    (sa, ra, pa), (sb, rb, pb) = la, lb
    if pa is None or pa != pb or sa.prompts_hash != sb.prompts_hash:
        return None
    keys = statistics.METRICS
    return statistics.paired_differences({k: a[k] for k in keys}, ra, {k: b[k] for k in keys}, rb)
