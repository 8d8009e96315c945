"""Uncertainty of the mixture metrics: FID at a common n, bootstrap intervals, paired differences.

The protocol (``evaluation/README.md``, "Statistics"):

* **One n for FID and its floor.** FID is biased upward by roughly ``c / n``, so a FID and its
  floor are comparable only at the same n. The floor can use at most the held-out images, so both
  are taken at ``n = min(N, held-out)`` (:func:`comparable_n`). When ``n < N`` the FID is the mean
  over :data:`SUBSETS` random size-n subsets of the N samples (each an i.i.d. sample of size n,
  so the mean estimates ``E[FID_n]`` with less noise than one subset).
* **Bootstrap intervals.** :data:`REPLICATES` seeded resamples with replacement of the N samples
  (FID, CLIP score) and of the prompt groups (diversity, a mean over groups); each replicate
  recomputes the statistic from the per-sample data, so features are extracted once. The
  interval is the bootstrap's central 95 % placed at the estimate:
  ``[est + q_0.025 - mean*, est + q_0.975 - mean*]``. For a mean this is the percentile
  interval; for FID it removes the extra finite-n bias a resample with duplicates adds (a plain
  percentile interval of FID covers the truth far less often than 95 %).
* **Paired differences.** Two mixtures sampled from the same prompts (index by index) are
  resampled with the same indices; the difference of their replicates gives the interval of the
  difference, which is *significant* when it excludes 0.

What an interval covers: the sampling variability of the generator at this N (noise, and the
mix of prompts); not the noise of the reference statistics, the choice of held-out split, or
training variance (another training seed gives other experts).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from hdd_ray import devices

__all__ = [
    "CONFIDENCE",
    "REPLICATES",
    "SUBSETS",
    "BootstrapPlan",
    "FrechetReference",
    "Interval",
    "SampleScores",
    "bootstrap",
    "cell",
    "comparable_n",
    "fid_at_n",
    "fid_interval",
    "frechet_distance",
    "interval",
    "interval_columns",
    "paired_differences",
    "prompt_groups",
    "prompts_hash",
]

CONFIDENCE = 0.95
REPLICATES = 200
SUBSETS = 10
BOOTSTRAP_SEED = 0
METRICS = ("fid", "clip_score", "diversity")
#: the metrics rows carry with ``_low`` / ``_high`` bounds
INTERVAL_KEYS = (*METRICS, "fid_floor")
_CHUNK_ELEMENTS = 2**25  # gathered feature elements per batch of FIDs (256 MiB in float64)


# ------------------------------------------------------------------------------- intervals


@dataclass(frozen=True)
class Interval:
    """An estimate with its ``CONFIDENCE`` interval ``[low, high]``."""

    estimate: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        """Half the interval's width (the ``±`` printed in tables)."""
        return (self.high - self.low) / 2

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0 (for a difference: the two differ)."""
        return not self.low <= 0.0 <= self.high

    def text(self, digits: int = 3, signed: bool = False) -> str:
        """``0.409 ± 0.012`` (the ± is the half width; :meth:`as_dict` gives the exact ends)."""
        sign = "+" if signed else ""
        return f"{self.estimate:{sign}.{digits}f} ± {self.half_width:.{digits}f}"

    def as_dict(self, key: str) -> dict[str, float]:
        """``{key: estimate, key_low: low, key_high: high}``."""
        return {key: self.estimate, f"{key}_low": self.low, f"{key}_high": self.high}

    @classmethod
    def of(cls, row: dict, key: str) -> Interval | None:
        """The interval a metrics row holds for ``key`` (:meth:`as_dict`), or ``None``."""
        values = [row.get(k) for k in (key, f"{key}_low", f"{key}_high")]
        if any(not isinstance(v, int | float) for v in values):
            return None
        return cls(*(float(v) for v in values))


def cell(row: dict, key: str, digits: int = 3) -> str:
    """A table cell: ``0.409 ± 0.012`` when ``row`` holds an interval for ``key``, else the
    plain value."""
    iv = Interval.of(row, key)
    if iv is not None:
        return iv.text(digits)
    value = row.get(key)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def interval_columns(columns: Sequence[str]) -> list[str]:
    """CSV columns: each metric with an interval followed by its ``_low`` and ``_high``."""
    out: list[str] = []
    for c in columns:
        out += [c, f"{c}_low", f"{c}_high"] if c in INTERVAL_KEYS else [c]
    return out


def interval(estimate: float, replicates: Tensor, confidence: float = CONFIDENCE) -> Interval:
    """The bootstrap's central ``confidence`` range of ``replicates``, moved to ``estimate``:
    ``[est + q_lo - mean*, est + q_hi - mean*]`` (the percentile interval, bias-corrected)."""
    reps = replicates.double()
    alpha = (1.0 - confidence) / 2
    q = torch.quantile(reps, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    shift = estimate - float(reps.mean())
    return Interval(float(estimate), float(q[0]) + shift, float(q[1]) + shift)


# ------------------------------------------------------------------------------------- FID


@dataclass(frozen=True)
class FrechetReference:
    """Reference Gaussian for the Fréchet distance: mean ``[D]``, covariance ``[D, D]`` and its
    PSD square root (computed once, so a batch of FIDs costs one symmetric eigensolve each)."""

    mean: Tensor
    cov: Tensor
    cov_sqrt: Tensor

    @classmethod
    def from_moments(cls, mean: Tensor, cov: Tensor) -> FrechetReference:
        """From a mean and an (unbiased) covariance."""
        cov = cov.double()
        w, v = torch.linalg.eigh(cov)
        sqrt = (v * w.clamp(min=0).sqrt()[None]) @ v.T
        return cls(mean.double(), cov, sqrt)

    def to(self, device: torch.device | str) -> FrechetReference:
        """The same reference on ``device``."""
        return FrechetReference(self.mean.to(device), self.cov.to(device),
                                self.cov_sqrt.to(device))


def _moments(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[..., D]`` and unbiased covariance ``[..., D, D]`` of ``[..., n, D]`` features."""
    x = features.double()
    mu = x.mean(-2)
    xc = x - mu[..., None, :]
    return mu, xc.transpose(-1, -2) @ xc / (x.shape[-2] - 1)


