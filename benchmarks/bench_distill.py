"""Distilling the demo's mixture into one dense student: quality and sampling cost, paired.

On the demo campaign (K = 8, 2 DDPM + 6 FM DiT-T/4 experts, prepared and trained here by
``jobs/train_all_experts.py`` into ``--root``; a finished one is reused):

1. **The student**: ``jobs/distill.py`` distils the mixture (top-2, the demo's guidance and
   conversion) into one DiT-T/4, the experts' size, trained ``--steps`` steps (the experts'
   recipe: batch 64, lr 1e-3, EMA 0.99), sampling at guidance 1.
2. **The monolith**: the same job with ``distill.data_weight=1`` (data alone, no teacher),
   the same steps, caption dropout 0.1 (as the experts: it samples with the mixture's guidance).
3. **Evaluation, paired**: ``--samples`` held-out prompts (the judge's), the same noise for the
   three models (sampling seed 0), each sampled through ``Mixture.sample`` (the student and the
   monolith as one-expert mixtures: ``Mixture.from_student``) and scored by the campaign's
   judge (FID in the demo judge's space, CLIP score with the reference CLIP, diversity; 95 %
   bootstrap intervals), and paired differences on the same bootstrap plan.
4. **Sampling cost**: wall time per image (sampling only, best of ``--repeats`` over
   ``--timing-samples`` prompts) and network rows per image (an expert evaluation under
   guidance is two rows, conditional and null; the router's rows counted too);
   ``cost_ratio`` = student time per image / the mixture's.

    python benchmarks/bench_distill.py                               # full: N = 500, 800 steps
    python benchmarks/bench_distill.py --expert-steps 200 --steps 200 --samples 100  # smoke

Writes ``benchmarks/out/bench_distill.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def overrides(args: argparse.Namespace) -> list[str]:
    """The campaign's settings: the demo at ``--expert-steps``, no evaluation in the job."""
    return [f"root={args.root}", "tracking.enabled=false", "evaluation.enabled=false",
            f"experts.train.steps={args.expert_steps}", f"router.train.steps={args.expert_steps}",
            f"distill.train.steps={args.steps}"]


def train(args: argparse.Namespace) -> dict[str, float]:
    """The mixture's experts and router, the student and the monolith -> seconds per phase."""
    from hdd_ray.commands import distill, train_all_experts

    times = {}
    for name, job, extra in (
            ("experts_and_router", train_all_experts, []),
            ("student", distill, []),
            ("monolith", distill, ["distill.data_weight=1", "distill.train.caption_dropout=0.1"])):
        started = time.time()
        if job.main([*overrides(args), *extra]) != 0:
            raise SystemExit(f"{name}: the job failed")
        times[f"{name}_s"] = time.time() - started
    return times


def models(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    """The three models, loaded: the mixture and the two students (the newest of each kind)."""
    from hdd_ray.campaign import CampaignPaths
    from hdd_ray.ensemble import Mixture, load_mixture

    students = CampaignPaths(cfg.root).students
    found = {}
    for kind in ("student", "monolith"):
        dirs = sorted(Path(students).glob(f"{kind}-*"), key=lambda p: p.stat().st_mtime)
        card = json.loads((dirs[-1] / "student.json").read_text())
        if int(card["steps"]) != args.steps:
            raise SystemExit(f"{dirs[-1]} trained {card['steps']} steps, not {args.steps}")
        found[kind] = Mixture.from_student(str(dirs[-1]), cfg)
    return {"mixture": load_mixture(cfg), **found}


def per_image_costs(loaded: dict[str, Any], prompts: list[str],
                    repeats: int) -> dict[str, dict[str, float]]:
    """Per model: sampling wall time per image (best of ``repeats``, the models timed round
    robin so a slow spell of the machine hits all of them) and network rows per image."""
    best = dict.fromkeys(loaded, float("inf"))
    for _ in range(repeats):
        for name, model in loaded.items():
            started = time.perf_counter()
            model.sample(prompts, seed=0)
            best[name] = min(best[name], time.perf_counter() - started)
    out = {}
    for name, model in loaded.items():
        s = model.cfg.sampling
        calls = 2 * s.steps - 1 if s.sampler == "heun" else s.steps
        experts = sum(model.last_evaluations) / len(prompts)
        out[name] = {"seconds_per_image": best[name] / len(prompts),
                     "expert_evaluations_per_image": experts,
                     # a guided evaluation is two rows (conditional, null); the router's rows
                     "network_rows_per_image": experts * (2 if s.guidance_scale != 1 else 1)
                     + (calls if model.cfg.clustering.k > 1 else 0)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(REPO / "runs" / "bench_distill"))
    parser.add_argument("--expert-steps", type=int, default=800)
    parser.add_argument("--steps", type=int, default=800, help="student and monolith steps")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--timing-samples", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "bench_distill.json"))
    args = parser.parse_args()
    import torch

    from hdd_ray.config import load_config
    from hdd_ray.evaluation import statistics
    from hdd_ray.evaluation.judge import Judge

    torch.set_num_threads(2)
    started = time.time()
    phases = train(args)
    cfg = load_config(overrides=overrides(args))
    loaded = models(args, cfg)
    judge = Judge(cfg, "cpu")
    prompts = judge.prompts(args.samples)
    rows: dict[str, Any] = {}
    replicates: dict[str, Any] = {}
    for name, model in loaded.items():
        t0 = time.time()
        samples = model.sample(prompts, seed=cfg.sampling.seed)
        scores, reps, _ = judge.summarize(judge.sample_scores(samples, prompts))
        replicates[name] = reps
        rows[name] = {**{k: scores[k] for k in statistics.interval_columns(
                         ("fid", "fid_floor", "clip_score", "diversity"))},
                      "fid_n": scores["fid_n"], "guidance": model.cfg.sampling.guidance_scale,
                      "eval_s": time.time() - t0}
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in rows[name].items()},
              flush=True)
    for name, cost in per_image_costs(loaded, prompts[:args.timing_samples],
                                      args.repeats).items():
        rows[name].update(cost)
    paired = {}
    for a, b in (("student", "mixture"), ("student", "monolith"), ("mixture", "monolith")):
        diff = statistics.paired_differences(
            {k: rows[a][k] for k in statistics.METRICS}, replicates[a],
            {k: rows[b][k] for k in statistics.METRICS}, replicates[b])
        paired[f"{a}-{b}"] = {k: v.as_dict(k) for k, v in diff.items()}
    result = {
        "models": rows, "paired": paired,
        "cost_ratio": rows["student"]["seconds_per_image"] / rows["mixture"]["seconds_per_image"],
        "settings": {**{k: v for k, v in vars(args).items() if k != "out"},
                     "sampler": cfg.sampling.sampler, "sampling_steps": cfg.sampling.steps,
                     "routing": cfg.sampling.routing, "k": cfg.sampling.k,
                     "mixture_guidance": cfg.sampling.guidance_scale,
                     "model": cfg.experts.model, "assignment": loaded["mixture"].assignment},
        "phases": phases, "wall_s": time.time() - started,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"paired": paired, "cost_ratio": result["cost_ratio"]}, indent=2))
    print(f"wrote {args.out} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
