"""Ray Tune sweep of DDPM-vs-FM objective assignments per cluster (and routing, CFG, steps).

Local demo (starts a local Ray instance; prepares the corpus and trains the experts it needs):
    python jobs/sweep_objectives.py
    (demo default: K = 8, assignments with 0 or 1 DDPM expert = 9 mixtures, which needs
    2K = 16 experts; each trial evaluates N = 128 samples with 16 Heun steps)
Other search spaces:
    python jobs/sweep_objectives.py sweep.n_ddpm=[0,2,4,8] sweep.name=ratios
    python jobs/sweep_objectives.py sweep.mode=grid sweep.name=all               # all 2^K = 256
    python jobs/sweep_objectives.py sweep.mode=optuna sweep.num_samples=32 sweep.name=opt \\
        sweep.n_ddpm=null        # null: each cluster's objective drawn on its own
    python jobs/sweep_objectives.py sweep.name=routing sweep.mode=list \\
        'sweep.assignments=["D F F D F F F F"]' sweep.routing=[top1,topk] sweep.guidance=[1.0,2.0]
    python jobs/sweep_objectives.py evaluation.num_samples=1024 sweep.asha.sample_counts=[256]
    python jobs/sweep_objectives.py sweep.register_as=digits   # the best -> MLflow registry,
        # alias champion when its FID is lower than the last champion's (same evaluation)
On a running Ray cluster (the job joins it through RAY_ADDRESS):
    ray job submit --working-dir . -- python jobs/sweep_objectives.py root=/abs/path/runs/demo
    (an absolute root or a bucket: the job runs in a copy of the working directory)
    ray job submit --working-dir . -- python jobs/sweep_objectives.py \\
        --config jobs/configs/<campaign>.yaml root=s3://bucket/campaign sweep.mode=grid

Re-running the same command resumes the sweep (finished trials are kept, the rest run);
``--force`` starts it over (evaluated mixtures are still reused from ``<root>/mixtures``).
Leaves ``<root>/sweeps/<name>/ranking.{csv,md}``, ``fid_clip_vs_num_ddpm.png`` and
``best_mixture.json`` (``python evaluation/evaluate_mixture.py --mixture <name>``), all also
artifacts of the sweep's MLflow run, whose child runs are the trials.
"""

from __future__ import annotations

import sys
import time

from hdd_ray.cli import parse_job_args
from hdd_ray.placement import init_ray

#: the demo's sweep: small enough for a few minutes of 2 CPUs once the experts exist
DEMO_DEFAULTS = ["evaluation.num_samples=128", "sampling.steps=16"]


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the sweep; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        argv = [*DEMO_DEFAULTS, *argv]  # later overrides win
    cfg, args = parse_job_args(__doc__, argv)
    from hdd_ray.errors import CampaignError, ConfigError, PrepareError, SweepError
    from hdd_ray.prepare import prepare_corpus
    from hdd_ray.sweep import run_sweep
    from hdd_ray.training.memory import preflight
    from hdd_ray.training.starts import check_campaign_starts

    try:  # pretrained starts read and fitted (shapes only), the memory plans: before Ray
        check_campaign_starts(cfg)
        preflight(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.time()
    init_ray(cfg)
    try:
        prepare_corpus(cfg)
        result = run_sweep(cfg, force=args.force)
    except (PrepareError, CampaignError, SweepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(result.table)
    if result.failed_trials:
        print(f"\nwarning: {result.failed_trials} trials failed (see {result.directory})")
    print(f"\n{len(result.rows)} mixtures evaluated, {result.trainings} experts trained now "
          f"({result.experts_needed} needed in all), {'restored' if result.restored else 'new'} "
          f"sweep, {time.time() - started:.0f} s; outputs in {result.directory}")
    if result.best:
        print(f"best: {result.best['assignment']} ({result.best['routing']}, "
              f"FID {result.best['fid']:.3f}); evaluate it again with "
              f"`python evaluation/evaluate_mixture.py --mixture {cfg.sweep.name}`")
    reg = result.registered  # sweep.register_as
    if reg is not None:
        print(f"registered {reg.name} version {reg.version}: {reg.reason}"
              + (f" -> alias champion (models:/{reg.name}@champion)" if reg.champion else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
