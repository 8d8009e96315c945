"""GPU benchmark: memory plans, the loop, training throughput, sampling and a tiny campaign.

(Long because one script runs every GPU check of a lease in one go, each stage on its own.)

    python benchmarks/bench_gpu.py                        # a CUDA machine: everything
    python benchmarks/bench_gpu.py --peak-tflops 400      # a GPU not in the peak table
    python benchmarks/bench_gpu.py --no-ray --no-campaign --stage-timeout 200  # no Ray there
    python benchmarks/bench_gpu.py --device cpu           # CI smoke: tiny sizes, no Ray campaign

Stages, in this order (``--stages`` picks some):

1. **Memory** (``memory``): ``jobs/configs/paper-8x-xl.yaml``'s DiT-XL/2 experts (frozen CLIP
   ViT-L/14 text tower, random weights) on each node type's declared memory (24 and 80 GB), the
   GPU capped at it: the memory plan's micro-batch trains two steps, with and without
   activation checkpointing, and the measured peak is set beside the plan's estimate.
2. **The loop** (``ray_vs_bare``): ``run_loop`` bare (``LocalHooks``) on a synthetic 32x32 RGB
   shard: steps/s, the data-wait share (the loop's ``data_wait_share``), and the CUDA
   synchronisations inside its steps (``torch.cuda.set_sync_debug_mode("warn")``; target 0;
   ``sync_checked`` says a deliberate ``.item()`` was caught, so that 0 means something).
   Compiled on CUDA after a 10-step run that fills the compile cache.
   With ``--ray`` (default on CUDA) the same loop in a one-worker ``TorchTrainer``: Ray Train
   over bare, target >= 0.97.
3. **Training throughput and MFU** (``training``): the loop's step (the objective's loss under
   bf16 autocast, backward, grad clip, AdamW, EMA; ``torch.compile`` on CUDA as
   ``train.compile``) for DiT-B/2 and DiT-XL/2 on 32x32x4 inputs at the largest batch that fits
   (doubling until out of memory), steps/s, and MFU = model FLOPs per step
   (:func:`dit_forward_flops`, x3 for forward + backward) / step time / the GPU's dense bf16
   peak (:data:`PEAK_TFLOPS`, or ``--peak-tflops``); with the time split into forward+backward,
   optimizer and EMA.
4. **Sampling** (``sampling``): images/s of a K = 4 mixture (random weights, half
   ``ddpm_eps``) for top-1, top-2 and full routing, through ``Mixture.sample`` (target: top-2
   <= 2.1x top-1's time).
5. **Campaign** (``campaign``; ``--campaign``, on by default on CUDA): prepare (the embedding
   actor asks for a GPU), one ``ddpm_eps`` and one ``fm_velocity`` expert and the router under
   Ray Train with one GPU each, then the mixture's evaluation as the job runs it (a Ray task
   with one GPU). Records each stage's wall time and the device every stage ran on.

Results: ``benchmarks/out/bench_gpu.json`` (keys documented in ``benchmarks/README.md``),
written after every stage, so a stage that crashes keeps what came before. On CUDA each stage
runs in a process of its own (``--isolate``; ``--stage-timeout`` bounds each): the batch
search's cached blocks and a stage's Ray workers cannot starve the next stage; a stage that
fails records its error and the others run. The batch search counts any allocation failure as
"does not fit" (cuBLAS and cuDNN workspaces, the host), not only torch's OutOfMemoryError. When
a model misses the MFU target its training step is profiled (``--profile``) and the top kernels
saved beside the JSON. ``--device cpu`` runs DiT-T/2, a few steps and batches of at most 4,
skipping the campaign and Ray unless ``--campaign`` / ``--ray`` are given: it keeps the script
alive in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

#: dense bf16 tensor-core peak, TFLOP/s (no sparsity), matched against the CUDA device name
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "RTX 4090": 165.0, r"\bL4\b": 121.0}
OUT = Path(__file__).resolve().parent / "out" / "bench_gpu.json"
#: the stages, in the order they run (each in a process of its own with ``--isolate``)
STAGES = ("memory", "ray_vs_bare", "training", "sampling", "campaign")
TARGETS = {"mfu": 0.40, "ray_over_bare": 0.97, "top2_over_top1_time": 2.1,
           "syncs_in_steps": 0, "memory_measured_over_estimate": [0.8, 1.2]}
TEXT_LEN = 16  # caption tokens the expert's learned text encoder produces (config text.max_len)


# ------------------------------------------------------------------------------------ FLOPs


def dit_forward_flops(size: str, input_size: int, in_channels: int, text_dim: int,
                      text_len: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one DiT forward pass on one sample.

    With ``N = (input_size / p)^2`` image tokens of width ``C``, ``L`` caption tokens of width
    ``D`` and the MLP at ``4C``, each block costs: self-attention ``qkv 6NC^2 + scores and
    values 4N^2C + proj 2NC^2``; cross-attention ``q 2NC^2 + kv 4LC^2 + scores and values 4NLC +
    proj 2NC^2``; MLP ``16NC^2``. Outside the blocks: the patch embedding ``2N(p^2 c_in)C``, the
    timestep MLP ``2(256C + C^2)``, the shared ``t_block`` ``12C^2``, the caption projection
    ``2L(DC + C^2)`` and the final layer ``2NC(p^2 c_in)``. Elementwise work is not counted.
    """
    from hdd_ray.models.dit import DIT_SIZES

    spec = DIT_SIZES[size]
    c, depth, p = spec["hidden_size"], spec["depth"], spec["patch_size"]
    n, ll, patch = (input_size // p) ** 2, text_len, p * p * in_channels
    block = (28 * n * c * c + 4 * ll * c * c + 4 * n * n * c + 4 * n * ll * c)
    outside = (2 * n * patch * c + 2 * (256 * c + c * c) + 12 * c * c
               + 2 * ll * (text_dim * c + c * c) + 2 * n * c * patch)
    return depth * block + outside


def peak_tflops(name: str | None, override: float | None) -> float | None:
    """The GPU's dense bf16 peak from :data:`PEAK_TFLOPS` (``override`` wins)."""
    if override:
        return float(override)
    for pattern, peak in PEAK_TFLOPS.items():
        if name and re.search(pattern, name):
            return peak
    return None


# ------------------------------------------------------------------------------------ training


def _expert_parts(size: str, channels: int, image_size: int, device: torch.device):
    from hdd_ray.config import load_config, resolve_experts
    from hdd_ray.diffusion import get_objective
    from hdd_ray.models.expert import ExpertModel

    expert = resolve_experts(load_config())[0]
    text = dict(expert.text, max_len=TEXT_LEN)
    model = ExpertModel(size, text, image_size, channels).to(device)
    return model, get_objective("fm_velocity"), text


def _text_dim() -> int:
    from hdd_ray.config import load_config, resolve_experts

    return int(resolve_experts(load_config())[0].text["dim"])


def _timed_steps(size: str, batch: int, steps: int, device: torch.device, compile_: bool,
                 phases: bool = False) -> dict[str, Any]:
    """The loop's step on synthetic 32x32x4 latents: steps/s (and ms per phase if asked)."""
    from hdd_ray import devices
    from hdd_ray.training.loop import EMA

    model, objective, _ = _expert_parts(size, 4, 32, device)
    ema = EMA(model, 0.999)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    net = torch.compile(model) if compile_ else model
    rng = devices.TrainingStreams(0, 0, device)
    x0 = devices.randn((batch, 4, 32, 32), rng.noise, device)
    cond = model.tokenize(["a photo of a cat"] * batch, device)
    autocast = devices.autocast(device, "bf16")
    spent = {"forward_backward": 0.0, "optimizer": 0.0, "ema": 0.0}
    losses: list[torch.Tensor] = []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> None:
        t = time.perf_counter()
        with autocast:
            loss = objective.loss(net, x0, cond, 0.1, rng.noise)
        loss.backward()
        if phases:
            sync()
            spent["forward_backward"] += time.perf_counter() - t
            t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if phases:
            sync()
            spent["optimizer"] += time.perf_counter() - t
            t = time.perf_counter()
        ema.update(model)
        losses.append(loss.detach())  # kept on the device, read once at the end (as the loop)
        if phases:
            spent["ema"] += time.perf_counter() - t

    for _ in range(2):  # warm-up (kernels, allocator, compile)
        step()
    sync()
    spent.update(dict.fromkeys(spent, 0.0))  # the split counts the timed steps only
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall = time.perf_counter() - start
    out: dict[str, Any] = {"steps_per_s": steps / wall,
                           "last_loss": float(torch.stack(losses[-steps:]).float().mean())}
    if phases:
        out["phases_ms"] = {k: 1000 * v / steps for k, v in spent.items()}
    return out


def _release(device: torch.device) -> None:
    """Give back what a finished (or failed) attempt held: its garbage, the CUDA cache."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def largest_batch(size: str, device: torch.device, start: int, limit: int) -> int:
    """The largest power-of-two batch (from ``start``, at most ``limit``) whose step fits.

    Any allocation failure counts as "does not fit" (:func:`hdd_ray.devices.is_out_of_memory`);
    the failed attempt's memory is released before the next (the exception is dropped first:
    its traceback holds the attempt's tensors)."""
    from hdd_ray.devices import is_out_of_memory

    best, batch = 0, start
    while batch <= limit:
        oom = False
        try:
            _timed_steps(size, batch, 1, device, False)
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            oom = True
        _release(device)
        if oom:
            break
        best, batch = batch, batch * 2
    if best == 0:
        raise SystemExit(f"{size}: not even a batch of {start} fits on {device}")
    return best


def profile_steps(size: str, batch: int, device: torch.device, path: Path,
                  steps: int = 3) -> str:
    """Profile ``steps`` training steps; write the top kernels (by device time, else CPU time)
    to ``path``; returns the path. What a missed MFU target is looked at with."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        _timed_steps(size, batch, steps, device, False)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{size}, batch {batch}, {steps} steps on {device} (+2 warm-up)\n"
                    + prof.key_averages().table(sort_by=key, row_limit=25))
    _release(device)
    return str(path)


def training_table(args: argparse.Namespace, device: torch.device, peak: float | None) -> list:
    """Steps/s and MFU per model at its largest batch."""
    rows = []
    for size in args.models:
        batch = largest_batch(size, device, args.min_batch, args.max_batch)
        timed = _timed_steps(size, batch, args.steps, device, args.compile, phases=False)
        split = _timed_steps(size, batch, max(2, args.steps // 4), device, args.compile,
                             phases=True)
        flops = 3 * batch * dit_forward_flops(size, 32, 4, _text_dim(), TEXT_LEN)
        achieved = flops * timed["steps_per_s"] / 1e12
        mfu = achieved / peak if peak else None
        missed = mfu is not None and mfu < TARGETS["mfu"]
        profile = None
        if args.profile == "always" or (args.profile == "missed" and missed):
            name = f"bench_gpu_profile_{size.replace('/', '-')}.txt"
            where = Path(args.profile_dir) if args.profile_dir else Path(args.out).parent
            profile = profile_steps(size, batch, device, where / name)
        rows.append({"model": size, "input": [4, 32, 32], "batch": batch,
                     "compile": bool(args.compile), "steps_per_s": timed["steps_per_s"],
                     "last_loss": timed["last_loss"],
                     "samples_per_s": timed["steps_per_s"] * batch,
                     "model_tflop_per_step": flops / 1e12, "achieved_tflops": achieved,
                     "mfu": mfu, "phases_ms": split["phases_ms"], "profile": profile})
        _release(device)
        print(f"  {size} batch {batch}: {timed['steps_per_s']:.2f} steps/s, "
              f"{achieved:.2f} TFLOP/s" + (f", MFU {achieved / peak:.1%}" if peak else ""),
              flush=True)
    return rows


# ------------------------------------------------------------------------------------ memory

PAPER_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "paper-8x-xl.yaml"


def _plan_steps(expert: Any, micro: int, device: torch.device,
                steps: int = 2) -> dict[str, Any]:
    """``steps`` of the loop's optimizer step for ``expert`` (its model, text tower, AdaLN
    variant, checkpointing, bf16 autocast, AdamW, EMA) on 32x32x4 latents, its per-worker
    batch drawn once and run in micro-batches of ``micro``: the peak of allocated and of
    reserved (allocator-held) memory, from after nothing but the CUDA context was held."""
    from hdd_ray import devices
    from hdd_ray.diffusion import get_objective
    from hdd_ray.models.expert import ExpertModel
    from hdd_ray.training.loop import EMA

    tr = expert.train
    torch.cuda.reset_peak_memory_stats(device)
    model = ExpertModel(expert.model, expert.text, 32, 4, adaln=expert.adaln).to(device)
    model.net.activation_checkpointing = bool(tr["activation_checkpointing"])
    objective = get_objective(expert.objective, expert.schedule)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    ema = EMA(model, 0.9999)
    rng = devices.TrainingStreams(0, 0, device)
    batch = int(tr["batch_size"])
    cond = model.tokenize([f"a photo of thing {i}" for i in range(batch)], device)
    autocast = devices.autocast(device, "bf16")
    losses = []
    for _ in range(steps):
        x0 = devices.randn((batch, 4, 32, 32), rng.noise, device)
        parts = objective.draw(x0, cond, float(tr["caption_dropout"]), rng.noise,
                               model.prior_mean()).split(micro)
        for part in parts:
            with autocast:
                loss = part.loss(model) * len(part) / batch
            loss.backward()
            losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
    torch.cuda.synchronize(device)
    return {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9,
            "loss": float(torch.stack(losses).float().sum()) / steps,
            "trainable_params": sum(p.numel() for p in params)}


def memory_check(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """``paper-8x-xl.yaml``'s experts (DiT-XL/2, the frozen CLIP ViT-L/14 text tower with
    random weights, bf16, batch 64) on each of its node types' declared memory: the GPU is
    capped at that memory (``set_per_process_memory_fraction``), the plan's micro-batch is
    trained for two steps (eager: ``train.compile``'s fallback, the larger), and the measured
    peak is set beside the plan's estimate; with and without activation checkpointing."""
    from hdd_ray.config import load_config, resolve_experts
    from hdd_ray.training.memory import expert_plan

    cfg = load_config(PAPER_CONFIG, overrides=["experts.init=null",
                                               "experts.text.pretrained=null"])
    by_memory = {}
    for expert in resolve_experts(cfg):  # one expert per declared memory (node type)
        by_memory.setdefault(float(expert.resources["gpu_memory_gb"]), expert)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" \
        else None
    rows = []
    for gb, expert in sorted(by_memory.items()):
        for checkpointing in (False, True):
            spec = dataclasses.replace(expert, train=dict(
                expert.train, activation_checkpointing=checkpointing))
            plan = expert_plan(cfg, spec, (32, 4))
            row: dict[str, Any] = {
                "cluster": spec.cluster, "objective": spec.objective, "gpu_memory_gb": gb,
                "checkpointing": checkpointing, "micro_batch": plan.micro_batch,
                "micro_steps": plan.micro_steps, "estimate_gb": plan.estimate.total / 1e9,
                "usable_gb": (plan.usable or 0) / 1e9, "plan": plan.line()}
            if total is None or plan.micro_batch is None:
                row["skipped"] = ("no CUDA device" if total is None
                                  else "not one sample fits: " + plan.refusal())
                rows.append(row)
                continue
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.set_per_process_memory_fraction(min(1.0, gb * 1e9 / total), index)
            try:
                row.update(_plan_steps(spec, int(plan.micro_batch), device))
                ratio = row["peak_allocated_gb"] / row["estimate_gb"]
                low, high = TARGETS["memory_measured_over_estimate"]
                row["measured_over_estimate"], row["within_target"] = ratio, low <= ratio <= high
                row["fits"] = True
            except (RuntimeError, MemoryError) as exc:
                from hdd_ray.devices import is_out_of_memory

                if not is_out_of_memory(exc):
                    raise
                row["fits"], row["error"] = False, str(exc).splitlines()[0][:300]
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0, index)
                _release(device)
            rows.append(row)
            print(f"  memory {gb:g} GB, checkpointing {checkpointing}: micro-batch "
                  f"{row['micro_batch']}, estimate {row['estimate_gb']:.1f} GB, measured "
                  f"{row.get('peak_allocated_gb', float('nan')):.1f} GB", flush=True)
    return {"config": "jobs/configs/paper-8x-xl.yaml", "model": "DiT-XL/2", "input": [4, 32, 32],
            "rows": rows}


