"""Evaluate a mixture: sample it, score it (FID with its floor, CLIP score, diversity), record it.

A mixture is a campaign + an objective assignment (which clusters use ``ddpm_eps``) + routing +
guidance + sampling steps + N samples. Its id hashes all of that plus the ids of the experts it
uses, so the same mixture is evaluated once (``mixtures/<id>/metrics.json`` is reused).

Protocol (``evaluation/README.md``): prompts are the held-out split's captions, cycled to N;
FID compares the samples with the training split's cached reference statistics, and the floor
is the FID of real held-out images (never trained on) against the same statistics (what a perfect
generator of new images would score), both at ``n = min(N, held-out)``; every metric carries a
95 % bootstrap interval, and the per-sample data (``per_sample.safetensors``) lets two mixtures
sampled from the same prompts be compared pairwise (:mod:`hdd_ray.evaluation.statistics`). The demo uses its own reference CLIP for
CLIP score and CLIP-FID; real campaigns point ``evaluation.clip_arch``/``clip_weights`` and
``evaluation.fid_extractor``/``extractor_weights`` at local weights.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hdd_ray import storage
from hdd_ray.campaign import (
    CampaignPaths,
    cluster_shards,
    expert_id,
    heldout_shards,
    load_manifest,
    router_id,
    short_hash,
    with_assignment,
)
from hdd_ray.choices import format_assignment
from hdd_ray.evaluation import statistics
from hdd_ray.evaluation.statistics import Interval
from hdd_ray.progress import Progress, sampling_progress

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
GRID_FILE = "grid.png"
SAMPLES_FILE = "per_sample.safetensors"
#: bumped when what ``metrics.json`` holds changes: a cached mixture of another version is
#: evaluated again (2: intervals, FID and floor at one n, per-sample data)
EVALUATION_VERSION = 2


@dataclass(frozen=True)
class MixtureSpec:
    """What defines one evaluated mixture (``None`` = the campaign config's value)."""

    ddpm_clusters: tuple[int, ...]
    routing: str
    k: int
    threshold: float | None
    guidance: float
    steps: int
    num_samples: int
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Any, ddpm_clusters: list[int] | None = None, **overrides) -> MixtureSpec:
        """The config's mixture (optionally another assignment or routing)."""
        s = cfg.sampling
        base = cls(
            ddpm_clusters=tuple(sorted(cfg.experts.ddpm_clusters if ddpm_clusters is None
                                       else ddpm_clusters)),
            routing=s.routing, k=s.k, threshold=s.threshold, guidance=s.guidance_scale,
            steps=s.steps, num_samples=cfg.evaluation.num_samples, seed=s.seed,
        )
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def assignment(self, num_clusters: int) -> str:
        """Readable objective per cluster, e.g. ``D F F D F F F F``."""
        return format_assignment(self.ddpm_clusters, num_clusters)


