"""The whole campaign at 1x and 8x the corpus: does any stage's memory grow with the data?

    python benchmarks/bench_scale.py                 # the full run (benchmarks/README.md)
    python benchmarks/bench_scale.py --quick         # a smoke run (2x, 64 px), a few minutes
    python benchmarks/bench_scale.py --base-copies 3 --steps 200 --keep

A latent-space campaign on CPU, built twice: the demo digits replicated ``--base-copies`` times
(1x) and ``--factor`` times as many (8x), fresh keys, the same resolution (``--image-size``
px RGB: the prepare stage resizes the 8x8 scans), a tiny random ``AutoencoderKL``
(``bench_prepare.save_vae(..., "tiny8")``: /8, 4 latent channels), K = 2 clusters, the demo's
DiT-T/4 experts (all ``fm_velocity``: one assignment, no baseline experts) and router-T,
streaming data (``experts.data.mode=stream``, ``router.data.mode=stream``), 1 % held out (the
paper's fraction), the judge's CLIP given as ``evaluation.clip_arch`` / ``clip_weights`` as in the
paper's config (the project's tiny open_clip architecture, random weights in a local file),
tracking off. Each stage runs in its own process (this script with ``--stage``), which starts
its own local Ray instance through the library (:func:`hdd_ray.placement.init_ray`):

* ``prepare``: ``prepare_corpus(cfg, force=True)`` (embed + VAE encode, k-means, assign,
  write: Ray Data);
* ``expert``: ``train_campaign(cfg, include_router=False)``: the K experts, ``--steps`` each
  at both sizes (``ray.executor=task``, two at a time on the 2 CPUs);
* ``router``: ``train_campaign(cfg, only=[], include_router=True)``: the router, ``--steps``,
  then its top-1 accuracy on at most 4,096 held-out samples (its own Ray task);
* ``evaluation``: ``evaluate_on_ray(cfg, specs)``: the judge (the held-out split up to
  ``max(num_samples, 4096)``, the reference statistics over the whole training split, latents
  decoded batch by batch) and one mixture's ``--num-samples`` samples, in one Ray task.

Stages run 1x then 8x, stage by stage (prepare 1x, prepare 8x, expert 1x, ...), so a change in
the shared machine's load falls on both sizes of a stage alike.

**Memory.** This process polls ``/proc`` every ``--interval`` s (0.2) while a stage runs and
sums ``VmRSS`` over the stage's process tree: the driver (the stage process) and every Ray
worker process (children of the raylet, itself a child of the driver: ``ray::IDLE``,
``ray::<task or actor>``, Ray Data's actors and tasks), and anything a worker starts. Ray's own
services (``gcs_server``, ``raylet``, the dashboard and the processes it starts, the agents
``ray::DashboardAgent`` / ``ray::RuntimeEnvAgent``, ``log_monitor``, the autoscaler's
``monitor``) are summed apart (``infra_rss_*``), not in ``rss_*``. ``rss_*`` is the largest sum
seen. Summed RSS counts a page mapped by several processes once per process (shared libraries,
object-store pages a worker maps); ``anon_*`` is the same peak over ``RssAnon`` (anonymous
memory) only. A process with its parent's command line is a fork of it (e.g. a worker caught
between fork and exec of a subprocess): it counts with its private memory only
(``smaps_rollup``), not its RSS, which would be its parent's pages a second time. A peak shorter than the interval can be missed; the driver's exact ``ru_maxrss`` is
recorded beside (``driver_maxrss_*``).

**Time.** ``time_*_s``: the stage process's own clock around the library call, Ray already
started (its start, a constant 3-30 s on a shared machine, is ``ray_start_*_s``; the whole
process with the interpreter's start and imports is ``process_*_s``). ``cpu_*_s``: CPU seconds
of the driver and the workers (from the same polls; less sensitive to other jobs on the machine
than wall time). ``load_*``: the 1-minute load average at the stage's start and end.

**Data.** ``data_mb_8x``: the 8x corpus's training split (held-out excluded) decoded as float32
images ``[3, S, S]``, what evaluation compares samples with (the latents the experts train on
are 48x smaller: ``latent_mb_8x``). For the benchmark to show memory that grows with the data,
it must exceed every stage's 1x peak (``data_exceeds_rss_1x``). MB here are MiB.

Targets: every ``rss_ratio`` <= 1.25; ``time_ratio`` <= 8.8 for prepare and evaluation, <= 1.2
for the expert and router stages (equal steps). Raw numbers: ``benchmarks/out/bench_scale.json``.
It also prints the memory plan of ``hdd_ray/configs/paper-8x-xl.yaml`` on a 24 GB and an 80 GB GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out" / "bench_scale.json"
STAGES = ("prepare", "expert", "router", "evaluation")
TARGETS = {"rss_ratio": 1.25,
           "time_ratio": {"prepare": 8.8, "expert": 1.2, "router": 1.2, "evaluation": 8.8}}
RESULT_TAG = "BENCH_SCALE_RESULT "
#: the full run's settings, and --quick's (a smoke run: 2x, not 8x, at 64 px)
FULL = {"base_copies": 2, "factor": 8, "image_size": 128, "steps": 100, "num_samples": 128,
        "sampling_steps": 8}
QUICK = {"base_copies": 1, "factor": 2, "image_size": 64, "steps": 10, "num_samples": 16,
         "sampling_steps": 2}
#: what Ray runs for itself, not for the stage (a substring of the process's command line)
RAY_SERVICES = ("gcs_server", "/raylet", "dashboard/dashboard.py", "log_monitor.py",
                "autoscaler/_private/monitor.py", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
#: held-out samples the judge keeps and the router's accuracy reads at most
#: (hdd_ray.evaluation.judge.HELDOUT_MIN, evaluation.router.ACCURACY_SAMPLES): below it at both
#: sizes, what they hold grows with the held-out split (by 8x, bounded by the cap)
HELDOUT_CAP = 4096


# --------------------------------------------------------------------------- memory sampling


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """``/proc/<pid>/stat`` after the command name (``[0]`` = state, ``[1]`` = ppid, ``[11]`` /
    ``[12]`` = user / system CPU ticks, ``[19]`` = start time), None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2:].split()


