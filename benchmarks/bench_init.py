"""Pretrained starts: experts from a base eps model, converted exactly, in the HDD paper's mode,
and from scratch, at equal steps and seeds (measured side by side).

On the demo campaign (prepared here into a temporary root, K = 8):

1. **The base**: an eps model (``ddpm_eps``, linear schedule, AdaLN-Zero like the original DiT)
   trained on the union of clusters 4-7's shards through the training loop
   (``hdd_ray.training.loop.run_loop`` with ``LocalHooks``, as ``bench_data.py`` drives it),
   exported as an hdd_ray expert folder.
2. **Experts for clusters 0-3**, ``fm_velocity``, three starts each, same steps and seed:
   ``scratch``; ``exact`` (``experts.init`` = the base: the network keeps predicting eps on its
   schedule and is trained through the conversion); ``paper`` (``experts.init_mode=paper``:
   a velocity network from the base's weights, head and caption projection re-initialised,
   time fed as round(999 t)).
3. **Held-out loss**, every ``--interval`` steps (and at step 0) on the EMA weights: the
   flow-matching velocity loss on the cluster's held-out split at a fixed grid of t
   (``(i + 0.5) / 16``) and fixed noise (``--draws`` per sample and t), each expert read as
   sampling reads it (the conversion of ``sampling.conversion``, the expert's data mean).
4. **Steps to the scratch run's final loss**: the first evaluation at or below it (at least
   one interval); ``speedup_*`` = scratch steps / those steps, averaged over the clusters that
   reach it (``reached_*`` counts them).
5. **FID and CLIP score at equal (final) steps**, paired: the same prompts (the cluster's
   training captions) and noise for every start; FID against the cluster's training images in
   the demo judge's feature space, CLIP score with the demo's reference CLIP.
6. **The AdaLN-Single mapping's error**: the base loaded into AdaLN-Single
   (``adaln_zero_to_single``) against the base itself: relative RMS error of its eps on
   clusters 0-3's held-out images, and its held-out velocity loss beside the base's.

``step0_loss_exact`` (the exact start's held-out loss at step 0) is reported beside
``teacher_loss`` (the base converted with the same settings and prior mean): they are equal.

    python benchmarks/bench_init.py
    python benchmarks/bench_init.py --base-steps 100 --steps 40 --interval 20 --samples 32 --out /tmp/b.json  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hdd_ray.config import CampaignConfig  # noqa: E402

T_GRID = [(i + 0.5) / 16 for i in range(16)]
STARTS = ("scratch", "exact", "paper")


def prepare(root: str) -> tuple[CampaignConfig, dict]:
    """The demo campaign prepared into ``root`` (Ray only for this step)."""
    import ray

    from hdd_ray.config import load_config
    from hdd_ray.prepare import prepare_corpus

    cfg = load_config(overrides=[f"root={root}", "tracking.enabled=false",
                                 "experts.ddpm_clusters=[]", "experts.adaln=zero"])
    manifest = prepare_corpus(cfg)
    ray.shutdown()
    return cfg, manifest


class Recorder:
    """``LocalHooks`` that keep the EMA weights of every report (step -> state)."""

    def __init__(self, directory: str) -> None:
        from hdd_ray.training.hooks import LocalHooks

        self.inner = LocalHooks(directory)
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def report(self, metrics: dict, state: dict | None, wait: bool = False) -> None:
        """Keep a copy of the EMA weights, then report as ``LocalHooks`` does."""
        if state is not None:
            self.weights[int(state["step"])] = {k: v.detach().clone()
                                                for k, v in state["ema"].items()}
        self.inner.report(metrics, state, wait)


def settings_for(cfg: CampaignConfig, manifest: dict, expert, shards: list[str], count: int,
                 steps: int, interval: int, start: dict | None):
    from hdd_ray.training.settings import RunSettings

    train = dict(expert.train, steps=steps, checkpoint_every=interval)
    return RunSettings.from_dict({
        "kind": "expert", "expert": asdict(expert), "train": train, "image_size": 8,
        "channels": 1, "shards": shards, "num_samples": count, "torch_threads": 1,
        "data": {**asdict(cfg.experts.data), "mode": "memory"}, "start": start})


def _shards(cfg: CampaignConfig, manifest: dict, clusters: list[int]) -> tuple[list[str], int]:
    from hdd_ray.campaign import cluster_info, cluster_shards

    shards = [s for c in clusters for s in cluster_shards(cfg, manifest, c)]
    return shards, sum(int(cluster_info(manifest, c)["count"]) for c in clusters)


def train_base(cfg: CampaignConfig, manifest: dict, directory: str, steps: int) -> str:
    """The base eps model on clusters 4-7, exported as an hdd_ray expert folder."""
    from hdd_ray.config import resolve_experts
    from hdd_ray.models.expert import save_weights
    from hdd_ray.training.loop import LocalHooks, run_loop

    base_cfg = replace(cfg, experts=replace(cfg.experts, ddpm_clusters=[4],
                                            schedule="linear"))
    expert = resolve_experts(base_cfg)[4]
    shards, count = _shards(cfg, manifest, [4, 5, 6, 7])
    hooks = LocalHooks(os.path.join(directory, "base-run"))
    run_loop(settings_for(cfg, manifest, expert, shards, count, steps, steps, None), hooks)
    state = hooks.load_state()
    folder = os.path.join(directory, "base")
    os.makedirs(folder, exist_ok=True)
    save_weights(os.path.join(folder, "weights.safetensors"), state["ema"])
    desc = {"expert_id": "base-c4-7", "objective": "ddpm_eps", "schedule": "linear",
            "network": {"parameterization": "eps", "schedule": "linear", "time": "native"},
            "adaln": "zero", "architecture": expert.model, "text": expert.text,
            "image_size": 8, "channels": 1, "steps": steps}
    Path(folder, "expert.json").write_text(json.dumps(desc, indent=1))
    return folder


def heldout_loss(field, x0: torch.Tensor, cond: dict, draws: int, seed: int) -> float:
    """The flow-matching velocity loss at the fixed t grid and fixed noise."""
    from hdd_ray import devices

    n, g = x0.shape[0], len(T_GRID)
    t = torch.tensor(T_GRID).repeat_interleave(n).repeat(draws)
    x = x0.repeat(g * draws, 1, 1, 1)
    eps = devices.randn(x.shape, devices.generator(seed))
    tb = t[:, None, None, None]
    c = {k: v.repeat(g * draws, *([1] * (v.dim() - 1))) for k, v in cond.items()}
    with torch.no_grad():
        v = field((1 - tb) * x + tb * eps, t, c)
    return float(((v - (eps - x)) ** 2).mean())


class Cluster:
    """A cluster's held-out split (the loss) and training split (FID's reference, prompts)."""

    def __init__(self, cfg: CampaignConfig, manifest: dict, cluster: int, samples: int) -> None:
        from hdd_ray.campaign import heldout_shards
        from hdd_ray.samples import read_split

        held = read_split(heldout_shards(cfg, manifest), None, 8, 1)
        keep = torch.nonzero(held.labels == cluster).flatten()
        self.x0 = held.images[keep].float()
        self.captions = [held.captions[i] for i in keep.tolist()]
        shards, _ = _shards(cfg, manifest, [cluster])
        train = read_split(shards, None, 8, 1)
        self.train_images = train.images.float()
        self.prompts = (train.captions * (samples // max(1, len(train.captions)) + 1))[:samples]
        self.cluster = cluster


def expert_field(cfg: CampaignConfig, model, objective):
    from hdd_ray.diffusion import Safeguards

    safeguards = Safeguards(**asdict(cfg.sampling.conversion))
    return objective.velocity_field(model, safeguards, model.prior_mean())


def curve(cfg: CampaignConfig, settings, weights: dict[int, dict], task_model, data: Cluster,
          draws: int) -> list[tuple[int, float]]:
    """The held-out loss at step 0 (the start as built) and at every recorded step."""
    from hdd_ray.training.starts import expert_objective

    objective = expert_objective(settings)
    cond = task_model.tokenize(data.captions)
    out = [(0, heldout_loss(expert_field(cfg, task_model.eval(), objective), data.x0, cond,
                            draws, 1000 + data.cluster))]
    for step in sorted(weights):
        task_model.load_state_dict(weights[step], strict=False)
        out.append((step, heldout_loss(expert_field(cfg, task_model.eval(), objective),
                                       data.x0, cond, draws, 1000 + data.cluster)))
    return out


def run_expert(cfg: CampaignConfig, manifest: dict, data: Cluster, start_kind: str, base: str,
               steps: int, interval: int, draws: int, directory: str) -> dict:
    """One expert of ``data.cluster`` from ``start_kind``: its curve and final model."""
    from hdd_ray.campaign import expert_start
    from hdd_ray.config import resolve_experts
    from hdd_ray.training.loop import ExpertTask, run_loop

    ex = cfg.experts
    if start_kind != "scratch":
        ex = replace(ex, init=base, init_mode="exact" if start_kind == "exact" else "paper")
    variant = replace(cfg, experts=ex)
    expert = resolve_experts(variant)[data.cluster]
    start = expert_start(variant, expert)
    start_dict = {"init": start.init, "mode": start.mode, "network": start.network.as_dict(),
                  "conversion": start.conversion}
    shards, count = _shards(cfg, manifest, [data.cluster])
    settings = settings_for(cfg, manifest, expert, shards, count, steps, interval, start_dict)
    torch.manual_seed(settings.train.seed)  # as the loop seeds what a start leaves fresh
    task = ExpertTask(settings)  # the start as the loop builds it (init loaded, data mean set)
    model = task.model
    task.close()
    hooks = Recorder(os.path.join(directory, f"c{data.cluster}-{start_kind}"))
    started = time.time()
    run_loop(settings, hooks)
    wall = time.time() - started
    points = curve(cfg, settings, hooks.weights, model, data, draws)
    desc = {"objective": "fm_velocity", "schedule": None, "network": start.network.as_dict(),
            "channels": 1, "image_size": 8}
    return {"curve": points, "model": model, "desc": desc, "wall_s": wall}


def steps_to(points: list[tuple[int, float]], target: float, interval: int) -> int | None:
    """The first evaluated step (>= one interval) whose loss is at or below ``target``."""
    for step, loss in points:
        if step >= interval and loss <= target:
            return step
    return None


def paired_scores(cfg: CampaignConfig, judge, data: Cluster, runs: dict[str, dict]) -> dict:
    """FID (against the cluster's training images) and CLIP score of each start's final
    expert, on the same prompts and noise; the CLIP differences with their standard errors."""
    from hdd_ray.evaluation import clip_scores, fid
    from hdd_ray.preview import sample_expert

    out: dict = {}
    clip: dict[str, torch.Tensor] = {}
    for kind, run in runs.items():
        images = sample_expert(cfg, run["model"], run["desc"], data.prompts,
                               steps=cfg.sampling.steps, seed=2000 + data.cluster)
        clip[kind] = clip_scores(images, data.prompts, judge.clip, judge.tokenizer)
        out[f"fid_{kind}"] = fid(images, data.train_images, judge.extractor)
        out[f"clip_{kind}"] = float(clip[kind].mean())
    for kind in ("exact", "paper"):
        diff = clip[kind] - clip["scratch"]
        out[f"clip_diff_{kind}"] = float(diff.mean())
        out[f"clip_diff_{kind}_se"] = float(diff.std() / len(diff) ** 0.5)
        out[f"fid_diff_{kind}"] = out[f"fid_{kind}"] - out["fid_scratch"]
    return out


def adaln_single_error(cfg: CampaignConfig, base: str, clusters: list[Cluster],
                       draws: int) -> dict:
    """The base in AdaLN-Single (the documented mapping) against the base itself."""
    from hdd_ray.campaign import expert_objective, load_expert
    from hdd_ray.diffusion import get_schedule, per_sample
    from hdd_ray.models.expert import ExpertModel
    from hdd_ray.models.pretrained import start_expert

    zero, desc = load_expert(base)
    single = ExpertModel(desc["architecture"], desc["text"], 8, 1, adaln="single").eval()
    start_expert(single, base, "single")
    x0 = torch.cat([c.x0 for c in clusters])
    captions = [cap for c in clusters for cap in c.captions]
    cond = zero.tokenize(captions)
    gen = torch.Generator().manual_seed(7)
    tau = torch.rand(x0.shape[0], generator=gen) * 1000
    eps = torch.randn(x0.shape, generator=gen)
    a = per_sample(get_schedule("linear").alpha_bar(tau), x0)
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    with torch.no_grad():
        e_zero, e_single = zero(x, tau, cond), single(x, tau, cond)
    rel = float((e_single - e_zero).pow(2).mean().sqrt() / e_zero.pow(2).mean().sqrt())
    objective = expert_objective(desc)
    prior = torch.cat([c.train_images for c in clusters]).mean(0)
    zero.data_mean.copy_(prior)
    single.data_mean.copy_(prior)
    zero.has_data_mean = single.has_data_mean = True
    loss = {name: heldout_loss(expert_field(cfg, m, objective), x0, cond, draws, 77)
            for name, m in (("zero", zero), ("single", single))}
    return {"adaln_single_eps_rel_rms_error": rel, "adaln_single_fm_loss": loss["single"],
            "adaln_zero_fm_loss": loss["zero"]}


def teacher_loss(cfg: CampaignConfig, base: str, model, data: Cluster, draws: int) -> float:
    """The base converted with the student's settings and prior mean (its data mean)."""
    from hdd_ray.campaign import expert_objective, load_expert

    teacher, desc = load_expert(base)
    teacher.data_mean.copy_(model.data_mean)
    teacher.has_data_mean = True
    field = expert_field(cfg, teacher, expert_objective(desc))
    return heldout_loss(field, data.x0, teacher.tokenize(data.captions), draws,
                        1000 + data.cluster)


def summarize(per_cluster: list[dict]) -> dict:
    """The speed-ups averaged over the clusters that reach the scratch run's final loss."""
    out: dict = {}
    for kind in ("exact", "paper"):
        key = "paper_mode" if kind == "paper" else kind
        reached = [c[f"speedup_{kind}"] for c in per_cluster if c[f"speedup_{kind}"] is not None]
        out[f"speedup_{key}"] = sum(reached) / len(reached) if reached else None
        out[f"reached_{key}"] = f"{len(reached)}/{len(per_cluster)}"
        for metric in ("fid_diff", "clip_diff"):
            values = [c[f"{metric}_{kind}"] for c in per_cluster]
            out[f"{metric}_{kind}_mean"] = sum(values) / len(values)
    out["step0_loss_exact"] = [c["step0_loss_exact"] for c in per_cluster]
    out["teacher_loss"] = [c["teacher_loss"] for c in per_cluster]
    out["step0_equals_teacher"] = all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in
                                      zip(out["step0_loss_exact"], out["teacher_loss"],
                                          strict=True))
    return out


