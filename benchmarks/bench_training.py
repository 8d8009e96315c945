"""Training orchestration benchmarks (ratios measured side by side in one run).

1. Overhead: training steps/s of one expert under Ray Train versus the identical loop
   (``hdd_ray.training.loop.run_loop``) in a plain process, checkpointing at the configured
   interval included in both. Target >= 0.95.
2. Campaign scaling: wall time of K experts trained concurrently versus one expert, on the same
   Ray resources; speedup = K * T1 / TK, efficiency = speedup / min(K, CPUs).
3. Concurrency cap (``--caps``, instead of 1 and 2): wall time of one K-expert campaign at the
   demo's fractional CPUs per expert, all at once versus ``ray.max_concurrent_experts`` = c,
   measured in alternating order in one run; ratio = wall(all) / wall(c).

    python benchmarks/bench_training.py                     # demo data, 2 CPUs
    python benchmarks/bench_training.py --steps 400 --k 4
    python benchmarks/bench_training.py --caps 2 --k 8 --steps 300 --cpus-per-expert 0.25
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import asdict


def main() -> None:
    """Run both benchmarks and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--root", default=None)
    parser.add_argument("--caps", default="", help="comma list of caps to compare with 'all at once'")
    parser.add_argument("--cpus-per-expert", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    import ray

    from hdd_ray.campaign import EXPERT_JSON, CampaignPaths, cluster_shards, load_manifest
    from hdd_ray.config import load_config, resolve_experts
    from hdd_ray.prepare import prepare_corpus
    from hdd_ray.training.launcher import train_campaign
    from hdd_ray.training.loop import LocalHooks, run_loop
    from hdd_ray.training.settings import RunSettings

    root = args.root or tempfile.mkdtemp(prefix="bench-train-")
    overrides = [f"root={root}", f"clustering.k={args.k}", "clustering.fine_centroids=16",
                 "experts.ddpm_clusters=[0]", f"sampling.k={min(2, args.k)}",
                 f"experts.train.steps={args.steps}",
                 f"experts.train.checkpoint_every={args.checkpoint_every}",
                 f"experts.resources.cpus_per_worker={args.cpus_per_expert:g}",
                 "tracking.enabled=false", "ray.max_concurrent_experts=0",  # all at once
                 # what this benchmark measures: Ray Train runs of the model its tables used
                 "ray.executor=train", "experts.model=DiT-T/2"]
    cfg = load_config(overrides=overrides)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)
    prepare_corpus(cfg)
    if args.caps:
        caps_benchmark(args, overrides)
        return
    expert = resolve_experts(cfg)[1]
    conf = {"kind": "expert", "expert": asdict(expert), "train": expert.train,
            "image_size": cfg.corpus.image_size, "channels": cfg.corpus.channels,
            "shards": cluster_shards(cfg, load_manifest(cfg), 1), "torch_threads": 1}

    # 1. overhead: plain process, then Ray Train, same loop and settings
    t = time.time()
    plain = run_loop(RunSettings.from_dict(conf), LocalHooks(tempfile.mkdtemp()))
    plain_wall = time.time() - t
    t = time.time()
    ray_status = train_campaign(cfg, only=[1], include_router=False)[0]
    ray_wall = time.time() - t
    import json

    desc_dir = CampaignPaths(root).expert_dir(ray_status.name)
    desc = json.loads(open(os.path.join(desc_dir, EXPERT_JSON)).read())
    ray_sps = desc["steps"] / desc["wall_time_s"]
    print("\n| measure | plain process | Ray Train | ratio |")
    print("|---|---|---|---|")
    print(f"| steps/s inside the loop (checkpoints included) | {plain['steps_per_s']:.2f} | "
          f"{ray_sps:.2f} | {ray_sps / plain['steps_per_s']:.3f} |")
    print(f"| end-to-end wall s (Ray: fit() incl. worker start + export) | {plain_wall:.1f} | "
          f"{ray_wall:.1f} | {plain_wall / ray_wall:.3f} |")

    # 2. scaling: one expert alone vs K experts at once (fresh ids: different seed)
    cfg1 = load_config(overrides=[*overrides, "experts.train.seed=1"])
    t = time.time()
    train_campaign(cfg1, only=[2], include_router=False)
    t1 = time.time() - t
    cfgk = load_config(overrides=[*overrides, "experts.train.seed=2"])
    t = time.time()
    statuses = train_campaign(cfgk, include_router=False)
    tk = time.time() - t
    assert all(s.ok for s in statuses), [s.reason for s in statuses]
    speedup = args.k * t1 / tk
    print(f"\n| K | T1 (s) | TK (s) | speedup K*T1/TK | efficiency speedup/min(K, CPUs={args.cpus}) |")
    print("|---|---|---|---|---|")
    print(f"| {args.k} | {t1:.1f} | {tk:.1f} | {speedup:.2f} | {speedup / min(args.k, args.cpus):.2f} |")


def caps_benchmark(args, overrides: list[str]) -> None:
    """3. One K-expert campaign, all at once versus capped, alternating, fresh ids each time."""
    from hdd_ray.config import load_config
    from hdd_ray.training.launcher import train_campaign

    caps = [0] + [int(c) for c in args.caps.split(",")]
    walls: dict[int, list[float]] = {c: [] for c in caps}
    seed = 10
    for r in range(args.rounds):
        for cap in (caps if r % 2 == 0 else caps[::-1]):
            seed += 1
            cfg = load_config(overrides=[*overrides, f"experts.train.seed={seed}",
                                         f"ray.max_concurrent_experts={cap}"])
            t = time.time()
            statuses = train_campaign(cfg, include_router=False)
            walls[cap].append(time.time() - t)
            assert all(s.ok for s in statuses), [s.reason for s in statuses]
            print(f"round {r} cap {cap or 'all'}: {walls[cap][-1]:.1f} s", flush=True)
    base = sum(walls[0]) / len(walls[0])
    print(f"\n| experts at once (K={args.k}, {args.cpus_per_expert:g} CPU each, {args.cpus} CPUs) "
          "| wall s (mean) | steps/s all experts | wall(all) / wall(cap) |")
    print("|---|---|---|---|")
    for cap in caps:
        mean = sum(walls[cap]) / len(walls[cap])
        print(f"| {cap or f'all ({args.k})'} | {mean:.1f} | {args.k * args.steps / mean:.2f} | "
              f"{base / mean:.2f} |")


if __name__ == "__main__":
    main()