# ------------------------------------------------------------------------------------ Ray vs bare


def _synthetic_shard(directory: str, n: int = 64, size: int = 32) -> str:
    """A WebDataset shard of ``n`` random RGB PNGs with captions (the loop's real data path)."""
    import numpy as np
    from PIL import Image

    from hdd_ray.corpus import write_tar

    rs = np.random.RandomState(0)
    samples = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rs.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
        samples.append({"__key__": f"s{i:05d}", "png": buf.getvalue(),
                        "txt": f"a random picture number {i % 7}".encode(),
                        "json": json.dumps({"cluster": 0}).encode()})
    path = str(Path(directory) / "shard-000000.tar")
    write_tar(path, samples)
    return path


#: what torch's ``set_sync_debug_mode("warn")`` says of each synchronizing call (not its
#: one-time "prototype feature" note)
_SYNC_WARNING = "called a synchronizing"


@contextlib.contextmanager
def _sync_warnings(found: list[str]) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode("warn")`` over the block: each synchronizing call it
    reports is appended to ``found`` (``file:line: message``) when the block ends."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
            found.extend(f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                         if _SYNC_WARNING in str(w.message))


def sync_detection_works(device: torch.device) -> bool:
    """Whether ``set_sync_debug_mode("warn")`` reports a known synchronisation on ``device``
    (``.item()`` of a device tensor): :func:`sync_watch`'s count of 0 means something only
    then (False on the CPU, where nothing synchronises)."""
    if device.type != "cuda":
        return False
    seen: list[str] = []
    with _sync_warnings(seen):
        torch.ones(1, device=device).sum().item()
    return bool(seen)


