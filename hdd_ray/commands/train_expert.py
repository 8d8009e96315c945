"""Train ONE expert of a campaign, anywhere: a contributor's own machine or any Ray cluster.

The expert lands in the campaign's storage exactly as if the main job had trained it; the main
job and later sweeps then reuse it. Use the campaign's own config so the expert id matches.

    python jobs/train_expert.py --expert 3                                  # cluster 3 of the demo
    python jobs/train_expert.py --expert c3-ddpm-1a2b3c4d5e --config jobs/configs/demo.yaml
    python jobs/train_expert.py --expert 3 root=s3://bucket/campaign experts.resources.gpus_per_worker=1
    ray job submit --working-dir . -- python jobs/train_expert.py --expert 3 root=/abs/path/runs/demo

Without a Ray cluster it starts a local Ray instance on this machine.
"""

from __future__ import annotations

import sys

from hdd_ray.cli import parse_job_args
from hdd_ray.placement import init_ray


def main(argv: list[str] | None = None) -> int:
    """Train the chosen expert; returns the process exit status."""
    cfg, args = parse_job_args(__doc__, argv, extra=[
        ("--expert", {"required": True, "help": "expert index (cluster) or expert id"}),
    ])
    from hdd_ray.campaign import check_text_features, expert_id, load_manifest, model_shape
    from hdd_ray.config import resolve_experts
    from hdd_ray.errors import CampaignError, ConfigError
    from hdd_ray.progress import format_table
    from hdd_ray.training.launcher import train_campaign
    from hdd_ray.training.memory import preflight
    from hdd_ray.training.starts import check_campaign_starts

    try:
        manifest = load_manifest(cfg)
        check_text_features(cfg, manifest)  # a frozen tower's features, stored by prepare
        check_campaign_starts(cfg)  # its start read and fitted before Ray takes anything
    except (CampaignError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    experts = resolve_experts(cfg)
    chosen = [e for e in experts if str(e.index) == args.expert
              or expert_id(cfg, e, manifest) == args.expert]
    if not chosen:
        ids = ", ".join(expert_id(cfg, e, manifest) for e in experts)
        print(f"error: --expert {args.expert!r} is neither an index 0..{len(experts) - 1} "
              f"nor an id of this campaign ({ids})", file=sys.stderr)
        return 2
    try:  # its memory plan: refused in one line before Ray starts when it cannot fit
        preflight(cfg, model_shape(cfg, manifest), experts=[chosen[0].index], router=False)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    init_ray(cfg)
    statuses = train_campaign(cfg, only=[chosen[0].index], include_router=False)
    print(format_table(statuses))
    return 0 if all(s.ok for s in statuses) else 1


if __name__ == "__main__":
    raise SystemExit(main())
