"""The judge of a campaign's mixtures: what scores samples, built once and shared.

A :class:`Judge` holds the first ``max(evaluation.num_samples, HELDOUT_MIN)`` samples of the
held-out split (their captions are the prompts, their images give the FID floor), the
CLIP model (a real one from ``evaluation.clip_arch``/``clip_weights``, or the demo's reference
CLIP, trained once per campaign on at most
:data:`~hdd_ray.evaluation.reference_clip.MAX_TRAIN_SAMPLES` training samples, every cluster in
proportion, and cached), the
FID feature extractor and the training split's reference statistics (running sums over the
whole split, read a batch at a time; cached under ``<root>/evaluation/``: the training split is
read only when a cache misses). Nothing it holds grows with the splits' sizes. Protocol: ``evaluation/README.md``. It turns samples into
per-sample scores (features, CLIP scores, per-prompt diversities) and those into metrics with
their 95 % bootstrap intervals (:mod:`hdd_ray.evaluation.statistics`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hdd_ray.campaign import (
    CampaignPaths,
    cluster_info,
    cluster_shards,
    heldout_shards,
    load_manifest,
)
from hdd_ray.evaluation import statistics
from hdd_ray.evaluation.statistics import Interval

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig
    from hdd_ray.samples import ClusterData

__all__ = ["EVALUATION_VERSION", "HELDOUT_MIN", "Judge", "training_sample"]

#: held-out samples the judge keeps at least (more when ``evaluation.num_samples`` is larger):
#: the FID floor and ``fid_n`` of an evaluation with more samples stop at this many
HELDOUT_MIN = 4096

#: bumped when what ``metrics.json`` holds changes: a cached mixture of another version is
#: evaluated again (2: intervals, FID and floor at one n, per-sample data; 3: the held-out
#: split read up to evaluation.num_samples, the reference statistics batch by batch)
EVALUATION_VERSION = 3


def training_sample(cfg: CampaignConfig, manifest: dict[str, Any], limit: int,
                    device: str | torch.device = "cpu") -> ClusterData:
    """At most ``limit`` samples of the training split as evaluation compares them, every
    cluster in proportion to its size (the first samples of each): a bounded sample of a large
    split that still covers every cluster (the whole split when it is smaller)."""
    from hdd_ray.samples import ClusterData, read_images

    counts = [int(cluster_info(manifest, c)["count"]) for c in range(cfg.clustering.k)]
    total = max(1, sum(counts))
    parts = [read_images(cfg, cluster_shards(cfg, manifest, c), manifest.get("latents"), device,
                         limit=max(1, limit * n // total))
             for c, n in enumerate(counts) if n > 0]
    return ClusterData(torch.cat([p.images for p in parts]),
                       [cap for p in parts for cap in p.captions],
                       torch.cat([p.labels for p in parts]))


class Judge:
    """Everything that scores mixtures of one campaign, built once and shared by evaluations:
    held-out/train images, the CLIP model, the FID extractor and the cached reference stats.

    Its networks run on ``device`` (the mixtures it evaluates are sampled there too)."""

    def __init__(self, cfg: CampaignConfig, device: str | torch.device = "cpu") -> None:
        from hdd_ray.evaluation import build_extractor, get_reference_clip, reference_stats
        from hdd_ray.evaluation.reference_clip import MAX_TRAIN_SAMPLES
        from hdd_ray.samples import iter_images, read_images

        self.cfg = cfg
        self.device = torch.device(device)
        manifest = load_manifest(cfg)
        # latent space: the shards hold latents; FID, its floor and CLIP score compare decoded
        # images (VAE reconstructions, decoded a batch at a time) with decoded samples
        latents = manifest.get("latents")
        ev = cfg.evaluation
        held = read_images(cfg, heldout_shards(cfg, manifest), latents, self.device,
                           limit=max(int(ev.num_samples), HELDOUT_MIN))
        train_shards = [s for c in range(cfg.clustering.k) for s in cluster_shards(cfg, manifest, c)]
        self.heldout = held
        self.data_hash = str(manifest["data_hash"])
        read: list[ClusterData] = []  # the reference CLIP's sample: not kept past __init__
        #: whether the training split had to be read (a cache missed)
        self.decoded_train = False

        def clip_sample() -> ClusterData:
            self.decoded_train = True
            if not read:
                read.append(training_sample(cfg, manifest, MAX_TRAIN_SAMPLES, self.device))
            return read[0]

        def train_batches() -> Iterator[Tensor]:
            self.decoded_train = True
            return (b.images for b in iter_images(cfg, train_shards, latents, self.device))

        self.clip_info: dict[str, Any] = {}
        if ev.clip_arch:  # a real CLIP (local weights or a named tag)
            from hdd_ray.towers import open_clip_model, open_clip_tokenizer

            keys = {"arch_key": "evaluation.clip_arch", "weights_key": "evaluation.clip_weights"}
            self.clip = open_clip_model(ev.clip_arch, ev.clip_weights, **keys).eval().to(device)
            self.tokenizer = open_clip_tokenizer(ev.clip_arch, keys["arch_key"])
        else:  # the demo's own reference CLIP, trained once per campaign
            self.clip, self.tokenizer, self.clip_info = get_reference_clip(
                cfg.root, lambda: clip_sample().images, lambda: clip_sample().captions, held.images,
                held.captions, data_hash=self.data_hash, device=self.device)
        clip_model = self.clip if ev.fid_extractor == "clip" and not ev.extractor_weights else None
        arch = ev.extractor_arch or (ev.clip_arch if ev.fid_extractor == "clip" else None)
        self.extractor = build_extractor(ev.fid_extractor, weights=ev.extractor_weights,
                                         arch=arch, clip_model=clip_model).to(self.device)
        self.reference = reference_stats(train_batches, self.extractor, self.data_hash,
                                         cache_dir=CampaignPaths(cfg.root).reference_stats)
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

    def _real_clip_score(self) -> float:
        from hdd_ray.evaluation import clip_score

        if not hasattr(self, "_clip_real"):
            self._clip_real = clip_score(self.heldout.images, self.heldout.captions, self.clip,
                                         self.tokenizer)
        return self._clip_real
