"""Sampling throughput of mixtures, and the cost of the DDPM -> velocity conversion.

Side by side in one run, with the demo's architecture (DiT-T/2, 8x8x1) and randomly initialised
weights (throughput does not depend on what the weights learned):

1. images/s of full vs top-2 vs top-1 routing with K = 8 experts (half DDPM, half FM), as
   ratios to a single expert sampled alone, guidance 2 (so each expert call is a CFG pair);
2. the conversion overhead: one DDPM expert read through ``as_velocity("eps")`` versus the same
   network read natively as a flow-matching expert (target: under 2 %).

    python benchmarks/bench_sampling.py
    python benchmarks/bench_sampling.py --batch 256 --steps 16 --repeats 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def main() -> None:
    """Print both tables (markdown)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from hdd_ray.config import load_config
    from hdd_ray.diffusion import sample_ode
    from hdd_ray.ensemble import Mixture, MixtureField
    from hdd_ray.training.model import ExpertModel, RouterModel

    text = {"encoder": "learned", "vocab_size": 1024, "max_len": 16, "dim": 64, "depth": 1,
            "arch": None, "pretrained": None}
    k = 8
    models = [ExpertModel("DiT-T/2", text, 8, 1).eval() for _ in range(k)]
    for m in models:  # the final layer is zero-initialised; give the nets real outputs
        for p in m.parameters():
            p.data.normal_(0, 0.02)
    descs = [{"objective": "ddpm_eps" if i % 2 == 0 else "fm_velocity", "schedule": "linear"}
             for i in range(k)]
    router = RouterModel("router-T", 8, 1, k).eval()
    cfg = load_config()  # the demo's sampling and conversion settings
    prompts = [f"a handwritten digit {i % 10}" for i in range(args.batch)]

    def fields(experts):
        # the mixture's own expert fields (tokens encoded once, CFG pairs batched)
        return Mixture(experts, router, cfg).fields(prompts, 2.0, "cpu")

    probs = Mixture([], router, cfg).router_probs
    noise = torch.randn(args.batch, 1, 8, 8)
    cond = {"index": torch.arange(args.batch)}

    def timed(field) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            with torch.no_grad():
                sample_ode(field, noise, cond, steps=args.steps, sampler="euler")
            best = min(best, time.perf_counter() - t)
        return args.batch / best

    all_fields = fields(list(zip(models, descs, strict=True)))
    single = timed(all_fields[1])
    rows = [("single expert (FM)", single)]
    for name, strategy, kk in (("full (K=8)", "full", 8), ("top-2", "topk", 2), ("top-1", "top1", 1)):
        rows.append((name, timed(MixtureField(all_fields, probs, strategy, k=kk))))
    print(f"\nbatch {args.batch}, {args.steps} Euler steps, guidance 2, best of {args.repeats}\n")
    print("| routing | images/s | ratio to one expert |")
    print("|---|---|---|")
    for name, ips in rows:
        print(f"| {name} | {ips:.1f} | {ips / single:.3f} |")

    # conversion overhead: the same network as an eps expert vs as a native velocity expert
    net = models[0]
    native = timed(fields([(net, {"objective": "fm_velocity", "schedule": None})])[0])
    converted = timed(fields([(net, {"objective": "ddpm_eps", "schedule": "linear"})])[0])
    print("\n| expert read as | images/s |\n|---|---|")
    print(f"| native flow matching | {native:.1f} |")
    print(f"| DDPM eps + conversion | {converted:.1f} |")
    print(f"\nconversion overhead: {100 * (native / converted - 1):+.2f} %")


if __name__ == "__main__":
    main()
