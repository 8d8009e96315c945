"""The demo main job end to end: wall time per phase and the demo's quality, before and after.

Each recorded run is ``python jobs/train_all_experts.py root=<fresh root> [overrides]`` run as a
subprocess from a source tree (this one, or another: e.g. an older commit exported with
``git archive``), on a fresh root, with the job's own output saved. What is recorded:

* **phases** (wall s): prepare (job start -> ``clusters/manifest.json`` written; Python and Ray
  start included), training (-> the job's ``N/M runs ok`` line), evaluation (-> ``done``),
  total;
* **per run** (from each ``expert.json`` / ``router.json``): steps, steps/s inside the loop, the
  loop's wall time; Ray Train's start-up and tear-down per run is estimated as
  ``(slots x training wall - sum of loop walls) / runs`` (``slots`` = runs at a time);
* **quality**: per evaluated mixture FID, its floor, the gap FID - floor, CLIP score,
  diversity (with their 95 % intervals), and the router's top-1 accuracy by t (and its mean);
* **paired differences** between two labels (``compare``): for each assignment the two
  mixtures were sampled from the same prompts and noise seeds, so ``after - before`` per metric
  has a paired bootstrap interval (``hdd_ray.evaluation.statistics.paired_differences``).

Results go to ``benchmarks/out/bench_demo.json`` (one entry per label; re-running a label
replaces it). Wall times on a shared machine are noisy: compare ratios from runs made one after
the other, and re-measure the headline on a quiet machine.

    python benchmarks/bench_demo.py run --label after                      # this tree
    git archive <commit> | tar -x -C /tmp/before
    python benchmarks/bench_demo.py run --label before --tree /tmp/before
    python benchmarks/bench_demo.py compare before after                  # markdown tables
    python benchmarks/bench_demo.py step            # CPU ms of a training step's parts
    python benchmarks/bench_demo.py executor        # a run's start-up: Ray Train vs a Ray task
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out" / "bench_demo.json"


def _load() -> dict[str, Any]:
    return json.loads(OUT.read_text()) if OUT.exists() else {}


def _save(results: dict[str, Any]) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1, sort_keys=True))


def run_demo(tree: Path, root: Path, overrides: list[str], log_path: Path) -> dict[str, Any]:
    """Run the demo main job from ``tree`` on ``root``; returns the phase times (wall s)."""
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # the demo's own local instance, as a first-time user runs it
    # the tree under test, not the installed package (init_ray hands it on to Ray's workers)
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    cmd = [sys.executable, str(tree / "jobs" / "train_all_experts.py"), f"root={root}", *overrides]
    marks: dict[str, float] = {}
    start = time.time()
    # cwd = the root: whatever a job writes relative to its working directory stays there
    with open(log_path, "w") as log, subprocess.Popen(
            cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1) as proc:
        for line in proc.stdout:
            now = time.time()
            log.write(f"{now - start:8.1f} {line}")
            log.flush()  # follow it live: tail -f benchmarks/out/bench_demo-<label>.log
            if re.search(r"\d+/\d+ runs ok in", line):
                marks.setdefault("trained", now)
            elif line.startswith("done in"):
                marks.setdefault("done", now)
        rc = proc.wait()
    end = time.time()
    manifest = root / "clusters" / "manifest.json"
    prepared = manifest.stat().st_mtime if manifest.exists() else float("nan")
    trained, done = marks.get("trained", float("nan")), marks.get("done", end)
    return {"rc": rc, "total_s": end - start, "prepare_s": prepared - start,
            "train_s": trained - prepared, "evaluate_s": done - trained}


def runs_of(root: Path) -> list[dict[str, Any]]:
    """Per run: name, steps, loop wall time and steps/s (from the exported JSON files)."""
    rows = []
    for path in sorted(glob.glob(str(root / "experts" / "*" / "expert.json"))
                       + glob.glob(str(root / "router" / "*" / "router.json"))):
        desc = json.loads(Path(path).read_text())
        wall = float(desc["wall_time_s"])
        rows.append({"name": Path(path).parent.name, "steps": int(desc["steps"]),
                     "loop_s": wall, "steps_per_s": desc["steps"] / wall if wall else 0.0})
    return rows


def quality_of(root: Path) -> dict[str, Any]:
    """Mixture metrics (by assignment) and the router's accuracy by t."""
    mixtures = {}
    for path in glob.glob(str(root / "mixtures" / "*" / "metrics.json")):
        m = json.loads(Path(path).read_text())
        row = {k: m.get(k) for k in ("mixture_id", "fid", "fid_low", "fid_high", "fid_floor",
                                     "clip_score", "clip_score_low", "clip_score_high",
                                     "diversity", "diversity_low", "diversity_high", "fid_n",
                                     "num_samples", "steps", "sampler", "sampling_seconds")}
        row["fid_gap"] = m["fid"] - m["fid_floor"]
        mixtures[m["assignment"]] = row
    router = {}
    for path in glob.glob(str(root / "router" / "*" / "router.json")):
        router = json.loads(Path(path).read_text()).get("top1_accuracy_by_t") or {}
    mean = sum(router.values()) / len(router) if router else None
    return {"mixtures": mixtures, "router_top1_by_t": router, "router_top1_mean": mean}