def mixture_id(cfg: Any, spec: MixtureSpec, expert_ids: list[str], router: str | None = None,
               device_type: str = "cpu") -> str:
    """Deterministic id of an evaluated mixture: the cache key of ``mixtures/<id>/``.

    It hashes everything its numbers depend on: the spec, the experts' ids, the router's id
    (``router``: a retrained router is evaluated again), the sampler, the conversion, the FID
    extractor and the CLIP model (architecture, and local weights by content: replaced weights
    are evaluated again), bf16 sampling when it applies (``device_type`` ``cuda``), and
    :data:`EVALUATION_VERSION`.
    """
    from hdd_ray.campaign import content_identity

    ev = cfg.evaluation
    bf16 = device_type == "cuda" and cfg.sampling.mixed_precision == "bf16"
    digest = short_hash({"spec": dataclasses.asdict(spec), "experts": expert_ids,
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


class Judge:
    """Everything that scores mixtures of one campaign, built once and shared by evaluations:
    held-out/train images, the CLIP model, the FID extractor and the cached reference stats.

    Its networks run on ``device`` (the mixtures it evaluates are sampled there too)."""

    def __init__(self, cfg: Any, device: str | torch.device = "cpu") -> None:
        from hdd_ray.evaluation import build_extractor, get_reference_clip, reference_stats
        from hdd_ray.samples import read_cluster

        self.cfg = cfg
        self.device = torch.device(device)
        manifest = load_manifest(cfg)
        size, ch = cfg.corpus.image_size, cfg.corpus.channels

        def read_images(shards: list[str]) -> Any:
            # latent space: the shards hold latents; FID, its floor and CLIP score compare
            # decoded images (VAE reconstructions) with decoded samples
            if manifest.get("latents"):
                from hdd_ray.samples import read_decoded

                return read_decoded(cfg, shards, self.device)
            return read_cluster(shards, size, ch, label=None)

        held = read_images(heldout_shards(cfg, manifest))
        train_shards = [s for c in range(cfg.clustering.k) for s in cluster_shards(cfg, manifest, c)]
        self.heldout = held
        self.data_hash = str(manifest["data_hash"])
        decoded: list[Any] = []  # not kept past __init__: the reference statistics suffice

        def train() -> Any:  # the training split is decoded only when a cache misses
            if not decoded:
                decoded.append(read_images(train_shards))
            return decoded[0]

        ev = cfg.evaluation
        self.clip_info: dict[str, Any] = {}
        if ev.clip_arch:  # a real CLIP (local weights or a named tag)
            from hdd_ray.towers import open_clip_model, open_clip_tokenizer

            keys = {"arch_key": "evaluation.clip_arch", "weights_key": "evaluation.clip_weights"}
            self.clip = open_clip_model(ev.clip_arch, ev.clip_weights, **keys).eval().to(device)
            self.tokenizer = open_clip_tokenizer(ev.clip_arch, keys["arch_key"])
        else:  # the demo's own reference CLIP, trained once per campaign
            self.clip, self.tokenizer, self.clip_info = get_reference_clip(
                cfg.root, lambda: train().images, lambda: train().captions, held.images,
                held.captions, data_hash=self.data_hash, device=self.device)
        clip_model = self.clip if ev.fid_extractor == "clip" and not ev.extractor_weights else None
        arch = ev.extractor_arch or (ev.clip_arch if ev.fid_extractor == "clip" else None)
        self.extractor = build_extractor(ev.fid_extractor, weights=ev.extractor_weights,
                                         arch=arch, clip_model=clip_model).to(self.device)
        self.reference = reference_stats(lambda: train().images, self.extractor, self.data_hash,
                                         cache_dir=CampaignPaths(cfg.root).reference_stats)
        #: whether the training split had to be decoded (a cache missed)
        self.decoded_train = bool(decoded)
        self.frechet = self.reference.frechet()
        self._floor: dict[int, Interval] = {}
        self._heldout_features: Tensor | None = None

    def prompts(self, n: int, per_prompt: int = 4) -> list[str]:
        """``n`` prompts from the held-out captions' distinct texts, each used at least
        ``per_prompt`` times when ``n`` allows (the intra-prompt diversity needs groups)."""
        distinct = sorted(set(self.heldout.captions))
        m = max(1, min(len(distinct), n // per_prompt))
        chosen = [distinct[round(i * len(distinct) / m)] for i in range(m)]  # spread evenly
        return [chosen[i % m] for i in range(n)]

    def floor(self, n: int) -> Interval:
        """FID of real held-out images against the training reference at ``n`` (at most the
        held-out count), with its bootstrap interval (:func:`statistics.fid_interval`)."""
        from hdd_ray.evaluation import extract_features

        if self._heldout_features is None:
            self._heldout_features = extract_features(self.extractor, self.heldout.images)
        if n not in self._floor:
            self._floor[n] = statistics.fid_interval(self._heldout_features, self.frechet, n,
                                                     device=self.device)[0]
        return self._floor[n]

    def sample_scores(self, samples: Tensor, prompts: list[str]) -> statistics.SampleScores:
        """The per-sample data of ``samples`` made from ``prompts`` (features, CLIP scores,
        per-prompt diversities): every statistic and interval is computed from it."""
        from hdd_ray.evaluation import clip_scores, extract_features, group_diversities

        group, _ = statistics.prompt_groups(prompts)
        members = [torch.nonzero(group == g).flatten() for g in range(int(group.max()) + 1)]
        div_name, div = group_diversities([samples[idx] for idx in members], self.extractor)
        return statistics.SampleScores(
            features=extract_features(self.extractor, samples),
            clip=clip_scores(samples, prompts, self.clip, self.tokenizer),
            group_diversity=div, prompts_hash=statistics.prompts_hash(prompts),
            diversity_metric=div_name)

    def summarize(self, scores: statistics.SampleScores) -> tuple[dict[str, Any],
                                                                   dict[str, Tensor],
                                                                   statistics.BootstrapPlan]:
        """Metrics with their 95 % intervals -> ``(metrics, bootstrap replicates, plan)``.

        FID and its floor are both taken at ``fid_n = min(N, held-out)``
        (``fid_full_n``: the FID of all N samples, not comparable with the floor when larger).
        """
        n = statistics.comparable_n(scores.num_samples, len(self.heldout))
        intervals, replicates, plan = statistics.bootstrap(scores, self.frechet, n,
                                                           device=self.device)
        metrics = {
            **intervals["fid"].as_dict("fid"), "fid_n": n,
            **self.floor(n).as_dict("fid_floor"),
            "fid_full_n": statistics.fid_at_n(scores.features, self.frechet, scores.num_samples,
                                              device=self.device),
            **intervals["clip_score"].as_dict("clip_score"),
            "clip_score_real": self._real_clip_score(),
            **intervals["diversity"].as_dict("diversity"),
            "diversity_metric": scores.diversity_metric,
            "bootstrap": {"replicates": plan.replicates, "seed": plan.seed,
                          "subsets": plan.subsets, "confidence": statistics.CONFIDENCE},
            "evaluation_version": EVALUATION_VERSION,
        }
        return metrics, replicates, plan

    def score(self, samples: Tensor, prompts: list[str]) -> dict[str, Any]:
        """FID and its floor (same n), CLIP score and diversity of ``samples`` made from
        ``prompts``, each with its 95 % interval (:meth:`summarize`)."""
        return self.summarize(self.sample_scores(samples, prompts))[0]

    def _real_clip_score(self) -> float:
        from hdd_ray.evaluation import clip_score

        if not hasattr(self, "_clip_real"):
            self._clip_real = clip_score(self.heldout.images, self.heldout.captions, self.clip,
                                         self.tokenizer)
        return self._clip_real


def save_grid(path: str, images: Tensor, prompts: list[str], per_row: int = 8, scale: int = 4) -> bytes:
    """A PNG grid (one row per distinct prompt, its text on the left); returns the PNG bytes."""
    from PIL import Image, ImageDraw

    rows: dict[str, list[Tensor]] = {}
    for img, p in zip(images, prompts, strict=True):
        if len(rows.get(p, [])) < per_row:
            rows.setdefault(p, []).append(img)
    rows = dict(list(rows.items())[:16])
    c, h, w = images.shape[1:]
    cell_h, cell_w, label_w = h * scale + 2, w * scale + 2, 220
    canvas = Image.new("RGB", (label_w + per_row * cell_w, max(1, len(rows)) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (prompt, imgs) in enumerate(rows.items()):
        draw.text((4, r * cell_h + cell_h // 2 - 5), prompt[:36], fill="black")
        for j, img in enumerate(imgs):
            arr = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            arr = arr[0].numpy() if c == 1 else arr.permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).convert("RGB").resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + j * cell_w + 1, r * cell_h + 1))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    storage.write_bytes(path, buf.getvalue())
    return buf.getvalue()


def evaluate_mixture(
    cfg: Any,
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
    ids = [expert_id(variant, e, manifest) for e in resolve_experts(variant)]
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
    mixture = load_mixture(cfg, spec.ddpm_clusters, judge.device)
    prompts = judge.prompts(spec.num_samples)
    started = time.time()
    steps = spec.steps or cfg.sampling.steps
    with sampling_progress(mixture, len(prompts), steps, cfg.sampling.sampler,
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
    grid = save_grid(storage.join(directory, GRID_FILE), samples, prompts)
    storage.write_bytes(storage.join(directory, SAMPLES_FILE), per_sample.to_bytes(replicates, plan))
    storage.write_json(storage.join(directory, METRICS_FILE), result)
    _track(cfg, result, grid, parent_run_id)
    return {**result, "reused": False}


def _track(cfg: Any, r: dict[str, Any], grid_png: bytes, parent_run_id: str | None) -> None:
    from hdd_ray import tracking

    tags = {"stage": "mixture", "extractor": r["extractor"], "num_samples": str(r["num_samples"]),
            "reference_hash": r["reference_hash"], "sampler": r["sampler"],
            "steps": str(r["steps"]), "guidance": str(r["guidance"]),
            "diversity_metric": r["diversity_metric"], "mixture_id": r["mixture_id"]}
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
        run.log_image(grid_png, key="samples")


COMPARISON_COLUMNS = ("assignment", "num_ddpm", "routing", "k", "guidance", "steps",
                      "num_samples", "fid_n", "fid", "fid_floor", "clip_score", "diversity")
_NAMES = {"fid": "FID", "clip_score": "CLIP score", "diversity": "diversity"}


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


def difference_line(a: dict[str, Any], b: dict[str, Any], mixtures_dir: str) -> str:
    """One line: ``a - b`` per metric with its interval and whether it is significant."""
    head = f"paired difference {a['assignment']} minus {b['assignment']}"
    diff = paired_difference(a, b, mixtures_dir)
    if diff is None:
        return f"{head}: not paired (different prompts, N or bootstrap plan, or no per-sample data)"
    noise = "same prompts and noise" if a.get("seed") == b.get("seed") else "same prompts"
    parts = [f"{_NAMES[k]} {iv.text(3, signed=True)} "
             f"({'significant' if iv.significant else 'not significant'})"
             for k, iv in diff.items()]
    return f"{head} ({noise}, FID at n={a.get('fid_n')}): " + ", ".join(parts)


def comparison_table(results: list[dict[str, Any]], directory: str) -> str:
    """The mixtures side by side, each metric as estimate ± half its 95 % interval, then a
    paired difference of each mixture minus the baseline (the all-FM mixture, else the last);
    writes ``comparison.csv`` (with the interval bounds) and ``comparison.md``; returns the
    markdown (the job prints it). ``directory`` holds the mixtures (``mixtures/``)."""
    columns = statistics.interval_columns(COMPARISON_COLUMNS)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for r in results:
        writer.writerow([r.get(c) for c in columns])
    storage.write_bytes(storage.join(directory, "comparison.csv"), buf.getvalue().encode())

    lines = ["| " + " | ".join(COMPARISON_COLUMNS) + " |",
             "|" + "---|" * len(COMPARISON_COLUMNS)]
    lines += ["| " + " | ".join(statistics.cell(r, c) for c in COMPARISON_COLUMNS) + " |"
              for r in results]
    lines.append("")
    lines.append("± = half the 95 % bootstrap interval; FID and its floor at n = fid_n "
                 "(evaluation/README.md, Statistics).")
    if len(results) > 1:
        base = next((r for r in results if r.get("num_ddpm") == 0), results[-1])
        lines += ["", *(difference_line(r, base, directory) for r in results if r is not base)]
    md = "\n".join(lines)
    storage.write_bytes(storage.join(directory, "comparison.md"), (md + "\n").encode())
    return md


def summary(result: dict[str, Any]) -> str:
    """One line of a mixture's metrics with their intervals (what the evaluation job prints)."""
    return (f"FID {statistics.cell(result, 'fid')} (floor {statistics.cell(result, 'fid_floor')}"
            f", both at n = {result.get('fid_n')}; all N = {result.get('num_samples')}: "
            f"{statistics.cell(result, 'fid_full_n')}), CLIP score "
            f"{statistics.cell(result, 'clip_score')}, {result.get('diversity_metric')} "
            f"{statistics.cell(result, 'diversity')} (± = half the 95 % interval)")