def one_cluster(cfg, manifest, judge, data: Cluster, base: str, args, directory: str) -> dict:
    runs = {kind: run_expert(cfg, manifest, data, kind, base, args.steps, args.interval,
                             args.draws, directory) for kind in STARTS}
    scratch_final = runs["scratch"]["curve"][-1][1]
    row: dict = {"cluster": data.cluster, "heldout_samples": int(data.x0.shape[0]),
                 "scratch_final_loss": scratch_final,
                 "teacher_loss": teacher_loss(cfg, base, runs["exact"]["model"], data,
                                              args.draws),
                 "step0_loss_exact": runs["exact"]["curve"][0][1]}
    for kind in STARTS:
        row[f"curve_{kind}"] = runs[kind]["curve"]
        row[f"wall_s_{kind}"] = runs[kind]["wall_s"]
    for kind in ("exact", "paper"):
        reached = steps_to(runs[kind]["curve"], scratch_final, args.interval)
        row[f"steps_to_scratch_final_{kind}"] = reached
        row[f"speedup_{kind}"] = args.steps / reached if reached else None
    row.update(paired_scores(cfg, judge, data, runs))
    print(json.dumps({k: v for k, v in row.items() if not k.startswith("curve")}), flush=True)
    return row


def main() -> None:
    """Prepare, train the base and the experts, evaluate, write the JSON, print a table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-steps", type=int, default=1600)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--interval", type=int, default=25)
    parser.add_argument("--draws", type=int, default=4, help="noise draws per sample and t")
    parser.add_argument("--samples", type=int, default=200, help="samples per FID / CLIP score")
    parser.add_argument("--clusters", default="0,1,2,3")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "bench_init.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-init-") as tmp:
        cfg, manifest = prepare(os.path.join(tmp, "root"))
        base = train_base(cfg, manifest, tmp, args.base_steps)
        from hdd_ray.evaluation.judge import Judge

        judge = Judge(cfg)
        clusters = [Cluster(cfg, manifest, int(c), args.samples) for c in args.clusters.split(",")]
        rows = [one_cluster(cfg, manifest, judge, data, base, args, tmp) for data in clusters]
        mapping = adaln_single_error(cfg, base, clusters, args.draws)
    result = {**summarize(rows), **mapping, "clusters": rows,
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "model": cfg.experts.model, "adaln": "zero", "wall_s": time.time() - started}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("| measure | value |\n|---|---|")
    for key, value in result.items():
        if key not in ("clusters", "settings"):
            print(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")


if __name__ == "__main__":
    main()