def cmd_run(args: argparse.Namespace) -> None:
    """Record one demo run under ``args.label``."""
    tree = Path(args.tree).resolve() if args.tree else REPO
    root = Path(args.root or tempfile.mkdtemp(prefix=f"bench-demo-{args.label}-")).resolve()
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"error: root {root} is not empty (the benchmark needs a fresh root)")
    log_path = OUT.parent / f"bench_demo-{args.label}.log"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    phases = run_demo(tree, root, args.overrides, log_path)
    runs = runs_of(root)
    loop_sum = sum(r["loop_s"] for r in runs)
    slots = args.slots
    overhead = ((slots * phases["train_s"] - loop_sum) / len(runs)) if runs else None
    entry = {"label": args.label, "tree": str(tree), "root": str(root), "overrides": args.overrides,
             "date": time.strftime("%Y-%m-%d %H:%M"), "load_before": load,
             "load_after": os.getloadavg(), "cpus": os.cpu_count(), **phases,
             "runs": runs, "runs_loop_s_sum": loop_sum, "slots": slots,
             "ray_overhead_per_run_s": overhead, "quality": quality_of(root), "log": str(log_path)}
    results = _load()
    results[args.label] = entry
    _save(results)
    print(json.dumps({k: v for k, v in entry.items() if k not in ("runs", "quality")}, indent=1))
    print(json.dumps(entry["quality"], indent=1))


def cmd_record(args: argparse.Namespace) -> None:
    """Record a demo run made elsewhere (its finished root, and its job output if kept)."""
    root = Path(args.root).resolve()
    phases: dict[str, Any] = {"rc": None}
    if args.log:
        text = Path(args.log).read_text()
        trained = re.search(r"\d+/\d+ runs ok in (\d+) s", text)
        done = re.search(r"^done in (\d+) s", text, re.M)
        if trained and done:  # the job's own clock: start -> trained -> done
            phases.update(total_s=float(done.group(1)), train_and_prepare_s=float(trained.group(1)),
                          evaluate_s=float(done.group(1)) - float(trained.group(1)), rc=0)
    runs = runs_of(root)
    entry = {"label": args.label, "root": str(root), "recorded_from": args.log, "note": args.note,
             **phases, "runs": runs, "runs_loop_s_sum": sum(r["loop_s"] for r in runs),
             "quality": quality_of(root)}
    results = _load()
    results[args.label] = entry
    _save(results)
    print(json.dumps(entry["quality"], indent=1))


def paired(before: dict[str, Any], after: dict[str, Any], assignment: str) -> dict[str, Any] | None:
    """``after - before`` per metric of one assignment, paired by sample (or None)."""
    from hdd_ray.evaluation import statistics
    from hdd_ray.evaluation.mixture import load_per_sample

    rows = [e["quality"]["mixtures"].get(assignment) for e in (before, after)]
    if None in rows:
        return None
    loaded = [load_per_sample(os.path.join(e["root"], "mixtures"), r["mixture_id"])
              for e, r in zip((before, after), rows, strict=True)]
    if None in loaded:
        return None
    (sb, rb, pb), (sa, ra, pa) = loaded
    if pa is None or pa != pb or sa.prompts_hash != sb.prompts_hash:
        return None
    keys = statistics.METRICS
    diff = statistics.paired_differences({k: rows[1][k] for k in keys}, ra,
                                         {k: rows[0][k] for k in keys}, rb)
    return {k: {"estimate": iv.estimate, "low": iv.low, "high": iv.high,
                "significant": iv.significant} for k, iv in diff.items()}


