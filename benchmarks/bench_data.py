"""Streaming training data: bounded memory and no loss of speed (measured side by side).

One expert's training worker (``hdd_ray.training.loop.run_loop`` with ``LocalHooks``, the same
loop Ray Train runs) in a fresh subprocess per measurement, on a cluster built from the demo
corpus (a demo cluster: ``DEMO_NUM_SAMPLES // 8`` digits), replicated with fresh keys into
WebDataset shards of 500 samples:

1. ``rss_ratio``: peak RSS of the streaming worker's whole process tree (the worker and its
   data producer process, summed, sampled every 20 ms) with the cluster at ``--factor`` (16)
   times the demo cluster's size over the same at 1x. Target <= 1.2.
2. ``throughput_ratio``: training steps/s streaming over in memory, on the same (16x) cluster,
   runs alternated ``--rounds`` times, best of each. Target >= 0.9. The loop's rate counts the
   stream's start-up (its first block is read whole, then shuffled, before the first batch;
   the in-memory path decodes everything before its clock starts);
   ``throughput_ratio_steady`` leaves the first :data:`WARMUP_STEPS` steps out of both.

3. ``min_distinct_shards_per_100_steps``: how widely a stream mixes its cluster. With shards
   of 500 samples, ``shuffle_buffer`` 2,000 and ``open_shards`` 16 (``--mix-shards`` 64 shards,
   each its own label), the fewest distinct shards among the samples of any 100 consecutive
   steps (windows every 10 steps over one epoch). Target >= 8.

The in-memory worker's RSS at 16x is recorded beside them (``rss_memory_16x_mb``).

    python benchmarks/bench_data.py                                # the demo's 8x8 digits
    python benchmarks/bench_data.py --image-size 64 --channels 3   # data that weighs something
    python benchmarks/bench_data.py --steps 20 --factor 2 --rounds 1 --out /tmp/b.json  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: steps left out of the steady rate: a stream's first batch waits for its first block (read
#: whole before it is shuffled), the in-memory path decoded everything before its clock started
WARMUP_STEPS = 10


def write_cluster(directory: str, factor: int, image_size: int, channels: int,
                  shard_size: int = 500) -> int:
    """A demo-sized cluster times ``factor`` (fresh keys), as shards in ``directory``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from hdd_ray.corpus import DEMO_NUM_SAMPLES, demo_caption, encode_png, write_tar

    digits = load_digits()
    base = DEMO_NUM_SAMPLES // 8
    pixels = np.rint(digits.images[:base] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = []
    for img in pixels:
        pil = Image.fromarray(img).resize((image_size, image_size), Image.Resampling.BICUBIC)
        arr = np.asarray(pil.convert("RGB" if channels == 3 else "L"))
        images.append(encode_png(arr if arr.ndim == 3 else arr[:, :, None]))
    os.makedirs(directory, exist_ok=True)
    samples = []
    for copy in range(factor):
        for i, png in enumerate(images):
            key = f"rep{copy:03d}-digit-{i:06d}"
            caption = demo_caption(int(digits.target[i]), key)
            samples.append({"__key__": key, "png": png, "txt": caption,
                            "json": json.dumps({"cluster": 0})})
    for n, start in enumerate(range(0, len(samples), shard_size)):
        write_tar(os.path.join(directory, f"shard-{n:06d}.tar"), samples[start:start + shard_size])
    return len(samples)


def shard_mixing(directory: str, num_shards: int, batch_size: int, window: int = 100,
                 stride: int = 10) -> dict:
    """The stream over ``num_shards`` shards of 500 samples (shuffle buffer 2,000, 16 open
    shards): the fewest distinct shards among the samples of any ``window`` consecutive steps
    of batch ``batch_size``, over one epoch (each shard its own label, so a batch's labels say
    where its samples came from)."""
    import numpy as np

    from hdd_ray.config import DataConfig
    from hdd_ray.samples import Decoding
    from hdd_ray.training.data import StreamSource

    per_shard = 500
    _write_labelled_shards(directory, num_shards, per_shard)
    shards = [(os.path.join(directory, f"shard-{i:06d}.tar"), i) for i in range(num_shards)]
    settings = DataConfig(mode="stream", shuffle_buffer=2000, open_shards=16)
    source = StreamSource(shards, Decoding(8, 1), settings, seed=0)
    steps = num_shards * per_shard // batch_size  # one epoch
    seen = []
    try:
        for _ in range(steps):
            seen.append(np.unique(source.next_batch(batch_size)[2].numpy()))
    finally:
        source.close()
    distinct = [len(np.unique(np.concatenate(seen[s:s + window])))
                for s in range(0, max(1, steps - window + 1), stride)]
    return {"min_distinct_shards_per_100_steps": int(min(distinct)),
            "mean_distinct_shards_per_100_steps": float(np.mean(distinct)),
            "mix_shards": num_shards, "mix_shard_size": per_shard, "mix_shuffle_buffer": 2000,
            "mix_open_shards": 16, "mix_steps": steps, "mix_batch_size": batch_size}


def _write_labelled_shards(directory: str, num_shards: int, per_shard: int) -> None:
    """``num_shards`` shards of ``per_shard`` 8x8 digits (the demo's images, fresh keys)."""
    import numpy as np
    from sklearn.datasets import load_digits

    from hdd_ray.corpus import encode_png, write_tar

    digits = load_digits()
    pngs = [encode_png(np.rint(img * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, :, None])
            for img in digits.images[:per_shard]]
    os.makedirs(directory, exist_ok=True)
    for n in range(num_shards):
        write_tar(os.path.join(directory, f"shard-{n:06d}.tar"),
                  [{"__key__": f"s{n:04d}-{i:05d}", "png": png, "txt": f"digit {i}",
                    "json": json.dumps({"cluster": 0})} for i, png in enumerate(pngs)])


def worker(args: argparse.Namespace) -> None:
    """One training worker: prints ``{"steps_per_s", "max_rss_mb", "mode"}``."""
    from hdd_ray.config import load_config, resolve_experts
    from hdd_ray.training import loop
    from hdd_ray.training.loop import LocalHooks, run_loop
    from hdd_ray.training.settings import RunSettings

    shards = sorted(str(p) for p in Path(args.shards).glob("*.tar"))
    cfg = load_config(overrides=["experts.ddpm_clusters=[]"])
    expert = resolve_experts(cfg)[0]
    train = dict(expert.train, steps=args.steps, checkpoint_every=10 ** 6,
                 batch_size=args.batch_size)
    config = {"kind": "expert", "expert": asdict(expert), "train": train,
              "image_size": args.image_size, "channels": args.channels, "shards": shards,
              "num_samples": args.num_samples, "torch_threads": 1,
              "data": {**asdict(cfg.experts.data), "mode": args.mode}}
    peak, stop = [0.0], threading.Event()

    def watch() -> None:  # the process tree's summed RSS, every 20 ms
        while not stop.wait(0.02):
            peak[0] = max(peak[0], tree_rss_mb(os.getpid()))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    ends: list[float] = []  # when each step ended: the steady rate leaves the start-up out
    real_step = loop._Run.step

    def timed_step(self, step: int):
        out = real_step(self, step)
        ends.append(time.perf_counter())
        return out

    loop._Run.step = timed_step
    with tempfile.TemporaryDirectory() as d:
        last = run_loop(RunSettings.from_dict(config), LocalHooks(d))
    stop.set()
    watcher.join()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    skip = min(WARMUP_STEPS, len(ends) // 2)
    steady = (len(ends) - 1 - skip) / (ends[-1] - ends[skip]) if len(ends) > skip + 1 else 0.0
    print(json.dumps({"steps_per_s": last["steps_per_s"], "steady_steps_per_s": steady,
                      "max_rss_mb": max(peak[0], rss), "max_rss_self_mb": rss,
                      "data_wait_share": last.get("data_wait_share"), "mode": args.mode}))


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, summed, in MiB (Linux ``/proc``)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, StopIteration):
            continue  # a process that just ended
    return total / 1024


def measure(shards: str, mode: str, args: argparse.Namespace, num_samples: int) -> dict:
    """Run one worker subprocess and parse its line."""
    cmd = [sys.executable, __file__, "--worker", "--shards", shards, "--mode", mode,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--image-size", str(args.image_size), "--channels", str(args.channels),
           "--num-samples", str(num_samples)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Build the clusters, run the workers, write the JSON and print a table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    parser.add_argument("--num-samples", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--factor", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mix-shards", type=int, default=64,
                        help="shards of 500 samples for min_distinct_shards_per_100_steps")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "bench_data.json"))
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        one, many = os.path.join(tmp, "1x"), os.path.join(tmp, f"{args.factor}x")
        n1 = write_cluster(one, 1, args.image_size, args.channels)
        nk = write_cluster(many, args.factor, args.image_size, args.channels)
        started = time.time()
        rss_1x = measure(one, "stream", args, n1)["max_rss_mb"]
        rss_kx = measure(many, "stream", args, nk)["max_rss_mb"]
        memory_runs, stream_runs = [], []
        for _ in range(args.rounds):  # alternated: the machine's load hits both alike
            memory_runs.append(measure(many, "memory", args, nk))
            stream_runs.append(measure(many, "stream", args, nk))
        mixing = shard_mixing(os.path.join(tmp, "mix"), args.mix_shards, args.batch_size)
    memory_sps = max(r["steps_per_s"] for r in memory_runs)
    stream_sps = max(r["steps_per_s"] for r in stream_runs)
    steady = {m: max(r["steady_steps_per_s"] for r in runs)
              for m, runs in (("memory", memory_runs), ("stream", stream_runs))}
    result = {
        "rss_ratio": rss_kx / rss_1x,
        "throughput_ratio": stream_sps / memory_sps,
        "throughput_ratio_steady": steady["stream"] / steady["memory"],
        "steady_steps_per_s_memory": steady["memory"], "steady_steps_per_s_stream": steady["stream"],
        "data_wait_share_stream": min(r["data_wait_share"] for r in stream_runs),
        "rss_stream_1x_mb": rss_1x, f"rss_stream_{args.factor}x_mb": rss_kx,
        f"rss_memory_{args.factor}x_mb": max(r["max_rss_mb"] for r in memory_runs),
        "steps_per_s_memory": memory_sps, "steps_per_s_stream": stream_sps,
        "samples_1x": n1, f"samples_{args.factor}x": nk, "factor": args.factor,
        "image_size": args.image_size, "channels": args.channels, "steps": args.steps,
        "batch_size": args.batch_size, "rounds": args.rounds,
        **mixing, "wall_s": time.time() - started,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| measure | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")


if __name__ == "__main__":
    main()
