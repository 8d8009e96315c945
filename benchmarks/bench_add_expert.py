"""Growing a campaign: the incremental router against a router trained from scratch, and the
training-free centroid router against the learned one (issue 28).

1. **Prepare** the demo with K = 8 (root ``full/``), then make a 7-cluster campaign of it
   (root ``grow/``): clusters 0-6's shards, the held-out split without cluster 7's samples,
   7 centroids; cluster 7's training and held-out samples are held back as new shards.
2. **Train** the 7-cluster campaign (every expert and the router, ``ray.executor=task``).
3. **Add** cluster 7's shards with ``jobs/add_expert.py``: its expert, and the incremental
   router (``router.grow``: ``--grow-steps`` on cluster 7 plus ``--replay`` replayed samples).
4. **The full router**: the 8-cluster router trained from scratch (``router.grow.mode=scratch``,
   ``--router-steps``) on the same 8 clusters.
5. **Compare**: top-1 accuracy on the held-out split (mean over the t bins, the report every
   router carries in ``router.json``) and steps; the 8-expert mixture's FID, CLIP score and
   diversity under each router at the same prompts and seeds (N = ``--n``), paired.
6. **Centroid router**: the demo clustered (K = 8) by the image tower of the demo's own
   reference CLIP (trained by step 2's evaluation judge, ``hdd_ray/evaluation/reference_clip.py``),
   its centroid router's top-1 accuracy on the held-out captions (the cluster of the caption's
   image) beside a learned router's top-1 accuracy on the same held-out samples.

Writes ``benchmarks/out/bench_add_expert.json`` (``accuracy_ratio``, ``steps_ratio``,
``fid_difference`` with its interval, and the rest).

    python benchmarks/bench_add_expert.py                      # the demo's settings
    python benchmarks/bench_add_expert.py --expert-steps 100 --router-steps 200 --grow-steps 50 --n 100  # reduced
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HELD_BACK = 7


def _config(root: Path, args: argparse.Namespace, *extra: str):
    from hdd_ray.config import load_config

    return load_config(overrides=[
        f"root={root}", "clustering.k=8", "tracking.enabled=false", "ray.executor=task",
        f"experts.train.steps={args.expert_steps}", f"router.train.steps={args.router_steps}",
        f"router.grow.steps={args.grow_steps}", f"router.grow.replay_samples={args.replay}",
        f"evaluation.num_samples={args.n}", *extra])


def _filter_tar(paths: list[Path], keep, out: Path) -> int:
    """Samples of ``paths`` whose ``json`` cluster passes ``keep``, into one tar at ``out``."""
    from hdd_ray.corpus import iter_samples, write_tar

    samples = [{k: v for k, v in s.items() if k != "__url__"}
               for s in iter_samples([str(p) for p in paths])
               if keep(json.loads(s["json"])["cluster"])]
    write_tar(str(out), samples)
    return len(samples)


def hold_back(full: Path, grow: Path, new: Path) -> None:
    """``grow/``: the 7-cluster campaign of ``full/``'s clusters 0-6; ``new/``: cluster 7."""
    import pandas as pd

    from hdd_ray.prepare.manifest import cluster_hash

    src, dst = full / "clusters", grow / "clusters"
    dst.mkdir(parents=True)
    for c in range(HELD_BACK):
        shutil.copytree(src / str(c), dst / str(c))
    shutil.copytree(src / "embeddings", dst / "embeddings")
    heldout = sorted((src / "heldout").glob("*.tar"))
    (dst / "heldout").mkdir()
    n_held = _filter_tar(heldout, lambda c: c != HELD_BACK, dst / "heldout" / "shard-000000.tar")
    new.mkdir(parents=True)
    for i, shard in enumerate(sorted((src / str(HELD_BACK)).glob("*.tar"))):
        shutil.copy(shard, new / f"train-{i:06d}.tar")
    _filter_tar(heldout, lambda c: c == HELD_BACK, new / "heldout.tar")
    np.save(dst / "centroids.npy", np.load(src / "centroids.npy")[:HELD_BACK])
    shutil.copy(src / "fine_centroids.npy", dst / "fine_centroids.npy")
    plan = pd.read_parquet(src / "assignments.parquet")
    plan[plan["cluster"] != HELD_BACK].to_parquet(dst / "assignments.parquet", index=False)
    manifest = json.loads((src / "manifest.json").read_text())
    emb = pd.read_parquet(src / "embeddings", columns=["key", "sha"])
    kept = plan[plan["cluster"] != HELD_BACK].merge(emb, on="key")
    clusters = manifest["clusters"][:HELD_BACK]
    manifest.update(
        k=HELD_BACK, clusters=clusters, counts=manifest["counts"][:HELD_BACK],
        heldout_counts=manifest["heldout_counts"][:HELD_BACK],
        heldout={"count": n_held, "shards": ["heldout/shard-000000.tar"]},
        num_train=sum(c["count"] for c in clusters), num_heldout=n_held,
        data_hash=cluster_hash(kept["key"].tolist(), kept["sha"].tolist(),
                               manifest["image_size"], manifest["channels"]))
    manifest["num_samples"] = manifest["num_train"] + n_held
    (dst / "manifest.json").write_text(json.dumps(manifest))


def _router_json(cfg) -> dict:
    from hdd_ray.campaign import CampaignPaths, load_manifest, router_id

    rid = router_id(cfg, load_manifest(cfg))
    return json.loads((Path(CampaignPaths(cfg.root).router_dir(rid)) / "router.json").read_text())


def _mean_accuracy(desc: dict) -> float:
    return float(np.mean(list(desc["top1_accuracy_by_t"].values())))