def cmd_compare(args: argparse.Namespace) -> None:
    """Markdown tables: phases, per-run figures, quality and paired differences."""
    results = _load()
    a, b = results[args.before], results[args.after]
    print(f"| phase | {args.before} s | {args.after} s | {args.after} / {args.before} |")
    print("|---|---|---|---|")
    for key in ("prepare_s", "train_s", "train_and_prepare_s", "evaluate_s", "total_s"):
        va, vb = a.get(key), b.get(key)
        if key == "train_and_prepare_s" and vb is None and b.get("train_s") is not None:
            vb = b["train_s"] + b["prepare_s"]
        if va is None or vb is None:
            continue
        print(f"| {key[:-2]} | {va:.0f} | {vb:.0f} | {vb / va:.2f} |")
    for e in (a, b):
        sps = [r["steps_per_s"] for r in e["runs"]]
        over = e.get("ray_overhead_per_run_s")
        print(f"\n{e['label']}: {len(e['runs'])} runs, loop s sum {e['runs_loop_s_sum']:.0f}, "
              f"steps/s {min(sps):.1f}-{max(sps):.1f}"
              + (f", Ray Train start-up + tear-down + idle slot per run ~{over:.0f} s (estimate)"
                 if over is not None else "")
              + (f", load {e['load_before']}" if e.get("load_before") else ""))
    print(f"\n| mixture | metric | {args.before} | {args.after} | paired {args.after} - "
          f"{args.before} (95 %) |")
    print("|---|---|---|---|---|")
    for assignment in sorted(a["quality"]["mixtures"]):
        ra, rb = a["quality"]["mixtures"][assignment], b["quality"]["mixtures"].get(assignment)
        if rb is None:
            continue
        diff = paired(a, b, assignment) or {}
        for key in ("fid", "fid_gap", "clip_score", "diversity"):
            d = diff.get(key if key != "fid_gap" else "fid")  # same floor: gap diff = FID diff
            dtext = (f"{d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
                     + (" significant" if d["significant"] else "")) if d else "-"
            print(f"| {assignment} | {key} | {ra[key]:.3f} | {rb[key]:.3f} | {dtext} |")
    qa, qb = a["quality"], b["quality"]
    if qa["router_top1_mean"] is not None and qb["router_top1_mean"] is not None:
        print(f"| router | top-1 accuracy, mean over t | {qa['router_top1_mean']:.3f} | "
              f"{qb['router_top1_mean']:.3f} | - |")


def cmd_step(args: argparse.Namespace) -> None:
    """CPU time of one DiT-T/2 training step of the demo, by part, with the old and new
    optimizer/EMA and caption lengths (process CPU time, one thread: robust to other load)."""
    import copy

    import torch

    from hdd_ray.models.expert import ExpertModel
    from hdd_ray.training.loop import EMA

    torch.set_num_threads(1)
    captions = [f"a small scan of a handwritten {d}" for d in range(10)] * 7

    def timed(fn, n: int) -> float:
        for _ in range(3):
            fn()
        t = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - t) / n * 1000

    rows = {}
    for max_len in (16, 8):
        text = {"encoder": "learned", "vocab_size": 1024, "max_len": max_len, "dim": 64, "depth": 1}
        torch.manual_seed(0)
        model = ExpertModel("DiT-T/2", text, 8, 1)
        x, t = torch.randn(args.batch, 1, 8, 8), torch.rand(args.batch) * 1000
        cond = model.tokenize(captions[:args.batch])

        def fwd_bwd(model=model, x=x, t=t, cond=cond) -> None:
            ((model(x, t, cond) - x) ** 2).mean().backward()

        rows[f"forward+backward, max_len {max_len}"] = timed(fwd_bwd, args.steps)
        if max_len == 8:
            rows["tokenize 64 captions"] = timed(lambda m=model: m.tokenize(captions[:args.batch]),
                                                 args.steps)
            params = [p for p in model.parameters() if p.requires_grad]
            for grad in params:
                grad.grad = torch.randn_like(grad)
            for kind in ({"foreach": False}, {"foreach": True}, {"fused": True}):
                opt = torch.optim.AdamW(params, lr=1e-3, **kind)
                name = ", ".join(f"{k}={v}" for k, v in kind.items())
                rows[f"AdamW step, {name}"] = timed(opt.step, args.steps)

            shadow = copy.deepcopy(model).requires_grad_(False)

            def loop_ema(shadow=shadow, model=model) -> None:  # the loop's EMA before
                with torch.no_grad():
                    for e, p in zip(shadow.parameters(), model.parameters(), strict=True):
                        e.lerp_(p.detach().to(e.dtype), 0.01)
                    for e, b in zip(shadow.buffers(), model.buffers(), strict=True):
                        e.copy_(b)

            rows["EMA update, per-parameter lerp_"] = timed(loop_ema, args.steps)
            ema = EMA(model, 0.99)
            rows["EMA update, _foreach_lerp_"] = timed(lambda e=ema, m=model: e.update(m), args.steps)
    print(f"| part (batch {args.batch}, 1 thread) | CPU ms per step |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.2f} |")
    results = _load()
    results["step_parts_ms"] = {"batch": args.batch, "date": time.strftime("%Y-%m-%d %H:%M"),
                                "load": os.getloadavg(), **rows}
    _save(results)


