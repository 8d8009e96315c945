"""Benchmark of the prepare stage: Ray Data versus a plain Python loop, and corpus scaling.

    python benchmarks/bench_prepare.py                      # both parts, results in benchmarks/out/
    python benchmarks/bench_prepare.py --sizes 1,2,4,8 --embedders pixels
    python benchmarks/bench_prepare.py --part latents       # latent vs pixel path, tiny VAE
    python benchmarks/bench_prepare.py --part vae --vae-device cuda   # sd-vae-ft-mse size, GPU

Part 1 runs the same work twice in one process on the same machine: `prepare_corpus` (three
Ray Data passes: decode + embed in an actor pool, assign, write per-cluster shards) and a plain
loop over the same library functions (iter_samples -> decode -> embed -> hierarchical k-means
-> assign -> write shards). It reports samples/s of each and their ratio. Part 2 replicates the
demo corpus 1x..Nx (fresh keys) and reports the Ray path's wall time per size.

Part 3 (``latents``) prepares the same RGB corpus twice in one run, in pixel space and in
latent space (a tiny random AutoencoderKL saved to a local folder: 16 px -> 4x8x8), and reports
images/s of each, their ratio and the shards' bytes per sample. Part 4 (``vae``) times the encoder
alone with sd-vae-ft-mse-sized random weights at 256 px in float16 on ``--vae-device``, doubling
the batch until it no longer fits, and reports images/s per batch size.

Ray starts once (not timed); each timed run recomputes (force=True, tracking off). The dinov2
embedder and the VAEs use random weights saved to local files (no download): the cost is what
matters.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from hdd_ray.clustering import (
    assign_clusters,
    fit_hierarchical_kmeans,
    heldout_mask,
    squared_distances,
)
from hdd_ray.config import load_config
from hdd_ray.corpus import (
    decode_image,
    encode_png,
    iter_samples,
    prepare_image,
    write_demo_corpus,
    write_tar,
)
from hdd_ray.prepare import build_embedder, prepare_corpus

OUT = Path(__file__).resolve().parent / "out"


def replicate_demo(directory: Path, times: int, shard_size: int = 500) -> Path:
    """The demo digits ``times`` over, with fresh keys, as shards in ``directory``."""
    base = write_demo_corpus(str(directory / "_demo"))
    samples = [{k: v for k, v in s.items() if k != "__url__"} for s in iter_samples(base)]
    out = directory / f"x{times}"
    every = [{**s, "__key__": f"r{r}-{s['__key__']}"} for r in range(times) for s in samples]
    for n, start in enumerate(range(0, len(every), shard_size)):
        write_tar(str(out / f"shard-{n:06d}.tar"), every[start : start + shard_size])
    return out


def plain_loop(corpus: Path, cfg, out_dir: Path) -> int:
    """The prepare stage's work without Ray, one process; returns the number of samples."""
    cl, c = cfg.clustering, cfg.corpus
    embedder = build_embedder(cl.embedder, c.channels, cl.pixel_size, cl.embedder_arch,
                              cl.embedder_weights, cl.embedder_image_size)
    keys, pngs, captions, feats, pending = [], [], [], [], []
    for s in iter_samples([str(p) for p in sorted(corpus.glob("*.tar"))]):
        img = decode_image(s[c.image_key])
        keys.append(s["__key__"])
        pngs.append(encode_png(prepare_image(img, c.channels, c.image_size)))
        captions.append(s[c.caption_key])
        pending.append(embedder.preprocess(img))
        if len(pending) == cl.batch_size:
            feats.append(embedder.embed(np.stack(pending)))
            pending = []
    if pending:
        feats.append(embedder.embed(np.stack(pending)))
    x = np.concatenate(feats)
    km = fit_hierarchical_kmeans(x, cl.k, cl.fine_centroids, cl.kmeans_iters, cl.seed)
    cluster, _ = assign_clusters(squared_distances(x, km["coarse"]), cl.balance_cap)
    held = heldout_mask(keys, cluster, cl.heldout_fraction, cl.seed)
    dest = np.where(held, "heldout", cluster.astype(str))
    for d in np.unique(dest):
        idx = sorted(np.flatnonzero(dest == d), key=lambda i: keys[i])
        for n, start in enumerate(range(0, len(idx), c.shard_size)):
            write_tar(str(out_dir / d / f"shard-{n:06d}.tar"), [
                {"__key__": keys[i], "png": pngs[i], "txt": captions[i]}
                for i in idx[start : start + c.shard_size]
            ])
    return len(keys)