def _scan() -> tuple[dict[int, list[int]], dict[int, list[bytes]]]:
    """Every process's children, and every process's stat fields."""
    children: dict[int, list[int]] = defaultdict(list)
    stats: dict[int, list[bytes]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat_fields(entry.name)) is not None:
            stats[int(entry.name)] = fields
            children[int(fields[1])].append(int(entry.name))
    return children, stats


def _start_time(pid: int) -> bytes:
    fields = _stat_fields(pid)
    return fields[19] if fields else b""


def _status(pid: int) -> tuple[str, dict[str, int]] | None:
    """``(command line, {VmRSS, RssAnon} in KiB)`` of a live process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    kib = {k: int(fields[k].split()[0]) for k in ("VmRSS", "RssAnon") if k in fields}
    return cmdline, kib


def _private_kib(pid: int) -> int:
    """Private (clean + dirty) memory of a process, KiB (``/proc/<pid>/smaps_rollup``)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith("Private_"))
    except OSError:
        return 0


def _kind(pid: int, root: int, cmdline: str, parent: str) -> str:
    """``driver``, ``infra`` (a Ray service, or a process one started that is not a Ray worker:
    the dashboard's modules) or ``worker`` (``ray::IDLE``, ``ray::<task or actor>``, or a process
    one of them started)."""
    if pid == root:
        return "driver"
    if any(s in cmdline for s in RAY_SERVICES):
        return "infra"
    if parent == "infra" and not cmdline.startswith("ray::") and "default_worker.py" not in cmdline:
        return "infra"
    return "worker"