def frechet_distance(features: Tensor, reference: FrechetReference) -> Tensor:
    """FID of each set of features ``[..., n, D]`` against ``reference`` -> ``[...]`` (float64).

    ``FID = |mu - mu_r|^2 + Tr(S) + Tr(S_r) - 2 Tr((S_r^(1/2) S S_r^(1/2))^(1/2))``, the same
    value as ``Tr((S_r S)^(1/2))`` (torchmetrics' and scipy's form) but through a symmetric
    eigensolve, which is stable and batches. Covariances are unbiased, as in torchmetrics.
    """
    mu, cov = _moments(features)
    root = reference.cov_sqrt
    inner = torch.linalg.eigvalsh(root @ cov @ root).clamp(min=0).sqrt().sum(-1)
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1) + reference.cov.trace()
    return ((mu - reference.mean) ** 2).sum(-1) + trace - 2 * inner


def _batched_fid(features: Tensor, index: Tensor, reference: FrechetReference,
                 device: torch.device | str | None = None) -> Tensor:
    """FIDs of ``features[index]`` for an index tensor ``[..., n]``, in memory-bounded chunks,
    computed on ``device`` (default: the features' own) -> CPU float64 ``[...]``."""
    device = torch.device(device) if device is not None else features.device
    feats, ref = features.double().to(device), reference.to(device)
    flat = index.reshape(-1, index.shape[-1]).to(device)
    per_chunk = max(1, _CHUNK_ELEMENTS // (flat.shape[1] * features.shape[1]))
    values = [frechet_distance(feats[flat[i : i + per_chunk]], ref).cpu()
              for i in range(0, flat.shape[0], per_chunk)]
    return torch.cat(values).reshape(index.shape[:-1])


def comparable_n(num_samples: int, num_heldout: int) -> int:
    """The n at which a FID of ``num_samples`` images and its floor are both taken."""
    return min(num_samples, num_heldout)


def _subsets(num: int, n: int, count: int, generator: torch.Generator) -> Tensor:
    """``[count, n]`` positions: ``count`` random size-``n`` subsets of ``range(num)``."""
    return torch.argsort(devices.rand((count, num), generator), dim=-1)[:, :n]


def fid_at_n(features: Tensor, reference: FrechetReference, n: int, subsets: int = SUBSETS,
             seed: int = BOOTSTRAP_SEED, device: torch.device | str | None = None) -> float:
    """FID at ``n`` of a feature set ``[N, D]`` (``n <= N``): of all of it when ``n == N``,
    otherwise the mean over ``subsets`` seeded random size-n subsets (an estimate of
    ``E[FID_n]``), computed on ``device`` (indices are drawn on the CPU)."""
    num = features.shape[0]
    if not 2 <= n <= num:
        raise ValueError(f"FID at n={n} needs 2 <= n <= {num} (the feature set's size)")
    if n == num:
        index = torch.arange(num)[None]
    else:
        index = _subsets(num, n, subsets, devices.generator(seed))
    return float(_batched_fid(features, index, reference, device).mean())


# ----------------------------------------------------------------------- per-sample data


def prompt_groups(prompts: Sequence[str]) -> tuple[Tensor, list[str]]:
    """The group (distinct prompt, in first-seen order) of each sample -> ``([N], texts)``."""
    order: dict[str, int] = {}
    group = [order.setdefault(p, len(order)) for p in prompts]
    return torch.tensor(group, dtype=torch.int64), list(order)


def prompts_hash(prompts: Sequence[str]) -> str:
    """sha256 (first 16 hex) of the prompt list: two mixtures pair index by index iff equal."""
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()[:16]


@dataclass
class SampleScores:
    """Per-sample data of one evaluated mixture, enough to recompute every statistic.

    ``features`` ``[N, D]`` (FID extractor), ``clip`` ``[N]`` (each sample's CLIP score against
    its prompt), ``group_diversity`` ``[G]`` (mean pairwise distance within each prompt group of
    two or more samples), ``prompts_hash`` (pairing key) and ``diversity_metric``.
    """

    features: Tensor
    clip: Tensor
    group_diversity: Tensor
    prompts_hash: str
    diversity_metric: str

    @property
    def num_samples(self) -> int:
        """N."""
        return int(self.features.shape[0])

    def to_bytes(self, replicates: dict[str, Tensor] | None = None,
                 plan: BootstrapPlan | None = None) -> bytes:
        """safetensors bytes (float32 features; replicates and their plan when given)."""
        tensors = {"features": self.features.float().contiguous(),
                   "clip": self.clip.double().contiguous(),
                   "group_diversity": self.group_diversity.double().contiguous()}
        tensors.update({f"replicates.{k}": v.double().contiguous()
                        for k, v in (replicates or {}).items()})
        meta = {"prompts_hash": self.prompts_hash, "diversity_metric": self.diversity_metric,
                "plan": json.dumps(plan.__dict__ if plan else None)}
        return save_safetensors(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, blob: bytes) -> tuple[SampleScores, dict[str, Tensor], BootstrapPlan | None]:
        """Inverse of :meth:`to_bytes` -> ``(scores, replicates, plan)``."""
        (length,) = struct.unpack("<Q", blob[:8])
        meta = json.loads(blob[8 : 8 + length]).get("__metadata__", {})
        tensors = load_safetensors(blob)
        scores = cls(tensors["features"], tensors["clip"], tensors["group_diversity"],
                     meta["prompts_hash"], meta["diversity_metric"])
        reps = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("replicates.")}
        plan = json.loads(meta.get("plan") or "null")
        return scores, reps, BootstrapPlan(**plan) if plan else None