def save_vae(directory: Path, size: str = "tiny") -> Path:
    """A random AutoencoderKL saved as a local diffusers folder: ``tiny`` (2 blocks, 4 latent
    channels, /2), ``tiny8`` (4 narrow blocks 4-16, 4 latent channels, /8: sd-vae-ft-mse's
    downsampling at a CPU's cost) or ``sd`` (sd-vae-ft-mse's architecture: 4 blocks 128-512, /8)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    if size == "tiny":
        kw = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
    elif size == "tiny8":
        kw = dict(block_out_channels=(4, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
    else:
        kw = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                  norm_num_groups=32)
    n = len(kw["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, **kw)
    path = directory / f"vae-{size}"
    vae.save_pretrained(str(path))
    return path


def shard_bytes_per_sample(root: Path, manifest: dict) -> tuple[float, float]:
    """Bytes of the written shards (training + held-out) per sample, and of the image or
    latent member alone (without the tar headers and padding, which dominate tiny samples)."""
    shards = sorted((root / "clusters").rglob("shard-*.tar"))
    total = sum(f.stat().st_size for f in shards)
    payload = sum(len(s.get("png", b"")) + len(s.get("latent.npy", b""))
                  for s in iter_samples([str(f) for f in shards]))
    return total / manifest["num_samples"], payload / manifest["num_samples"]


def latent_part(tmp: Path, corpus: Path, num_actors: int) -> list[dict]:
    """Pixel path vs latent path (tiny VAE on CPU) on the same RGB corpus, in one run."""
    vae = save_vae(tmp)
    rows = []
    for name, extra in (("pixels", []), ("latents", [f"latents.vae={vae}"])):
        root = tmp / f"latent-part-{name}"
        cfg = load_config(None, [
            f"root={root}", "corpus.source=webdataset", f"corpus.uri={corpus}",
            "corpus.channels=3", "corpus.image_size=16", "tracking.enabled=false",
            f"clustering.num_actors={num_actors}", *extra])
        timed_prepare(cfg)  # warm-up
        wall, n = timed_prepare(cfg)
        manifest = json.loads((root / "clusters" / "manifest.json").read_text())
        per_sample, payload = shard_bytes_per_sample(root, manifest)
        rows.append({"path": name, "samples": n, "wall_s": round(wall, 2),
                     "images_per_s": round(n / wall, 1),
                     "shard_bytes_per_sample": round(per_sample, 1),
                     "member_bytes_per_sample": round(payload, 1)})
        print(rows[-1], flush=True)
    rows[1]["latent_over_pixel_throughput"] = round(rows[1]["images_per_s"]
                                                    / rows[0]["images_per_s"], 3)
    return rows


def vae_part(tmp: Path, device: str, size: int, max_batch: int, repeats: int = 3) -> list[dict]:
    """Encoder throughput of sd-vae-ft-mse-sized random weights, float16 on a GPU (float32
    on the CPU), batch doubled until it does not fit (or ``max_batch``)."""
    import torch

    from hdd_ray.config import LatentsConfig
    from hdd_ray.latents import Vae, vae_info

    path = save_vae(tmp, "sd")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    info = vae_info(LatentsConfig(vae=str(path)), size, 3)
    vae = Vae(info, device)  # float16 on a GPU (sd-vae-ft-mse runs in fp16), float32 on a CPU
    rows, batch = [], 1
    while batch <= max_batch:
        x = torch.rand(batch, 3, size, size) * 2 - 1
        try:
            vae.encode(x)  # warm-up (cuDNN autotune, allocator)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(repeats):
                vae.encode(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / repeats
        except torch.OutOfMemoryError:
            break
        rows.append({"device": device, "image_size": size, "batch": batch,
                     "dtype": str(vae.dtype).removeprefix("torch."),
                     "images_per_s": round(batch / wall, 1)})
        print(rows[-1], flush=True)
        batch *= 2
    return rows


def timed_prepare(cfg) -> tuple[float, int]:
    t = time.perf_counter()
    manifest = prepare_corpus(cfg, force=True)
    return time.perf_counter() - t, manifest["num_samples"]


def main() -> None:
    """Run the benchmark, print a markdown table, save JSON under benchmarks/out/."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,2,4", help="corpus multiples for the scaling part")
    ap.add_argument("--embedders", default="pixels,dinov2")
    ap.add_argument("--num-actors", type=int, default=2)
    ap.add_argument("--part", default="ray,scaling,latents",
                    help="comma list of: ray (table 1), scaling, latents, vae")
    ap.add_argument("--vae-device", default="cpu", help="device of the vae part (cuda, cpu)")
    ap.add_argument("--vae-size", type=int, default=256, help="image size of the vae part")
    ap.add_argument("--vae-max-batch", type=int, default=1024)
    args = ap.parse_args()
    parts = set(args.part.split(","))

    import logging

    import ray

    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": f"{os.cpu_count()} CPUs", "ray_vs_loop": [], "scaling": []}
    if "vae" in parts:  # no Ray needed: the encoder alone
        results["vae"] = vae_part(tmp, args.vae_device, args.vae_size, args.vae_max_batch)
        if parts == {"vae"}:
            (OUT / "bench_prepare_vae.json").write_text(json.dumps(results, indent=2))
            return
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    weights = tmp / "dinov2_vits14.pth"
    import timm
    import torch

    torch.save(timm.create_model("vit_small_patch14_dinov2", pretrained=False,
                                 img_size=56).state_dict(), weights)
    embedder_args = {
        "pixels": [],
        "dinov2": ["clustering.embedder=dinov2",
                   "clustering.embedder_arch=vit_small_patch14_dinov2",
                   f"clustering.embedder_weights={weights}", "clustering.embedder_image_size=56"],
    }
    corpus1 = replicate_demo(tmp / "corpus", 1)
    if "latents" in parts:
        results["latents"] = latent_part(tmp, corpus1, args.num_actors)
    for name in args.embedders.split(",") if "ray" in parts else []:
        cfg = load_config(None, [
            f"root={tmp / ('ray-' + name)}", "corpus.source=webdataset", f"corpus.uri={corpus1}",
            "tracking.enabled=false", f"clustering.num_actors={args.num_actors}",
            *embedder_args[name],
        ])
        timed_prepare(cfg)  # warm-up: worker processes, imports, model files in page cache
        ray_s, n = timed_prepare(cfg)
        t = time.perf_counter()
        n_loop = plain_loop(corpus1, cfg, tmp / ("loop-" + name))
        loop_s = time.perf_counter() - t
        assert n_loop == n
        row = {"embedder": name, "samples": n, "ray_s": round(ray_s, 2),
               "loop_s": round(loop_s, 2), "ray_per_s": round(n / ray_s, 1),
               "loop_per_s": round(n / loop_s, 1), "ray_over_loop": round(loop_s / ray_s, 3)}
        results["ray_vs_loop"].append(row)
        print(row, flush=True)

    base = None
    for times in [int(s) for s in args.sizes.split(",")] if "scaling" in parts else []:
        corpus = corpus1 if times == 1 else replicate_demo(tmp / "corpus", times)
        cfg = load_config(None, [
            f"root={tmp / f'scale-{times}'}", "corpus.source=webdataset", f"corpus.uri={corpus}",
            "tracking.enabled=false", f"clustering.num_actors={args.num_actors}",
        ])
        wall, n = timed_prepare(cfg)
        base = base or wall
        row = {"times": times, "samples": n, "wall_s": round(wall, 2),
               "per_s": round(n / wall, 1), "wall_vs_1x": round(wall / base, 2)}
        results["scaling"].append(row)
        print(row, flush=True)

    name = "bench_prepare.json" if {"ray", "scaling"} <= parts else \
        f"bench_prepare_{'_'.join(sorted(parts))}.json"
    (OUT / name).write_text(json.dumps(results, indent=2))
    for r in results.get("latents", []):
        print(f"| {r['path']} | {r['samples']} | {r['wall_s']} | {r['images_per_s']} | "
              f"{r['shard_bytes_per_sample']} | {r['member_bytes_per_sample']} |")
    for r in results.get("vae", []):
        print(f"| {r['device']} | {r['image_size']} | {r['batch']} | {r['dtype']} | "
              f"{r['images_per_s']} |")
    print("\n| embedder | samples | Ray Data s | plain loop s | Ray/loop throughput |")
    print("|---|---|---|---|---|")
    for r in results["ray_vs_loop"]:
        print(f"| {r['embedder']} | {r['samples']} | {r['ray_s']} | {r['loop_s']} | "
              f"{r['ray_over_loop']} |")
    print("\n| corpus | samples | wall s | samples/s | wall vs 1x |")
    print("|---|---|---|---|---|")
    for r in results["scaling"]:
        print(f"| {r['times']}x | {r['samples']} | {r['wall_s']} | {r['per_s']} | "
              f"{r['wall_vs_1x']} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