class TreeSampler:
    """Polls a process tree (the stage's driver and its descendants) in a thread: the peaks of
    the RSS sums (see the module docstring) and the CPU time of the driver and workers."""

    def __init__(self, root: int, interval: float) -> None:
        self.root, self.interval = root, interval
        self.peak = {"rss": 0.0, "anon": 0.0, "infra": 0.0}
        self.at_peak: list[tuple[str, float]] = []  # (process, MiB) at the rss peak
        self.max_workers = 0
        self.seen: dict[int, bytes] = {}  # pid -> its start time (for the clean-up)
        self.ticks: dict[int, int] = {}  # driver and workers: CPU ticks at the last poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the driver and the workers (up to each one's last poll)."""
        return sum(self.ticks.values()) / os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        """Start polling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (after one last sample)."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        """One poll: the tree's processes, their RSS and CPU time, the sums, the peaks."""
        children, stats = _scan()
        sums = {"rss": 0.0, "anon": 0.0, "infra": 0.0}
        rows, workers = [], 0
        todo = [(self.root, "", "")]  # (pid, its parent's kind and command line)
        while todo:
            pid, parent, parent_cmdline = todo.pop()
            status = _status(pid)
            if status is None or pid not in stats:
                continue
            cmdline, kib = status
            self.seen.setdefault(pid, stats[pid][19])
            kind = _kind(pid, self.root, cmdline, parent)
            todo.extend((child, kind, cmdline) for child in children.get(pid, ()))
            mib = kib.get("VmRSS", 0) / 1024
            if kind != "infra" and cmdline == parent_cmdline:
                # a fork of the driver or a worker (e.g. caught between fork and exec of a
                # subprocess): its pages are its parent's until written, so only its private
                # memory is its own (summing its RSS would count the parent twice)
                kind, mib = "fork", _private_kib(pid) / 1024
            if kind == "infra":
                sums["infra"] += mib
                continue
            workers += kind == "worker"
            sums["rss"] += mib
            sums["anon"] += mib if kind == "fork" else kib.get("RssAnon", 0) / 1024
            self.ticks[pid] = int(stats[pid][11]) + int(stats[pid][12])
            rows.append((f"{kind} {pid} (parent {int(stats[pid][1])}) {cmdline[:60]}",
                         round(mib, 1)))
        self.max_workers = max(self.max_workers, workers)
        if sums["rss"] > self.peak["rss"]:
            self.at_peak = sorted(rows, key=lambda r: -r[1])
        for key, value in sums.items():
            self.peak[key] = max(self.peak[key], value)


def _end_leftovers(seen: dict[int, bytes], wait_s: float = 15.0) -> list[int]:
    """Processes of a finished stage's tree still alive after ``wait_s`` (a crashed driver's Ray
    instance): each ended by its pid, checked against its start time. Returns their pids."""
    deadline = time.time() + wait_s
    alive = [p for p, t in seen.items() if t and _start_time(p) == t]
    while alive and time.time() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if _start_time(p) == seen[p]]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return alive


# --------------------------------------------------------------------------- one stage


def stage_main(stage: str, overrides_file: str) -> None:
    """The stage process: build the config, start Ray (timed apart), run one stage's entry
    point (timed), print one ``RESULT_TAG`` JSON line."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("hdd_ray").setLevel(logging.INFO)  # the stage's steps, timed in its log
    overrides = json.loads(Path(overrides_file).read_text())
    import ray

    from hdd_ray.campaign import campaign_assignments
    from hdd_ray.config import load_config
    from hdd_ray.ensemble import MixtureSpec
    from hdd_ray.evaluation.remote import evaluate_on_ray
    from hdd_ray.placement import init_ray
    from hdd_ray.prepare import prepare_corpus
    from hdd_ray.training.launcher import train_campaign

    cfg = load_config(None, overrides)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    init_ray(cfg)  # what the stage's job does first (prepare_corpus would do it after its checks)
    ray_start_s = time.perf_counter() - started
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if stage == "prepare":
        manifest = prepare_corpus(cfg, force=True)
        extra = {"num_samples": manifest["num_samples"], "counts": manifest["counts"],
                 "heldout_counts": manifest["heldout_counts"],
                 "latent_shape": (manifest.get("latents") or {}).get("shape")}
    else:
        if stage == "evaluation":
            specs = [MixtureSpec.from_config(cfg, d) for d in campaign_assignments(cfg)]
            results = evaluate_on_ray(cfg, specs)
            extra = {k: results[0].get(k) for k in ("fid", "fid_n", "fid_floor", "clip_score",
                                                    "num_samples")}
        else:
            statuses = train_campaign(cfg, only=None if stage == "expert" else [],
                                      include_router=stage == "router")
            failed = [f"{s.name}: {s.reason}" for s in statuses if not s.ok]
            if failed:
                raise SystemExit(f"{stage}: runs failed: {failed}")
            extra = {"runs": [{"name": s.name, "status": s.status, "steps": s.steps,
                               "steps_per_s": s.extra.get("steps_per_s")} for s in statuses]}
    seconds = time.perf_counter() - started
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    ray.shutdown()
    print(RESULT_TAG + json.dumps({"stage": stage, "seconds": seconds, "ray_start_s": ray_start_s,
                                   "load": [load, os.getloadavg()[0]],
                                   "driver_maxrss_mb": maxrss, **extra}), flush=True)


def run_stage(stage: str, root: Path, overrides: list[str], interval: float) -> dict[str, Any]:
    """Run ``stage`` in a fresh process on ``root``, sampling its tree's memory."""
    spec = root / f"bench-{stage}-overrides.json"
    spec.write_text(json.dumps(overrides))
    log_path = root / f"bench-{stage}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # a fresh local instance per stage
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage,
           "--overrides-file", str(spec)]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, interval)
        sampler.start()
        rc = proc.wait()
        sampler.stop()
    wall = time.perf_counter() - started
    leftovers = _end_leftovers({p: t for p, t in sampler.seen.items() if p != proc.pid})
    lines = log_path.read_text().splitlines()
    result = next((json.loads(line[len(RESULT_TAG):]) for line in reversed(lines)
                   if line.startswith(RESULT_TAG)), None)
    if rc != 0 or result is None:
        tail = "\n".join(lines[-30:])
        raise SystemExit(f"stage {stage} failed (exit {rc}), log {log_path}:\n{tail}")
    return {**result, "process_s": wall, "rss_mb": sampler.peak["rss"],
            "anon_mb": sampler.peak["anon"], "infra_rss_mb": sampler.peak["infra"],
            "cpu_s": sampler.cpu_s, "max_worker_processes": sampler.max_workers,
            "at_peak": sampler.at_peak[:8],
            "leftover_processes_ended": len(leftovers)}


