"""The expert cache's saving in an objective sweep: trainings needed versus mixtures evaluated.

    python benchmarks/bench_sweep.py                       # K = 3, every 2^K assignment
    python benchmarks/bench_sweep.py --k 4 --steps 100 --num-samples 128

In one process with one local Ray instance: prepares a demo campaign with K clusters, then runs
a ``sweep.mode=grid`` sweep over all 2^K objective assignments. Phase 1 (timed) trains the
experts the space needs (``train_needed_experts``: at most 2K); phase 2 (timed) runs the Tune
trials, each assembling its mixture from the cache and evaluating it. Without the cache every
mixture would train its own K experts (K * 2^K trainings). Writes ``benchmarks/out/bench_sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints a markdown table and writes the JSON."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="training steps per expert")
    p.add_argument("--num-samples", type=int, default=96, help="samples per mixture")
    p.add_argument("--sampling-steps", type=int, default=4)
    p.add_argument("--root", default=None, help="campaign root (default: a temporary dir)")
    args = p.parse_args(argv)

    import ray

    from hdd_ray.config import load_config
    from hdd_ray.placement import RAY_ENV
    from hdd_ray.prepare import prepare_corpus
    from hdd_ray.sweep import candidate_assignments, run_sweep, train_needed_experts

    root = args.root or tempfile.mkdtemp(prefix="bench_sweep_")
    cfg = load_config(overrides=[
        f"root={root}", f"clustering.k={args.k}", f"clustering.fine_centroids={4 * args.k}",
        "sampling.k=2", "experts.ddpm_clusters=[]", f"experts.train.steps={args.steps}",
        f"experts.train.checkpoint_every={args.steps}", f"router.train.steps={args.steps}",
        f"router.train.checkpoint_every={args.steps}", "experts.resources.cpus_per_worker=0.25",
        "router.resources.cpus_per_worker=0.25", f"evaluation.num_samples={args.num_samples}",
        f"sampling.steps={args.sampling_steps}", "sampling.sampler=euler", "sweep.mode=grid",
        "sweep.name=bench", "sweep.cpus_per_trial=1", "sweep.max_concurrent_trials=2",
    ])
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             log_to_driver=False)
    prepare_corpus(cfg)
    t0 = time.time()
    trained, needed = train_needed_experts(cfg)
    train_s = time.time() - t0
    t0 = time.time()
    result = run_sweep(cfg, force=True, verbose=0)
    sweep_s = time.time() - t0
    mixtures = len(result.rows)
    out = {
        "k": args.k, "assignments": len(candidate_assignments(cfg)), "mixtures_evaluated": mixtures,
        "experts_trained": trained, "experts_needed": needed,
        "trainings_without_cache": args.k * mixtures, "train_phase_s": round(train_s, 1),
        "sweep_phase_s": round(sweep_s, 1),
        "seconds_per_mixture": round(sweep_s / max(1, mixtures), 1),
        "seconds_per_mixture_incl_training": round((train_s + sweep_s) / max(1, mixtures), 1),
        "expert_steps": args.steps, "num_samples": args.num_samples,
        "sampling_steps": args.sampling_steps, "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
    }
    ray.shutdown()
    dest = Path(__file__).resolve().parent / "out" / "bench_sweep.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))
    print("| K | mixtures evaluated | experts trained (cache) | trainings without cache | "
          "train phase s | sweep phase s | s / mixture | s / mixture incl. training |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.k} | {mixtures} | {trained} | {out['trainings_without_cache']} | "
          f"{out['train_phase_s']} | {out['sweep_phase_s']} | {out['seconds_per_mixture']} | "
          f"{out['seconds_per_mixture_incl_training']} |")
    print()
    print(result.table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
