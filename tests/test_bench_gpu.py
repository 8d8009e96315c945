"""``benchmarks/bench_gpu.py`` stays alive on CPU machines, and its FLOP count is right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_gpu  # noqa: E402


@pytest.mark.parametrize("size,input_size", [("DiT-T/2", 32), ("DiT-S/4", 16)])
def test_dit_flop_count_matches_torchs_flop_counter(size, input_size):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from hdd_ray.models.dit import build_dit

    net = build_dit(size, input_size, 4, 64)
    x = torch.randn(2, 4, input_size, input_size)
    cond = {"tokens": torch.randn(2, 16, 64), "mask": torch.ones(2, 16, dtype=torch.bool)}
    # the math kernel makes attention visible to the counter as matmuls
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(x, torch.rand(2) * 1000, cond)
    assert counter.get_total_flops() == 2 * bench_gpu.dit_forward_flops(size, input_size, 4,
                                                                        64, 16)


def test_peak_table_names_the_gpus_it_knows():
    assert bench_gpu.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert bench_gpu.peak_tflops("NVIDIA H200", None) == 989.0
    assert bench_gpu.peak_tflops("NVIDIA L4", None) == 121.0
    assert bench_gpu.peak_tflops("NVIDIA L40S", None) is None  # not an L4
    assert bench_gpu.peak_tflops("NVIDIA L40S", 362.0) == 362.0


def test_every_allocation_failure_counts_as_out_of_memory():
    """The benchmark's batch search and the loop's compile fallback read failures alike."""
    from hdd_ray.devices import is_out_of_memory

    for message in ("CUDA out of memory. Tried to allocate 2.00 GiB",
                    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
                    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
                    "[enforce fail at alloc_cpu.cpp:117] err == 0. DefaultCPUAllocator: can't "
                    "allocate memory: you tried to allocate 1 bytes. Error code 12 (Cannot "
                    "allocate memory)"):
        assert is_out_of_memory(RuntimeError(message)), message
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_cpu_smoke_run_writes_every_section_of_its_json(tmp_path):
    """As on a GPU: each stage in its own process, the profile saved beside the JSON (the
    memory and loop stages, which need no process of their own to be checked, run in this one
    below: each process costs seconds of torch imports)."""
    out = tmp_path / "bench_gpu.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_gpu.py"), "--device", "cpu",
                           "--isolate", "--profile", "always", "--out", str(out),
                           "--stages", "training", "sampling", "campaign"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["peak_tflops"] is None and result["isolated"]
    profile = Path(result["training"][0]["profile"])
    assert profile.parent == tmp_path and "Self CPU" in profile.read_text()
    assert set(result) >= {"campaign", "training", "sampling", "targets"}
    assert not set(result) & {"memory", "ray_vs_bare"}  # --stages: only those asked for
    row = result["training"][0]
    assert row["model"] == "DiT-T/2" and row["steps_per_s"] > 0 and row["mfu"] is None
    assert row["model_tflop_per_step"] > 0 and set(row["phases_ms"]) == {
        "forward_backward", "optimizer", "ema"}
    routings = [r["routing"] for r in result["sampling"]["rows"]]
    assert routings == ["top1", "top2", "full"]
    evals = {r["routing"]: r["expert_evaluations"] for r in result["sampling"]["rows"]}
    assert evals["top1"] < evals["top2"] < evals["full"]  # sparse routing did its job
    assert result["sampling"]["top2_over_top1_time"] > 0


def test_memory_and_loop_stages_on_cpu(tmp_path):
    """The memory stage plans the paper config's experts on both node types, with and without
    checkpointing (measured on CUDA only); the loop stage runs the bare loop and reports its
    data-wait share (Ray only with ``--ray``)."""
    args = bench_gpu._arguments(["--device", "cpu"])
    memory = bench_gpu.memory_check(args, torch.device("cpu"))
    plans = {(r["gpu_memory_gb"], r["checkpointing"]): r for r in memory["rows"]}
    assert set(plans) == {(24.0, False), (24.0, True), (80.0, False), (80.0, True)}
    # the 24 GB node accumulates micro-batches; checkpointing fits the whole batch
    assert plans[24.0, False]["micro_steps"] > 1 and plans[24.0, True]["micro_steps"] == 1
    assert all(r["estimate_gb"] <= r["usable_gb"] and r["skipped"] for r in plans.values())
    loop = bench_gpu.ray_vs_bare(args, torch.device("cpu"), str(tmp_path))
    assert loop["bare_steps_per_s"] > 0 and 0 <= loop["data_wait_share"] < 1
    assert loop["sync_checked"] is False and "skipped" in loop["ray"]