# --------------------------------------------------------------------------- the campaign


def save_tiny_clip(directory: Path) -> tuple[Path, Path]:
    """The judge's CLIP (CLIP score, CLIP-FID features): the project's tiny open_clip
    architecture (``TINY_OPEN_CLIP_CONFIG``, 32 px) as a config file, random weights seeded and
    saved to a local file, given as ``evaluation.clip_arch`` / ``clip_weights`` the way the
    paper's config gives ViT-L-14."""
    import torch

    from hdd_ray.models.text import TINY_OPEN_CLIP_CONFIG
    from hdd_ray.towers import open_clip_model

    arch, weights = directory / "bench-tiny-clip.json", directory / "bench-tiny-clip.pt"
    arch.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(open_clip_model(str(arch)).state_dict(), weights)
    return arch, weights


def overrides_for(root: Path, corpus: Path, vae: Path, clip: tuple[Path, Path],
                  args: argparse.Namespace) -> list[str]:
    """The campaign's settings (the demo config underneath), the same at both sizes."""
    return [
        f"root={root}", "corpus.source=webdataset", f"corpus.uri={corpus}",
        f"corpus.image_size={args.image_size}", "corpus.channels=3", "corpus.shard_size=500",
        f"latents.vae={vae}",
        f"clustering.k={args.k}", "clustering.fine_centroids=16",
        f"clustering.heldout_fraction={args.heldout_fraction}",
        f"clustering.num_actors={args.num_actors}",
        "experts.ddpm_clusters=[]",  # the demo's DiT-T/4 and router-T
        f"experts.train.steps={args.steps}", f"experts.train.checkpoint_every={args.steps}",
        "experts.data.mode=stream",
        f"router.train.steps={args.steps}", f"router.train.checkpoint_every={args.steps}",
        "router.data.mode=stream",
        f"sampling.steps={args.sampling_steps}", "sampling.sampler=euler",
        f"sampling.k={min(2, args.k)}", "sampling.batch_size=64",
        "sampling.conversion.x0_clamp=null",  # latents are not in [-1, 1]
        f"evaluation.num_samples={args.num_samples}", "evaluation.baseline_ddpm_clusters=[]",
        f"evaluation.clip_arch={clip[0]}", f"evaluation.clip_weights={clip[1]}",
        "tracking.enabled=false", "ray.executor=task", "ray.max_concurrent_experts=2",
    ]


