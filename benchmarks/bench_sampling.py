"""Sampling throughput of mixtures, and the cost of the DDPM -> velocity conversion.

Side by side in one run, with the demo's architecture (DiT-T/2, 8x8x1) and randomly initialised
weights (throughput does not depend on what the weights learned):

1. images/s of full vs top-2 vs top-1 routing with K = 8 experts (half DDPM, half FM), as
   ratios to a single expert sampled alone, guidance 2 (so each expert call is a CFG pair);
2. the conversion overhead: one DDPM expert read through ``as_velocity("eps")`` versus the same
   network read natively as a flow-matching expert (target: under 2 %), end to end in alternating
   pairs, and by component: the conversion's own arithmetic (wrapped around an identity
   predictor, so no network) against one network call on the same CFG-pair batch, at the demo's
   shape and at a latent-diffusion shape (DiT-S/2 on 32x32x4).

    python benchmarks/bench_sampling.py
    python benchmarks/bench_sampling.py --batch 256 --steps 16 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import torch


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
    from hdd_ray.models.expert import ExpertModel, RouterModel

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

    def once(field) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            sample_ode(field, noise, cond, steps=args.steps, sampler="euler")
        return time.perf_counter() - t

    all_fields = fields(list(zip(models, descs, strict=True)))
    configs = [("single expert (FM)", all_fields[1])]
    for name, strategy, kk in (("full (K=8)", "full", 8), ("top-2", "topk", 2), ("top-1", "top1", 1)):
        configs.append((name, MixtureField(all_fields, probs, strategy, k=kk)))
    # round robin (one of each per repeat), so a slow spell of the machine hits every row
    for _, field in configs:
        once(field)  # warm-up
    best = {name: float("inf") for name, _ in configs}
    for _ in range(args.repeats):
        for name, field in configs:
            best[name] = min(best[name], once(field))
    rows = [(name, args.batch / best[name]) for name, _ in configs]
    single = rows[0][1]
    print(f"\nbatch {args.batch}, {args.steps} Euler steps, guidance 2, best of {args.repeats} (round robin)\n")
    print("| routing | images/s | ratio to one expert |")
    print("|---|---|---|")
    for name, ips in rows:
        print(f"| {name} | {ips:.1f} | {ips / single:.3f} |")

    # conversion overhead: the same network as an eps expert vs as a native velocity expert,
    # timed alternately (native, converted, native, ...) so drift in the machine hits both
    net = models[0]
    native_f = fields([(net, {"objective": "fm_velocity", "schedule": None})])[0]
    conv_f = fields([(net, {"objective": "ddpm_eps", "schedule": "linear"})])[0]
    once(native_f), once(conv_f)  # warm-up
    pairs = []
    for _ in range(args.repeats):
        pairs.append((once(native_f), once(conv_f)))
    native = args.batch / min(a for a, _ in pairs)
    converted = args.batch / min(b for _, b in pairs)
    paired = sorted(b / a - 1 for a, b in pairs)
    median = paired[len(paired) // 2]
    print("\n| expert read as | images/s (best) |\n|---|---|")
    print(f"| native flow matching | {native:.1f} |")
    print(f"| DDPM eps + conversion | {converted:.1f} |")
    print(f"\nend to end: best vs best {100 * (native / converted - 1):+.2f} %, "
          f"median of {len(pairs)} alternating pairs {100 * median:+.2f} %")
    component_table(cfg, text, args.batch, args.threads)


def _per_call(fn, args: tuple, n: int) -> float:
    """Best-of-5 mean seconds per call of ``fn(*args)`` over ``n`` calls (after a warm-up)."""
    for _ in range(max(3, n // 10)):
        fn(*args)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn(*args)
        best = min(best, (time.perf_counter() - t) / n)
    return best


def component_table(cfg, text: dict, batch: int, threads: int) -> None:
    """The conversion's arithmetic vs one network call, per call of a guided expert field."""
    from hdd_ray.diffusion import Safeguards, as_velocity, get_schedule
    from hdd_ray.models.expert import ExpertModel

    conv = cfg.sampling.conversion
    g = Safeguards(conv.clamp_tau, conv.min_one_minus_t, conv.x0_clamp)

    def identity(x, t, cond):
        return x

    native = as_velocity(identity, "velocity", None, g)
    converted = as_velocity(identity, "eps", get_schedule("linear"), g)
    print(f"\nper call of one guided expert (CFG pair = 2 x batch rows), torch threads {threads}\n")
    print("| shape | model | network ms | native wrapper ms | eps conversion ms | overhead |")
    print("|---|---|---|---|---|---|")
    for model_name, size, ch, b, n in (("DiT-T/2", 8, 1, batch, 40), ("DiT-S/2", 32, 4, 8, 1)):
        net = ExpertModel(model_name, text, size, ch).eval()
        rows = 2 * b
        x = torch.randn(rows, ch, size, size)
        t = torch.rand(rows)
        ids = torch.randint(0, text["vocab_size"], (rows, text["max_len"]))
        mask = torch.ones(rows, text["max_len"], dtype=torch.bool)
        with torch.no_grad():
            cond = {"tokens": net.encode_text(ids, mask), "mask": mask}
            t_net = _per_call(net, (x, t * 1000, cond), n)
            t_native = _per_call(native, (x, t), 20 * n)
            t_conv = _per_call(converted, (x, t), 20 * n)
        overhead = (t_conv - t_native) / (t_net + t_native)
        print(f"| {rows}x{ch}x{size}x{size} | {model_name} | {1e3 * t_net:.2f} | "
              f"{1e3 * t_native:.3f} | {1e3 * t_conv:.3f} | {100 * overhead:+.2f} % |")

if __name__ == "__main__":
    main()
