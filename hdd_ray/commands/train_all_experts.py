"""The main job: prepare the corpus, then every expert and the router as independent Ray Train runs.

Local demo (starts a local Ray instance; CPU is fine):
    python jobs/train_all_experts.py
    python jobs/train_all_experts.py experts.ddpm_clusters=[0,3] experts.train.steps=3000
On a running Ray cluster (the job joins it through RAY_ADDRESS):
    ray job submit --working-dir . -- python jobs/train_all_experts.py root=/abs/path/runs/demo
    (an absolute root or a bucket: the job runs in a copy of the working directory)
A real campaign (see clusters/ and the README "Run on a cluster"):
    ray job submit --working-dir . -- python jobs/train_all_experts.py --config jobs/configs/<campaign>.yaml root=s3://bucket/campaign

Re-running is safe and cheap: finished experts are reused, partial ones resume from their last
checkpoint, missing ones are trained. The job prints one line per expert and exits 1 if any failed.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from hdd_ray import tracking
from hdd_ray.cli import parse_job_args
from hdd_ray.placement import init_ray

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig


def main(argv: list[str] | None = None) -> int:
    """Run the campaign; returns the process exit status."""
    cfg, args = parse_job_args(__doc__, argv, extra=[
        ("--skip-router", {"action": "store_true", "help": "train the experts only"}),
    ])
    from hdd_ray.campaign import campaign_assignments
    from hdd_ray.errors import CampaignError, ConfigError, PrepareError
    from hdd_ray.prepare import prepare_corpus
    from hdd_ray.progress import format_table
    from hdd_ray.training.launcher import train_campaign
    from hdd_ray.training.memory import preflight
    from hdd_ray.training.starts import check_campaign_starts

    try:  # pretrained starts read and fitted (shapes only), every run's memory plan: a plan
        check_campaign_starts(cfg)  # that cannot fit is refused before anything starts
        preflight(cfg, router=not args.skip_router)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.time()
    # a launch that finds everything done (no stage, expert or mixture run under it) leaves
    # no run behind
    with tracking.run(cfg, "train_all_experts", tags={"stage": "campaign"},
                      keep_without_children=False) as parent:
        tracking.log_config(parent, cfg)  # config.yaml + flattened params
        try:
            # checks its inputs before it joins or starts Ray (bad input: one line, no cluster)
            prepare_corpus(cfg, force=args.force)
            init_ray(cfg)  # no-op when prepare already joined Ray
            statuses = train_campaign(cfg, include_router=not args.skip_router,
                                      parent_run_id=parent.run_id if parent else None)
        except (PrepareError, CampaignError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            _failed(parent)
            return 2
        print()
        print(format_table(statuses))
        failed = [s for s in statuses if not s.ok]
        print(f"\n{len(statuses) - len(failed)}/{len(statuses)} runs ok in "
              f"{time.time() - started:.0f} s (campaign root: {cfg.root})")
        if failed:
            _failed(parent)
            return 1
        if cfg.evaluation.enabled and not args.skip_router:
            try:
                evaluate(cfg, campaign_assignments(cfg), parent.run_id if parent else None)
            except CampaignError as exc:  # e.g. evaluation.resources no local node can host
                print(f"error: {exc}", file=sys.stderr)
                _failed(parent)
                return 2
    print(f"done in {time.time() - started:.0f} s")
    return 0


def _failed(run: tracking.TrackedRun | None) -> None:
    """A launch that failed keeps its campaign run, marked FAILED."""
    if run is not None:
        run.finish(ok=False)


def evaluate(cfg: CampaignConfig, assignments: list[list[int]],
             parent_run_id: str | None) -> None:
    """Evaluate the campaign's mixture (and its baseline) in Ray tasks shaped by
    ``evaluation.resources`` (one per mixture, on its GPU when it has one) and print the
    comparison table."""
    from hdd_ray import storage
    from hdd_ray.campaign import CampaignPaths
    from hdd_ray.ensemble import MixtureSpec
    from hdd_ray.evaluation.remote import evaluate_on_ray
    from hdd_ray.evaluation.tables import comparison_table

    specs = [MixtureSpec.from_config(cfg, ddpm) for ddpm in assignments]
    for spec in specs:
        print(f"evaluating mixture {spec.assignment(cfg.clustering.k)} ({spec.routing}, "
              f"N={spec.num_samples}) ...", flush=True)
    res = cfg.evaluation.resources
    tasks = ("one Ray task" if len(specs) == 1
             else f"{len(specs)} Ray tasks, side by side where there is room, each")
    print(f"  ({tasks}: {res.num_cpus:g} CPU, {res.num_gpus:g} GPU)", flush=True)
    results = evaluate_on_ray(cfg, specs, parent_run_id)
    table = comparison_table(results, CampaignPaths(cfg.root).mixtures)
    print()
    print(table)
    retrieval = results[0].get("reference_clip_retrieval") if results else None
    shown = f"{retrieval:.3f} top-1" if isinstance(retrieval, float) else "n/a"
    print(f"\n(reference CLIP held-out retrieval: {shown}; tables in "
          f"{storage.join(CampaignPaths(cfg.root).mixtures, 'comparison.md')})")


if __name__ == "__main__":
    raise SystemExit(main())
