"""Evaluate a mixture: sample it, score it (FID with its floor, CLIP score, diversity), record it.

A mixture is a campaign + an objective assignment (which clusters use ``ddpm_eps``) + routing +
guidance + sampling steps + N samples. Its id hashes all of that plus the ids of the experts it
uses, so the same mixture is evaluated once (``mixtures/<id>/metrics.json`` is reused).

Protocol (``evaluation/README.md``): prompts are the held-out split's captions, cycled to N;
FID compares the N samples with the training split's cached reference statistics, and the floor
is the FID of real held-out images (never trained on) against the same statistics at the same N
(what a perfect generator of new images would score). The demo uses its own reference CLIP for
CLIP score and CLIP-FID; real campaigns point ``evaluation.clip_arch``/``clip_weights`` and
``evaluation.fid_extractor``/``extractor_weights`` at local weights.
"""

from __future__ import annotations

import csv
import dataclasses
import io
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
    format_assignment,
    heldout_shards,
    load_manifest,
    short_hash,
    with_assignment,
)

METRICS_FILE = "metrics.json"
GRID_FILE = "grid.png"


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


def mixture_id(cfg: Any, spec: MixtureSpec, expert_ids: list[str]) -> str:
    """Deterministic id of an evaluated mixture."""
    digest = short_hash({"spec": dataclasses.asdict(spec), "experts": expert_ids,
                         "sampler": cfg.sampling.sampler, "shift": cfg.sampling.time_shift,
                         "conversion": dataclasses.asdict(cfg.sampling.conversion),
                         "extractor": cfg.evaluation.fid_extractor})
    return f"d{len(spec.ddpm_clusters)}-{spec.routing}-{digest}"


