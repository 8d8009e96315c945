"""Evaluate one mixture of a trained campaign: FID (with its floor), CLIP score, diversity.

    python evaluation/evaluate_mixture.py                                   # the demo's mixture
    python evaluation/evaluate_mixture.py --ddpm-clusters 0,3 --routing topk --k 2 --guidance 2
    python evaluation/evaluate_mixture.py --ddpm-clusters none --routing top1   # all-FM, top-1
    python evaluation/evaluate_mixture.py --mixture objectives     # a sweep's best mixture
    python evaluation/evaluate_mixture.py --mixture path/to/best_mixture.json --num-samples 2000
    python evaluation/evaluate_mixture.py --config jobs/configs/<campaign>.yaml root=s3://bucket/c
    ray job submit --working-dir . -- python evaluation/evaluate_mixture.py --ddpm-clusters 0,3

Writes ``<root>/mixtures/<id>/metrics.json`` + ``grid.png`` + ``per_sample.safetensors`` and an
MLflow run (metrics ``fid``, ``fid_floor`` (both at n = ``fid_n``), ``clip_score``, ``diversity``,
each with ``_low``/``_high`` 95 % bounds, per-expert routing shares; the sample grid; the
evaluation settings as tags), and prints them with their intervals. Every expert of the
assignment must already be trained.
"""

from __future__ import annotations

import json
import sys

from hdd_ray.choices import STRATEGIES
from hdd_ray.cli import parse_job_args


def _clusters(text: str | None) -> list[int] | None:
    if text is None:
        return None
    if text.strip().lower() in ("", "none", "[]"):
        return []
    try:
        return [int(c) for c in text.replace("[", "").replace("]", "").split(",") if c.strip()]
    except ValueError:
        raise SystemExit(f"error: --ddpm-clusters {text!r}: expected comma-separated ids") from None


def main(argv: list[str] | None = None) -> int:
    """Evaluate the mixture; returns the process exit status."""
    cfg, args = parse_job_args(__doc__, argv, extra=[
        ("--mixture", {"default": None, "help": "a saved mixture: sweep name (its "
                       "best_mixture.json) or a JSON path; the other flags override it"}),
        ("--ddpm-clusters", {"default": None, "help": "clusters using ddpm_eps, e.g. 0,3 or none"}),
        ("--routing", {"default": None, "choices": list(STRATEGIES)}),
        ("--k", {"type": int, "default": None}),
        ("--threshold", {"type": float, "default": None}),
        ("--guidance", {"type": float, "default": None}),
        ("--steps", {"type": int, "default": None}),
        ("--num-samples", {"type": int, "default": None}),
        ("--device", {"default": "auto", "help": "where to sample and score: cpu, cuda, "
                      "cuda:<i>, or auto (cuda when this machine has one)"}),
    ])
    from hdd_ray.devices import resolve_device
    from hdd_ray.ensemble import MixtureSpec
    from hdd_ray.errors import CampaignError, ConfigError, MixtureError, SweepError
    from hdd_ray.evaluation.mixture import evaluate_mixture
    from hdd_ray.evaluation.tables import summary

    ddpm = _clusters(args.ddpm_clusters)
    for c in ddpm or []:
        if not 0 <= c < cfg.clustering.k:
            print(f"error: --ddpm-clusters: cluster id {c} outside 0..{cfg.clustering.k - 1}",
                  file=sys.stderr)
            return 2
    try:
        if args.mixture:
            from hdd_ray.sweep import load_mixture_spec

            cfg, spec = load_mixture_spec(cfg, args.mixture)
        else:
            spec = MixtureSpec.from_config(cfg)
        # the flags given replace the saved or configured values; the routing is checked
        spec = spec.override(cfg.clustering.k, "--", ddpm_clusters=ddpm, routing=args.routing,
                             k=args.k, threshold=args.threshold, guidance=args.guidance,
                             steps=args.steps, num_samples=args.num_samples)
        device = resolve_device(args.device)
        result = evaluate_mixture(cfg, spec, force=args.force, device=device)
    except (MixtureError, CampaignError, ConfigError, SweepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    keys = ("mixture_id", "assignment", "routing", "k", "num_samples", "fid_n", "fid",
            "fid_low", "fid_high", "fid_floor", "fid_floor_low", "fid_floor_high", "fid_full_n",
            "clip_score", "clip_score_low", "clip_score_high", "diversity", "diversity_low",
            "diversity_high", "diversity_metric", "reused")
    print(json.dumps({key: result.get(key) for key in keys}, indent=2))
    print(summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