@contextlib.contextmanager
def sync_watch(device: torch.device, after: int) -> Iterator[list[str]]:
    """The CUDA synchronisations made inside the loop's steps (``_Run.step``) from step
    ``after`` on (the first ones compile), under ``torch.cuda.set_sync_debug_mode("warn")``:
    yields the list they are appended to (``file:line: message``). The loop reads its losses
    once per logging interval, outside ``step``; nothing inside it may wait for the GPU."""
    from hdd_ray.training import loop

    found: list[str] = []
    original = loop._Run.step

    def watched(run: Any, step: int) -> Any:
        if device.type != "cuda" or step < after:
            return original(run, step)
        with _sync_warnings(found):
            return original(run, step)

    loop._Run.step = watched
    try:
        yield found
    finally:
        loop._Run.step = original


def ray_vs_bare(args: argparse.Namespace, device: torch.device, tmp: str) -> dict[str, Any]:
    """Steps/s of ``run_loop`` bare (``LocalHooks``: with its data-wait share and the CUDA
    synchronisations inside its steps) and, with ``--ray``, in a one-worker ``TorchTrainer``."""
    from hdd_ray.config import load_config, resolve_experts
    from hdd_ray.training.loop import LocalHooks, run_loop, train_loop
    from hdd_ray.training.settings import RunSettings

    cuda = device.type == "cuda"
    expert = resolve_experts(load_config(overrides=["experts.ddpm_clusters=[]"]))[0]
    expert = dataclasses.replace(expert, model=args.ray_model)
    train = dict(expert.train, steps=args.ray_steps, checkpoint_every=args.ray_steps,
                 batch_size=args.ray_batch, mixed_precision="bf16", compile=bool(args.compile))
    conf = {"kind": "expert", "expert": dataclasses.asdict(expert), "train": train,
            "image_size": 32, "channels": 3, "shards": [_synthetic_shard(tmp)],
            "torch_threads": args.threads, "use_gpu": cuda}
    settings = RunSettings.from_dict(conf)
    if args.compile and cuda:  # the compile cache warmed first: neither timed run pays for it
        warm = dict(conf, train=dict(train, steps=10, checkpoint_every=10))
        run_loop(RunSettings.from_dict(warm), LocalHooks(str(Path(tmp) / "warm")))
    with sync_watch(device, after=5) as syncs:
        bare = run_loop(settings, LocalHooks(str(Path(tmp) / "bare")))
    out: dict[str, Any] = {
        "model": args.ray_model, "input": [3, 32, 32], "batch": args.ray_batch,
        "steps": args.ray_steps, "compile": bool(args.compile),
        "bare_steps_per_s": bare["steps_per_s"], "data_wait_share": bare["data_wait_share"],
        "syncs_in_steps": len(syncs), "sync_sites": sorted(set(syncs))[:10],
        "sync_checked": sync_detection_works(device)}
    print(f"  bare loop: {bare['steps_per_s']:.2f} steps/s, data wait "
          f"{bare['data_wait_share']:.1%}, {len(syncs)} syncs inside steps", flush=True)
    if not args.ray:
        return {**out, "ray": "skipped (--ray to run it)"}
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    workers = {"CPU": float(args.threads), **({"GPU": 1.0} if cuda else {})}
    result = TorchTrainer(
        functools.partial(train_loop, settings),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=cuda, resources_per_worker=workers),
        run_config=RunConfig(name="bench-gpu-ray", storage_path=str(Path(tmp) / "ray")),
    ).fit()
    if result.error is not None:
        raise result.error
    ray_sps = float(result.metrics["steps_per_s"])
    return {**out, "ray_steps_per_s": ray_sps, "ratio": ray_sps / bare["steps_per_s"]}