def grow_and_compare(args: argparse.Namespace, base: Path) -> dict:
    """Steps 1-5."""
    from hdd_ray.ensemble import MixtureSpec
    from hdd_ray.evaluation.mixture import evaluate_mixture, paired_difference
    from hdd_ray.prepare import prepare_corpus
    from hdd_ray.training.launcher import train_campaign

    timings = {}
    t0 = time.time()
    prepare_corpus(_config(base / "full", args))
    hold_back(base / "full", base / "grow", base / "new")
    cfg7 = _config(base / "grow", args, f"clustering.k={HELD_BACK}")
    timings["prepare_s"] = time.time() - t0
    t0 = time.time()
    statuses = train_campaign(cfg7, assignments=[sorted(cfg7.experts.ddpm_clusters)])
    assert all(s.ok for s in statuses), [s.reason for s in statuses if not s.ok]
    timings["train_7_s"] = time.time() - t0
    import importlib

    t0 = time.time()
    over = [f"root={base / 'grow'}", f"clustering.k={HELD_BACK}", "tracking.enabled=false",
            "ray.executor=task", f"experts.train.steps={args.expert_steps}",
            f"router.train.steps={args.router_steps}", f"router.grow.steps={args.grow_steps}",
            f"router.grow.replay_samples={args.replay}", f"evaluation.num_samples={args.n}"]
    rc = importlib.import_module("jobs.add_expert").main(["--shards", str(base / "new"), *over])
    assert rc == 0
    timings["add_expert_s"] = time.time() - t0
    inc = _config(base / "grow", args)
    full = _config(base / "grow", args, "router.grow.mode=scratch")
    t0 = time.time()
    assert all(s.ok for s in train_campaign(full, only=[], include_router=True))
    timings["full_router_s"] = time.time() - t0
    acc_inc, acc_full = _mean_accuracy(_router_json(inc)), _mean_accuracy(_router_json(full))
    results = {}
    for name, cfg in (("incremental", inc), ("full", full)):
        t0 = time.time()
        results[name] = evaluate_mixture(cfg, MixtureSpec.from_config(cfg, num_samples=args.n))
        timings[f"evaluate_{name}_s"] = time.time() - t0
    from hdd_ray.campaign import CampaignPaths

    diff = paired_difference(results["incremental"], results["full"],
                             CampaignPaths(inc.root).mixtures) or {}
    return {
        "accuracy_incremental": acc_inc, "accuracy_full": acc_full,
        "accuracy_ratio": acc_inc / acc_full, "steps_incremental": args.grow_steps,
        "steps_full": args.router_steps, "steps_ratio": args.grow_steps / args.router_steps,
        **{f"{m}_{name}": results[name][m] for name in results
           for m in ("fid", "clip_score", "diversity")},
        **{f"{m}_difference": {"estimate": iv.estimate, "low": iv.low, "high": iv.high,
                               "significant": iv.significant} for m, iv in diff.items()},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }


def centroid_router(args: argparse.Namespace, base: Path) -> dict:
    """Step 6: the demo clustered by the reference CLIP's image tower; centroid vs learned."""
    import torch

    from hdd_ray.campaign import heldout_shards, load_manifest
    from hdd_ray.corpus import iter_samples
    from hdd_ray.evaluation.reference_clip import REFERENCE_CLIP_CONFIG
    from hdd_ray.prepare import prepare_corpus
    from hdd_ray.routing import load_centroid_router
    from hdd_ray.training.launcher import train_campaign

    ref = base / "grow" / "evaluation" / "reference_clip" / "weights.safetensors"
    arch = base / "reference-clip.json"
    arch.write_text(json.dumps(REFERENCE_CLIP_CONFIG))
    cfg = _config(base / "clip", args, "clustering.embedder=open_clip",
                  f"clustering.embedder_arch={arch}", f"clustering.embedder_weights={ref}",
                  "sampling.router=centroid", f"sampling.centroid_temperature={args.temperature}")
    prepare_corpus(cfg)
    manifest = load_manifest(cfg)
    router = load_centroid_router(cfg, manifest)
    captions, clusters = [], []
    for s in iter_samples(heldout_shards(cfg, manifest), ("txt", "json")):
        captions.append(s["txt"].decode())
        clusters.append(json.loads(s["json"])["cluster"])
    w = router.weights(captions)
    centroid_acc = float((w.argmax(1) == torch.tensor(clusters)).float().mean())
    assert all(s.ok for s in train_campaign(cfg, only=[], include_router=True))
    return {"centroid_top1": centroid_acc, "learned_top1_same_heldout":
            _mean_accuracy(_router_json(cfg)), "centroid_temperature": args.temperature,
            "heldout_prompts": len(captions), "clip_ari_vs_labels": manifest.get("ari_vs_labels")}


def main() -> int:
    """Run the benchmark; writes the JSON and prints it."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(REPO / "benchmarks" / "out" / "bench_add_expert_runs"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "bench_add_expert.json"))
    p.add_argument("--expert-steps", type=int, default=800)
    p.add_argument("--router-steps", type=int, default=800)
    p.add_argument("--grow-steps", type=int, default=200)
    p.add_argument("--replay", type=int, default=1024)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--skip-centroid", action="store_true")
    args = p.parse_args()
    import ray

    base = Path(args.root)
    shutil.rmtree(base, ignore_errors=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = time.time()
    out = {"settings": vars(args), **grow_and_compare(args, base)}
    if not args.skip_centroid:
        out["centroid"] = centroid_router(args, base)
    out["wall_s"] = round(time.time() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