class Judge:
    """Everything that scores mixtures of one campaign, built once and shared by evaluations:
    held-out/train images, the CLIP model, the FID extractor and the cached reference stats."""

    def __init__(self, cfg: Any) -> None:
        from hdd_ray.evaluation import build_extractor, get_reference_clip, reference_stats
        from hdd_ray.training.data import read_cluster

        self.cfg = cfg
        manifest = load_manifest(cfg)
        size, ch = cfg.corpus.image_size, cfg.corpus.channels
        held = read_cluster(heldout_shards(cfg, manifest), size, ch, label=None)
        train_shards = [s for c in range(cfg.clustering.k) for s in cluster_shards(cfg, manifest, c)]
        self.heldout = held
        self.data_hash = str(manifest["data_hash"])
        decoded: list[Any] = []  # not kept past __init__: the reference statistics suffice

        def train() -> Any:  # the training split is decoded only when a cache misses
            if not decoded:
                decoded.append(read_cluster(train_shards, size, ch, label=None))
            return decoded[0]

        ev = cfg.evaluation
        self.clip_info: dict[str, Any] = {}
        if ev.clip_arch:  # a real CLIP (local weights or a named tag)
            from hdd_ray.towers import open_clip_model, open_clip_tokenizer

            keys = {"arch_key": "evaluation.clip_arch", "weights_key": "evaluation.clip_weights"}
            self.clip = open_clip_model(ev.clip_arch, ev.clip_weights, **keys).eval()
            self.tokenizer = open_clip_tokenizer(ev.clip_arch, keys["arch_key"])
        else:  # the demo's own reference CLIP, trained once per campaign
            self.clip, self.tokenizer, self.clip_info = get_reference_clip(
                cfg.root, lambda: train().images, lambda: train().captions, held.images,
                held.captions, data_hash=self.data_hash)
        clip_model = self.clip if ev.fid_extractor == "clip" and not ev.extractor_weights else None
        arch = ev.extractor_arch or (ev.clip_arch if ev.fid_extractor == "clip" else None)
        self.extractor = build_extractor(ev.fid_extractor, weights=ev.extractor_weights,
                                         arch=arch, clip_model=clip_model)
        self.reference = reference_stats(lambda: train().images, self.extractor, self.data_hash,
                                         cache_dir=CampaignPaths(cfg.root).reference_stats)
        #: whether the training split had to be decoded (a cache missed)
        self.decoded_train = bool(decoded)
        self._floor: dict[int, float] = {}

    def prompts(self, n: int, per_prompt: int = 4) -> list[str]:
        """``n`` prompts from the held-out captions' distinct texts, each used at least
        ``per_prompt`` times when ``n`` allows (the intra-prompt diversity needs groups)."""
        distinct = sorted(set(self.heldout.captions))
        m = max(1, min(len(distinct), n // per_prompt))
        chosen = [distinct[round(i * len(distinct) / m)] for i in range(m)]  # spread evenly
        return [chosen[i % m] for i in range(n)]

    def floor(self, n: int) -> float:
        """FID of real held-out images (at most ``n``) against the training reference."""
        from hdd_ray.evaluation import fid_floor

        if n not in self._floor:
            self._floor[n] = fid_floor(self.heldout.images, self.reference, self.extractor,
                                       num_samples=min(n, len(self.heldout)))
        return self._floor[n]

    def score(self, samples: Tensor, prompts: list[str]) -> dict[str, Any]:
        """FID, its floor, CLIP score and diversity of ``samples`` made from ``prompts``."""
        from hdd_ray.evaluation import clip_score, diversity, fid

        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        div_name, div = diversity([samples[idx] for idx in groups.values()], self.extractor)
        return {
            "fid": fid(samples, self.reference, self.extractor),
            "fid_floor": self.floor(len(samples)),
            "clip_score": clip_score(samples, prompts, self.clip, self.tokenizer),
            "clip_score_real": self._real_clip_score(),
            "diversity": div,
            "diversity_metric": div_name,
        }

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
) -> dict[str, Any]:
    """Sample and score one mixture; writes ``mixtures/<id>/`` and an MLflow run.

    Returns the metrics dict (also ``mixtures/<id>/metrics.json``); reuses it unless ``force``.
    """
    from hdd_ray.config import resolve_experts
    from hdd_ray.ensemble import load_mixture

    manifest = load_manifest(cfg)
    variant = with_assignment(cfg, list(spec.ddpm_clusters))
    ids = [expert_id(variant, e, manifest) for e in resolve_experts(variant)]
    mid = mixture_id(cfg, spec, ids)
    directory = CampaignPaths(cfg.root).mixture_dir(mid)
    metrics_path = storage.join(directory, METRICS_FILE)
    if not force and storage.exists(metrics_path):
        return {**storage.read_json(metrics_path), "reused": True}

    judge = judge or Judge(cfg)
    mixture = load_mixture(cfg, spec.ddpm_clusters)
    prompts = judge.prompts(spec.num_samples)
    started = time.time()
    samples = mixture.sample(prompts, seed=spec.seed, strategy=spec.routing, k=spec.k,
                             threshold=spec.threshold, guidance=spec.guidance, steps=spec.steps)
    sample_s = time.time() - started
    scores = judge.score(samples, prompts)
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
        metrics = {key: r[key] for key in ("fid", "fid_floor", "clip_score", "clip_score_real",
                                           "diversity", "images_per_second") if r.get(key) is not None}
        metrics.update({f"expert_share_{i}": v for i, v in enumerate(r["expert_share"])})
        if r.get("reference_clip_retrieval") is not None:
            metrics["reference_clip_retrieval"] = r["reference_clip_retrieval"]
        run.log(metrics, params={
            "assignment": r["assignment"], "num_ddpm": r["num_ddpm"], "routing": r["routing"],
            "k": r["k"], "threshold": r["threshold"], "guidance": r["guidance"],
            "steps": r["steps"], "num_samples": r["num_samples"], "seed": r["seed"]})
        run.log_image(grid_png, key="samples")


COMPARISON_COLUMNS = ("assignment", "num_ddpm", "routing", "k", "guidance", "steps",
                      "num_samples", "fid", "fid_floor", "clip_score", "diversity")


def comparison_table(results: list[dict[str, Any]], directory: str) -> str:
    """The mixtures side by side: writes ``comparison.csv`` and ``comparison.md``; returns the
    markdown (the job prints it)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(COMPARISON_COLUMNS)
    for r in results:
        writer.writerow([r.get(c) for c in COMPARISON_COLUMNS])
    storage.write_bytes(storage.join(directory, "comparison.csv"), buf.getvalue().encode())

    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(COMPARISON_COLUMNS) + " |",
             "|" + "---|" * len(COMPARISON_COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in COMPARISON_COLUMNS) + " |" for r in results]
    md = "\n".join(lines)
    storage.write_bytes(storage.join(directory, "comparison.md"), (md + "\n").encode())
    return md