# ------------------------------------------------------------------------------------ sampling


def sampling_table(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Images/s of a K = 4 mixture (random weights) per routing, via ``Mixture.sample``."""
    from hdd_ray.config import load_config
    from hdd_ray.ensemble import Mixture
    from hdd_ray.models.expert import RouterModel

    k = 4
    cfg = load_config(overrides=[f"clustering.k={k}", f"sampling.steps={args.sample_steps}",
                                 f"sampling.batch_size={args.sample_batch}", "sampling.k=2",
                                 "sampling.guidance_scale=2.0", "sampling.sampler=euler",
                                 "sampling.mixed_precision=bf16"])
    cfg = dataclasses.replace(cfg, corpus=dataclasses.replace(cfg.corpus, channels=4,
                                                              image_size=32))
    experts = []
    for i in range(k):
        model = _expert_parts(args.sample_model, 4, 32, device)[0].eval()
        objective = "ddpm_eps" if i % 2 == 0 else "fm_velocity"
        experts.append((model, {"objective": objective,
                                "schedule": "linear" if objective == "ddpm_eps" else None}))
    router = RouterModel(args.router_model, 32, 4, k).to(device).eval()
    mixture = Mixture(experts, router, cfg, device)
    prompts = [f"a photo of thing {i % 8}" for i in range(args.sample_images)]
    for routing in ("top1", "topk", "full"):  # warm-up: every routing's kernels and shapes
        mixture.sample(prompts[: args.sample_batch], strategy=routing, k=2, steps=2)
    rows = []
    for routing in ("top1", "topk", "full"):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        mixture.sample(prompts, strategy=routing, k=2)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
        rows.append({"routing": "top2" if routing == "topk" else routing, "seconds": wall,
                     "images_per_s": len(prompts) / wall,
                     "expert_evaluations": sum(mixture.last_evaluations)})
        print(f"  sampling {rows[-1]['routing']}: {len(prompts) / wall:.2f} images/s", flush=True)
    by = {r["routing"]: r for r in rows}
    return {"model": args.sample_model, "router": args.router_model, "k": k,
            "images": len(prompts), "steps": args.sample_steps, "guidance": 2.0,
            "batch": args.sample_batch, "rows": rows,
            "top2_over_top1_time": by["top2"]["seconds"] / by["top1"]["seconds"]}


# ------------------------------------------------------------------------------------ campaign


def campaign(args: argparse.Namespace, device: torch.device, tmp: str) -> dict[str, Any]:
    """Prepare, two experts (ddpm_eps + fm_velocity), the router and the evaluation task, each
    asking Ray for a GPU when ``device`` is CUDA; wall time and device per stage."""
    import ray

    from hdd_ray.campaign import EXPERT_JSON, ROUTER_JSON, CampaignPaths
    from hdd_ray.config import load_config
    from hdd_ray.ensemble import MixtureSpec
    from hdd_ray.evaluation.remote import evaluate_on_ray
    from hdd_ray.placement import init_ray
    from hdd_ray.prepare import prepare_corpus
    from hdd_ray.storage import read_json
    from hdd_ray.training.launcher import train_campaign

    gpu = 1 if device.type == "cuda" else 0
    cfg = load_config(overrides=[
        f"root={tmp}/campaign", "clustering.k=2", "clustering.fine_centroids=8",
        f"clustering.gpus_per_actor={gpu}", "clustering.num_actors=1",
        "experts.ddpm_clusters=[0]", "evaluation.baseline_ddpm_clusters=null", "sampling.k=2", f"sampling.steps={args.campaign_steps}",
        f"experts.train.steps={args.campaign_train_steps}",
        f"experts.train.checkpoint_every={args.campaign_train_steps}",
        f"router.train.steps={args.campaign_train_steps}",
        f"router.train.checkpoint_every={args.campaign_train_steps}",
        f"experts.resources.gpus_per_worker={gpu}", f"router.resources.gpus_per_worker={gpu}",
        "experts.resources.cpus_per_worker=1", "router.resources.cpus_per_worker=1",
        f"evaluation.resources.num_gpus={gpu}", f"evaluation.num_samples={args.campaign_samples}",
        "ray.max_concurrent_experts=0", "tracking.enabled=false",
        "ray.executor=train"])  # the GPU path under Ray Train (DDP, bf16 autocast on workers)
    stages: dict[str, float] = {}
    t = time.perf_counter()
    if ray.is_initialized():
        ray.shutdown()
    init_ray(cfg)
    prepare_corpus(cfg, force=True)
    stages["prepare_s"] = time.perf_counter() - t
    t = time.perf_counter()
    statuses = train_campaign(cfg)
    stages["train_s"] = time.perf_counter() - t
    failed = [f"{s.name}: {s.reason}" for s in statuses if not s.ok]
    if failed:
        raise SystemExit("campaign training failed: " + "; ".join(failed))
    paths = CampaignPaths(cfg.root)
    ran_on = {}
    for s in statuses:
        where = (f"{paths.expert_dir(s.name)}/{EXPERT_JSON}" if s.kind == "expert"
                 else f"{paths.router}/{s.name}/{ROUTER_JSON}")
        ran_on[s.name] = read_json(where)["node"].get("device")
    t = time.perf_counter()
    results = evaluate_on_ray(cfg, [MixtureSpec.from_config(cfg)])
    stages["evaluate_s"] = time.perf_counter() - t
    return {**stages, "runs": [{"name": s.name, "kind": s.kind, "status": s.status,
                                "steps": s.steps, "device": ran_on.get(s.name)}
                               for s in statuses],
            "evaluation_device": results[0].get("device"), "fid": results[0].get("fid"),
            "clip_score": results[0].get("clip_score"),
            "images_per_second": results[0].get("images_per_second")}


# ------------------------------------------------------------------------------------ main


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when present)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of a GPU missing from the table")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the timed model (default: on CUDA, as train.compile)")
    p.add_argument("--campaign", action=argparse.BooleanOptionalAction, default=None,
                   help="run the tiny campaign (default: on CUDA only)")
    p.add_argument("--ray", action=argparse.BooleanOptionalAction, default=None,
                   help="Ray Train versus the bare loop (default: on CUDA only)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps")
    p.add_argument("--models", nargs="+", default=None,
                   help="the training stage's models (default: DiT-B/2 DiT-XL/2 on CUDA)")
    p.add_argument("--min-batch", type=int, default=None,
                   help="the batch search's first batch (default: 8 on CUDA)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="the batch search's last batch (default: 2048 on CUDA)")
    p.add_argument("--ray-steps", type=int, default=None,
                   help="steps of the loop stage (default: 300 on CUDA)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each stage in a process of its own (default: on CUDA only)")
    p.add_argument("--profile", choices=("missed", "always", "never"), default="missed",
                   help="save a profile of the training step: when MFU misses its target")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="the stages to run, in this order (default: all)")
    p.add_argument("--stage-timeout", type=float, default=None,
                   help="seconds an isolated stage may run before it is stopped and recorded "
                        "as timed out (default: no limit)")
    p.add_argument("--only", choices=STAGES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--profile-dir", default=None, help=argparse.SUPPRESS)  # default: --out's
    args = p.parse_args(argv)
    from hdd_ray.devices import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    tiny = {"models": ["DiT-T/2"], "min_batch": 2, "max_batch": 4, "steps": 3,
            "ray_model": "DiT-T/2", "ray_steps": 20, "ray_batch": 4, "threads": 1,
            "sample_model": "DiT-T/2", "router_model": "router-T", "sample_images": 8,
            "sample_batch": 8, "sample_steps": 2, "campaign_steps": 2,
            "campaign_train_steps": 20, "campaign_samples": 16}
    full = {"models": ["DiT-B/2", "DiT-XL/2"], "min_batch": 8, "max_batch": 2048, "steps": 20,
            "ray_model": "DiT-B/2", "ray_steps": 300, "ray_batch": 128, "threads": 4,
            "sample_model": "DiT-B/2", "router_model": "router-S", "sample_images": 512,
            "sample_batch": 128, "sample_steps": 16, "campaign_steps": 8,
            "campaign_train_steps": 200, "campaign_samples": 128}
    for key, value in (full if cuda else tiny).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.campaign = cuda if args.campaign is None else args.campaign
    args.ray = cuda if args.ray is None else args.ray
    args.isolate = cuda if args.isolate is None else args.isolate
    args.compile = cuda if args.compile is None else args.compile
    args.device = device
    return args


def _stage(name: str, args: argparse.Namespace, device: torch.device, peak: float | None,
           tmp: str) -> Any:
    """One stage's result (a skipped stage says so)."""
    if name == "campaign":
        return campaign(args, device, tmp) if args.campaign else {
            "skipped": "off (--campaign to run it)"}
    if name == "training":
        return training_table(args, device, peak)
    if name == "ray_vs_bare":
        return ray_vs_bare(args, device, tmp)
    if name == "memory":
        return memory_check(args, device)
    return sampling_table(args, device)


def _isolated(name: str, argv: list[str], tmp: str, beside: Path,
              timeout: float | None = None) -> Any:
    """Run stage ``name`` in a fresh interpreter (this script with ``--only``): whatever it
    held on the GPU (cached blocks, Ray workers) is gone when it exits. A stage that fails
    gives ``{"error": its last line}``, and the others still run."""
    import subprocess

    out = Path(tmp) / f"{name}.json"
    rest = [a for i, a in enumerate(argv) if a != "--out" and (i == 0 or argv[i - 1] != "--out")
            and not a.startswith("--out=")]
    try:
        proc = subprocess.run([sys.executable, __file__, *rest, "--only", name, "--out",
                               str(out), "--profile-dir", str(beside)],
                              stdout=None, stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s (--stage-timeout)"}
    if proc.returncode != 0 or not out.exists():
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        print(proc.stderr[-3000:], flush=True)
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return json.loads(out.read_text())[name]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write the JSON, return it."""
    args = _arguments(argv)
    device: torch.device = args.device
    if device.type == "cpu":  # more threads than free cores spin against each other
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = peak_tflops(name, args.peak_tflops)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.only:  # one stage, in the process the isolated run started for it
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
            result = {args.only: _stage(args.only, args, device, peak, tmp)}
        path.write_text(json.dumps(result, indent=2))
        return result
    out: dict[str, Any] = {"device": str(device), "gpu_name": name, "peak_tflops": peak,
                           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                           "targets": dict(TARGETS), "isolated": bool(args.isolate)}
    argv = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        started = time.perf_counter()
        print(f"bench_gpu on {device} ({name or 'cpu'}), peak {peak} TFLOP/s", flush=True)
        for stage in args.stages:  # the JSON is written after every stage: a crash keeps the rest
            skipped = stage == "campaign" and not args.campaign
            if args.isolate and not skipped:
                out[stage] = _isolated(stage, argv, tmp, path.parent, args.stage_timeout)
            else:
                out[stage] = _stage(stage, args, device, peak, tmp)
                _release(device)
            out["wall_s"] = time.perf_counter() - started
            path.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out} ({out['wall_s']:.0f} s)")
    return out


if __name__ == "__main__":
    main()
