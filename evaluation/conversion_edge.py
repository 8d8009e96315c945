"""Choose the conversion's edge on tiny trained experts (no campaign, no Ray, a few CPU minutes).

    python evaluation/conversion_edge.py                       # cluster 0 of the demo's digits
    python evaluation/conversion_edge.py --cluster 3 --steps 800 --out /tmp/edge

Clusters scikit-learn's 8x8 digits (k-means on pixels, K = 8: a stand-in for the demo's
clusters), holds out 10% of one cluster, trains an FM expert and DDPM experts (cosine and linear
schedules) on the rest with the bare training loop (the demo's DiT-T/2 and training settings),
then prints the per-t velocity MSE against ``eps - x0`` on the held-out images for the FM twin
and each DDPM expert converted with the earlier scheme (``beyond_edge=divide``) and the edge
scheme at several ``min_one_minus_t``, at guidance 1 and 2. The trained weights are kept in
``--out`` and reused. The results are in ``evaluation/README.md`` ("Conversion near t = 1");
``evaluation/velocity_error.py`` draws the same curves for a trained campaign.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

EDGES = (1e-3, 1e-2, 3e-2, 5e-2, 1e-1)
SHOWN_T = (0.5, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 1.0)


def _cluster_shards(directory: str, cluster: int, seed: int = 0) -> tuple[str, str]:
    """The demo corpus clustered on pixels; one cluster's train / held-out shards."""
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.datasets import load_digits

    from hdd_ray.corpus import demo_caption, encode_png, write_tar

    digits = load_digits()
    labels = KMeans(8, n_init=10, random_state=seed).fit_predict(digits.data)
    idx = np.nonzero(labels == cluster)[0]
    rng = np.random.default_rng(seed)
    rng.shuffle(idx)
    n_held = max(1, len(idx) // 10)
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    paths = []
    for name, part in (("train", idx[n_held:]), ("heldout", idx[:n_held])):
        samples = [{"__key__": f"digit-{i:06d}", "png": encode_png(pixels[i][:, :, None]),
                    "txt": demo_caption(int(digits.target[i]), f"digit-{i:06d}"),
                    "json": json.dumps({"cluster": cluster})} for i in part]
        path = os.path.join(directory, f"{name}.tar")
        write_tar(path, samples)
        paths.append(path)
    return paths[0], paths[1]


def _train(shard: str, objective: str, schedule: str, steps: int, directory: str, cache: str):
    """A trained expert (its EMA weights) and its description, via the bare loop; reused from
    ``cache`` (safetensors) when an earlier run left it there."""
    from hdd_ray.config import load_config, resolve_experts
    from hdd_ray.models.expert import ExpertModel, load_weights, save_weights
    from hdd_ray.training.loop import LocalHooks, run_loop
    from hdd_ray.training.settings import RunSettings

    cfg = load_config(overrides=[f"experts.objective={objective}", "experts.ddpm_clusters=[]",
                                 f"experts.schedule={schedule}"])
    expert = resolve_experts(cfg)[0]
    model = ExpertModel(expert.model, expert.text, 8, 1)
    desc = {"objective": objective, "schedule": expert.schedule}
    if os.path.exists(cache):
        load_weights(model, cache, f"{objective} {schedule}")
        return model.eval(), desc
    train = dict(expert.train, steps=steps, checkpoint_every=steps)
    spec = {**asdict(expert), "cluster": 0}
    config = {"kind": "expert", "expert": spec, "train": train, "image_size": 8, "channels": 1,
              "shards": [shard], "torch_threads": 1}  # more threads than free cores: ~10x slower
    hooks = LocalHooks(directory)
    started = time.time()
    last = run_loop(RunSettings.from_dict(config), hooks)
    model.load_state_dict(hooks.load_state()["ema"])
    save_weights(cache, model.exported_state())
    print(f"trained {objective} {schedule if objective == 'ddpm_eps' else ''}: {steps} steps, "
          f"loss {last['loss']:.4f}, {time.time() - started:.0f} s", flush=True)
    return model.eval(), desc


def main(argv: list[str] | None = None) -> int:
    """Train, measure, print the table; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", type=int, default=0)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--draws", type=int, default=8, help="noise draws per image and t")
    parser.add_argument("--out", default="runs/conversion_edge", help="folder for the CSV and plot")
    args = parser.parse_args(argv)

    import torch

    from hdd_ray.diffusion import Safeguards
    from hdd_ray.evaluation.velocity_error import (
        BEFORE,
        curves_csv,
        curves_png,
        expert_field,
        velocity_errors,
    )
    from hdd_ray.samples import read_cluster

    torch.manual_seed(0)
    out = args.out
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="conversion-edge-") as work:
        train_shard, held_shard = _cluster_shards(work, args.cluster)
        held = read_cluster([held_shard], 8, 1)
        print(f"cluster {args.cluster}: {len(read_cluster([train_shard], 8, 1))} train, "
              f"{len(held)} held-out images", flush=True)
        def cache(name: str) -> str:
            return os.path.join(out, f"c{args.cluster}-{name}-{args.steps}.safetensors")

        fm = _train(train_shard, "fm_velocity", "cosine", args.steps, os.path.join(work, "fm"),
                    cache("fm"))
        ddpm = {s: _train(train_shard, "ddpm_eps", s, args.steps, os.path.join(work, s),
                          cache(f"ddpm-{s}")) for s in ("cosine", "linear")}

    rows = []
    for guidance in (1.0, 2.0):
        fields = {"fm": expert_field(*fm, held.captions, guidance)}
        for s, pair in ddpm.items():
            fields[f"{s} before"] = expert_field(*pair, held.captions, guidance, BEFORE)
            fields[f"{s} before x0c"] = expert_field(
                *pair, held.captions, guidance, replace(BEFORE, x0_clamp=1.0))
            for m in EDGES:
                fields[f"{s} m={m:g}"] = expert_field(*pair, held.captions, guidance,
                                                      Safeguards(min_one_minus_t=m))
            default = Safeguards()
            tag = f"m={default.min_one_minus_t:g}"
            fields[f"{s} {tag} x0c"] = expert_field(
                *pair, held.captions, guidance, replace(default, x0_clamp=1.0))
            fields[f"{s} {tag} no mean"] = expert_field(
                *pair, held.captions, guidance, default, use_mean=False)
        for row in velocity_errors(fields, held.images, draws=args.draws):
            rows.append({"guidance": guidance, **row})
    Path(out, "conversion_edge.csv").write_text(curves_csv(rows))
    Path(out, "conversion_edge.png").write_bytes(curves_png(rows, f"cluster {args.cluster}"))

    names = [k for k in rows[0] if k not in ("guidance", "t")]
    for guidance in (1.0, 2.0):
        sel = {r["t"]: r for r in rows if r["guidance"] == guidance}
        print(f"\nguidance {guidance:g}: velocity MSE against eps - x0 at t")
        print("| field | " + " | ".join(f"{t:g}" for t in SHOWN_T) + " | mean t>=0.9 |")
        print("|---" * (len(SHOWN_T) + 2) + "|")
        for name in names:
            tail = [r[name] for t, r in sel.items() if t >= 0.9]
            print(f"| {name} | " + " | ".join(f"{sel[t][name]:.3g}" for t in SHOWN_T)
                  + f" | {sum(tail) / len(tail):.3g} |")
    print(f"\nwrote {out}/conversion_edge.csv and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