# ------------------------------------------------------------------------------ bootstrap


@dataclass(frozen=True)
class BootstrapPlan:
    """What fixes the resampled indices: equal plans resample two mixtures identically."""

    num_samples: int
    num_groups: int
    n: int
    replicates: int = REPLICATES
    subsets: int = SUBSETS
    seed: int = BOOTSTRAP_SEED

    def indices(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(resample [B, N], fid_index [B, S, n], groups [B, G])``: per replicate, one resample
        of the N samples with replacement (CLIP score), ``S`` size-n subsets of that resample
        for FID (``S = 1``, the whole resample, when ``n == N``), and the prompt groups
        resampled with replacement (diversity)."""
        gen = devices.generator(self.seed)
        b, num = self.replicates, self.num_samples
        resample = devices.randint(num, (b, num), gen)
        if self.n == num:
            fid_index = resample[:, None, :]
        else:
            pos = torch.argsort(devices.rand((b, self.subsets, num), gen), dim=-1)
            fid_index = torch.gather(resample[:, None].expand(-1, self.subsets, -1), 2,
                                     pos[..., : self.n])
        groups = devices.randint(max(1, self.num_groups), (b, self.num_groups), gen)
        return resample, fid_index, groups


def fid_interval(features: Tensor, reference: FrechetReference, n: int,
                 plan: BootstrapPlan | None = None,
                 device: torch.device | str | None = None) -> tuple[Interval, Tensor]:
    """FID at ``n`` of a feature set ``[N, D]`` with its bootstrap interval -> ``(interval,
    replicates [B])`` (the floor's interval, and the FID part of :func:`bootstrap`). The
    ``B * S`` eigensolves of ``D x D`` run on ``device`` (a GPU for 2048-d Inception)."""
    plan = plan or BootstrapPlan(int(features.shape[0]), 0, n)
    _, fid_index, _ = plan.indices()
    reps = _batched_fid(features, fid_index, reference, device).mean(-1)
    estimate = fid_at_n(features, reference, n, plan.subsets, plan.seed, device)
    return interval(estimate, reps), reps


def bootstrap(scores: SampleScores, reference: FrechetReference, n: int,
              plan: BootstrapPlan | None = None, device: torch.device | str | None = None,
              ) -> tuple[dict[str, Interval], dict[str, Tensor], BootstrapPlan]:
    """Estimates, intervals and replicates of ``fid`` (at ``n``, computed on ``device``),
    ``clip_score`` and ``diversity`` -> ``(intervals, replicates [B] per metric, plan)``."""
    plan = plan or BootstrapPlan(scores.num_samples, int(scores.group_diversity.numel()), n)
    if (plan.num_samples, plan.num_groups, plan.n) != (
            scores.num_samples, int(scores.group_diversity.numel()), n):
        raise ValueError(f"bootstrap plan {plan} does not fit {scores.num_samples} samples, "
                         f"{scores.group_diversity.numel()} groups at n={n}")
    resample, _, groups = plan.indices()
    fid, fid_reps = fid_interval(scores.features, reference, n, plan, device)
    reps = {"fid": fid_reps, "clip_score": scores.clip.double()[resample].mean(-1),
            "diversity": scores.group_diversity.double()[groups].mean(-1)}
    intervals = {"fid": fid,
                 "clip_score": interval(float(scores.clip.double().mean()), reps["clip_score"]),
                 "diversity": interval(float(scores.group_diversity.double().mean()),
                                       reps["diversity"])}
    return intervals, reps, plan


def paired_differences(estimates_a: dict[str, float], replicates_a: dict[str, Tensor],
                       estimates_b: dict[str, float], replicates_b: dict[str, Tensor],
                       ) -> dict[str, Interval]:
    """``a - b`` per metric, with its interval, from two :func:`bootstrap` results made with the
    same plan (the same resampled indices) on mixtures paired index by index (same prompts):
    replicate ``i`` of the difference is ``replicate_a[i] - replicate_b[i]``."""
    return {k: interval(estimates_a[k] - estimates_b[k], replicates_a[k] - replicates_b[k])
            for k in METRICS if k in replicates_a and k in replicates_b}