def _trivial_loop(config: dict[str, Any]) -> None:
    import ray.train
    import torch  # noqa: F401  (what a real run imports)

    import hdd_ray.training.loop  # noqa: F401

    ray.train.report({"step": 1})


def _trivial_task() -> int:
    import torch  # noqa: F401

    import hdd_ray.training.loop  # noqa: F401

    return 1


def _machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine so far (``/proc/stat``: every process counts)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def cmd_executor(args: argparse.Namespace) -> None:
    """What starting a run costs under each executor: a Ray Train ``fit()`` of an empty loop
    against a Ray task, on a local 2-CPU instance (wall s, and busy CPU-s of the machine)."""
    import ray
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"  # as the launcher on one node
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="bench-executor-")

    def fit(i: int) -> None:
        TorchTrainer(_trivial_loop,
                     scaling_config=ScalingConfig(num_workers=1,
                                                  resources_per_worker={"CPU": 0.25}),
                     run_config=RunConfig(name=f"r{i}", storage_path=storage,
                                          logging_config=LoggingConfig(log_level="WARNING"))
                     ).fit()

    task = ray.remote(num_cpus=0.25)(_trivial_task)
    rows = {}
    for name, once in (("Ray Train fit()", fit), ("Ray task", lambda i: ray.get(task.remote()))):
        once(-1)  # warm-up: the first worker process of its kind imports torch
        walls, cpus = [], []
        for i in range(args.repeats):
            wall, cpu = time.time(), _machine_cpu_s()
            once(i)
            walls.append(time.time() - wall)
            cpus.append(_machine_cpu_s() - cpu)
        rows[name] = {"wall_s": sum(walls) / len(walls), "machine_cpu_s": sum(cpus) / len(cpus)}
    ray.shutdown()
    print("| executor (empty run, after one warm-up) | wall s | busy CPU-s of the machine |")
    print("|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['wall_s']:.2f} | {row['machine_cpu_s']:.2f} |")
    results = _load()
    results["executor_start_cost"] = {"date": time.strftime("%Y-%m-%d %H:%M"),
                                      "load": os.getloadavg(), **rows}
    _save(results)


def main() -> None:
    """``run`` runs and records the demo; ``record`` records a finished root; ``compare``
    prints two recorded runs side by side."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the demo main job on a fresh root and record it")
    run.add_argument("--label", required=True)
    run.add_argument("--tree", default=None, help="source tree to run (default: this one)")
    run.add_argument("--root", default=None, help="fresh campaign root (default: a temp dir)")
    run.add_argument("--slots", type=int, default=2, help="runs at a time (ray.max_concurrent_experts)")
    run.add_argument("overrides", nargs="*", help="key=value config overrides for the job")
    rec = sub.add_parser("record", help="record a finished demo root run elsewhere")
    rec.add_argument("--label", required=True)
    rec.add_argument("--root", required=True)
    rec.add_argument("--log", default=None, help="the job's saved output (for its timings)")
    rec.add_argument("--note", default="")
    step = sub.add_parser("step", help="CPU ms of the parts of one demo training step")
    step.add_argument("--batch", type=int, default=64)
    step.add_argument("--steps", type=int, default=30)
    ex = sub.add_parser("executor", help="start-up cost of a run: Ray Train fit() vs Ray task")
    ex.add_argument("--repeats", type=int, default=3)
    cmp = sub.add_parser("compare", help="print two recorded runs side by side")
    cmp.add_argument("before")
    cmp.add_argument("after")
    args = parser.parse_args()
    {"run": cmd_run, "record": cmd_record, "step": cmd_step, "compare": cmd_compare,
     "executor": cmd_executor}[args.cmd](args)


if __name__ == "__main__":
    main()