def memory_plan_lines(config: Path) -> list[str]:
    """The memory plan of ``config``'s runs on a 24 GB and an 80 GB GPU (issue 24): one line per
    run from the training memory planner (:mod:`hdd_ray.training.memory`)."""
    from hdd_ray.config import load_config
    from hdd_ray.training.memory import describe_plans

    cfg = load_config(config)
    # the SD-VAE's 32x32x4 latents of 256 px images (its folder is on the training nodes only)
    return [f"{gb} GB GPU:\n{describe_plans(cfg, gpu_memory_gb=gb, shape=(32, 4))}"
            for gb in (24, 80)]


def data_mb(num_train: int, image_size: int, channels: int = 3, itemsize: int = 4) -> float:
    """A training split decoded as float32 images ``[channels, S, S]``, in MiB."""
    return num_train * channels * image_size ** 2 * itemsize / 2 ** 20


def main() -> None:
    """Build both corpora, run every stage at both sizes, write the JSON, print the table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--overrides-file", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--base-copies", type=int,
                        help=f"1x corpus = this many copies of the 1,797 demo digits "
                             f"(default {FULL['base_copies']})")
    parser.add_argument("--factor", type=int,
                        help=f"the large corpus, x the 1x one (default {FULL['factor']})")
    parser.add_argument("--image-size", type=int,
                        help=f"px, RGB, a multiple of 32 (default {FULL['image_size']})")
    parser.add_argument("--k", type=int, default=2, help="clusters (= experts)")
    parser.add_argument("--heldout-fraction", type=float, default=0.01, help="as the paper's")
    parser.add_argument("--steps", type=int, help="training steps of each expert and the "
                        f"router, at both sizes (default {FULL['steps']})")
    parser.add_argument("--num-samples", type=int,
                        help=f"evaluation.num_samples (default {FULL['num_samples']})")
    parser.add_argument("--sampling-steps", type=int, help=f"default {FULL['sampling_steps']}")
    parser.add_argument("--num-actors", type=int, default=1, help="clustering.num_actors")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--interval", type=float, default=0.2, help="s between RSS polls")
    parser.add_argument("--tmp", default=None, help="work folder (default: a fresh temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the corpora and campaigns")
    parser.add_argument("--out", help=f"default {OUT} ({OUT.stem}_quick.json with --quick)")
    args = parser.parse_args()
    if args.stage:
        stage_main(args.stage, args.overrides_file)
        return
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or str(OUT.with_name(f"{OUT.stem}_quick.json") if args.quick else OUT)
    stages = [s for s in args.stages.split(",") if s]

    from bench_prepare import replicate_demo, save_vae

    started = time.time()
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="bench-scale-")).resolve()
    tmp.mkdir(parents=True, exist_ok=True)
    vae, clip = save_vae(tmp, "tiny8"), save_tiny_clip(tmp)
    sizes = {"1x": args.base_copies, f"{args.factor}x": args.base_copies * args.factor}
    roots = {}
    for label, copies in sizes.items():
        corpus = replicate_demo(tmp / "corpus", copies)
        root = tmp / f"campaign-{label}"
        root.mkdir(exist_ok=True)
        roots[label] = (root, overrides_for(root, corpus, vae, clip, args))
    print(f"work folder {tmp}; corpora of {1797 * args.base_copies} and "
          f"{1797 * args.base_copies * args.factor} samples", flush=True)

    runs: dict[str, dict[str, dict[str, Any]]] = {}
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
                              "factor": args.factor, "load_before": os.getloadavg(),
                              "args": vars(args), "targets": TARGETS}
    try:
        for stage in stages:
            for label, (root, overrides) in roots.items():
                r = run_stage(stage, root, overrides, args.interval)
                runs.setdefault(stage, {})[label] = r
                print(f"{stage:10s} {label:3s} {r['seconds']:7.1f} s  cpu {r['cpu_s']:6.1f} s  "
                      f"rss {r['rss_mb']:7.0f} MB  (anon {r['anon_mb']:.0f}, infra "
                      f"{r['infra_rss_mb']:.0f}, driver max {r['driver_maxrss_mb']:.0f}, "
                      f"{r['max_worker_processes']} workers)", flush=True)
    except SystemExit as exc:  # a stage failed: keep what was measured
        result["failed"] = str(exc)
        print(exc, file=sys.stderr)
    result.update(summarize(runs, "1x", f"{args.factor}x", args.image_size))
    from hdd_ray.config import CONFIG_DIR

    result["memory_plan"] = memory_plan_lines(CONFIG_DIR / "paper-8x-xl.yaml")
    result["wall_s"] = round(time.time() - started, 1)
    result["load_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"\n{out} written; {result['wall_s']:.0f} s in all")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    if "failed" in result:
        raise SystemExit(1)


def summarize(runs: dict[str, dict[str, dict[str, Any]]], small: str, big: str,
              image_size: int) -> dict[str, Any]:
    """The JSON's ``stages`` (each stage measured at both sizes), ``met``, and the data sizes."""
    stats: dict[str, Any] = {}
    for stage, by in runs.items():
        if small not in by or big not in by:
            continue
        one, many = by[small], by[big]
        stats[stage] = {
            "rss_1x_mb": round(one["rss_mb"], 1), "rss_8x_mb": round(many["rss_mb"], 1),
            "rss_ratio": round(many["rss_mb"] / one["rss_mb"], 3),
            "time_1x_s": round(one["seconds"], 2), "time_8x_s": round(many["seconds"], 2),
            "time_ratio": round(many["seconds"] / one["seconds"], 3),
            **{f"{key}_{size}": round(r[key], 1) for size, r in (("1x", one), ("8x", many))
               for key in ("anon_mb", "infra_rss_mb", "driver_maxrss_mb", "ray_start_s",
                           "process_s", "cpu_s")},
            "cpu_ratio": round(many["cpu_s"] / one["cpu_s"], 3),
            "load_1x": one["load"], "load_8x": many["load"],
            "max_worker_processes": [one["max_worker_processes"], many["max_worker_processes"]],
            "at_peak_8x": many["at_peak"],
        }
    out: dict[str, Any] = {"stages": stats, "met": {
        s: {"rss": v["rss_ratio"] <= TARGETS["rss_ratio"],
            "time": v["time_ratio"] <= TARGETS["time_ratio"][s]} for s, v in stats.items()}}
    prep = runs.get("prepare", {})
    if small in prep and big in prep:
        train = {label: sum(prep[label]["counts"]) for label in (small, big)}
        held = {label: sum(prep[label]["heldout_counts"]) for label in (small, big)}
        rss_1x = max(v["rss_1x_mb"] for v in stats.values())
        latent = prep[big]["latent_shape"] or [0]
        out.update({
            "samples": {label: prep[label]["num_samples"] for label in (small, big)},
            "train_samples": train, "heldout_samples": held,
            "data_mb_8x": round(data_mb(train[big], image_size), 1),
            "data_definition": f"the {big} training split as float32 images "
                               f"[3, {image_size}, {image_size}]",
            "latent_shape": latent,
            "latent_mb_8x": round(train[big] * 4 * math.prod(latent) / 2 ** 20, 1),
            "max_rss_1x_mb": rss_1x,
            "data_exceeds_rss_1x": data_mb(train[big], image_size) > rss_1x,
            "heldout_below_cap": held[big] < HELDOUT_CAP,
        })
    return out


def print_table(result: dict[str, Any]) -> None:
    """The markdown table of the README and the memory plan."""
    print(f"\ndata_mb_8x {result.get('data_mb_8x')} ({result.get('data_definition')}); "
          f"largest 1x stage peak {result.get('max_rss_1x_mb')} MB\n")
    print("| stage | rss 1x MB | rss 8x MB | rss ratio | time 1x s | time 8x s | time ratio "
          "| CPU s ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for stage, v in result["stages"].items():
        met = result["met"][stage]
        flags = ("" if met["rss"] else " (rss over)") + ("" if met["time"] else " (time over)")
        print(f"| {stage}{flags} | {v['rss_1x_mb']:.0f} | {v['rss_8x_mb']:.0f} | "
              f"{v['rss_ratio']:.3f} | {v['time_1x_s']:.1f} | {v['time_8x_s']:.1f} | "
              f"{v['time_ratio']:.3f} | {v['cpu_ratio']:.3f} |")
    print("\n" + "\n".join(result["memory_plan"]))


if __name__ == "__main__":
    main()
