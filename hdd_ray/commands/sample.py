r"""Your prompts to images: sample a trained campaign's mixture and write a PNG grid.

    python jobs/sample.py --prompt "a handwritten digit seven" --out seven.png
    python jobs/sample.py --prompt "a handwritten digit seven" --prompt "the number 3, handwritten" \
        --num 8 --seed 1 --routing top1 --guidance 3 --steps 32 --out sevens_and_threes.png
    python jobs/sample.py --prompts my_prompts.txt --assignment "D F F D F F F F" --out grid.png
    python jobs/sample.py --prompt "a handwritten 4" --mixture objectives   # a sweep's best
    python jobs/sample.py --mixture-dir digits-mixture --prompt "a handwritten 4"  # an export
    python jobs/sample.py --student student-1a2b3c4d5e --prompt "a handwritten 4"  # distilled
    python jobs/sample.py --config jobs/configs/<campaign>.yaml root=s3://bucket/c --prompt "..."
    ray job submit --working-dir . -- python jobs/sample.py root=/abs/path/runs/demo \
        --prompt "a handwritten digit seven" --out /abs/path/seven.png

The mixture is the campaign's own (``experts.ddpm_clusters`` of the config), another objective
assignment (``--assignment "D F F D ..."``: one letter per cluster, D = ddpm_eps, F =
fm_velocity, ``-`` = that expert left out: its routing weight is masked and the others
renormalised, no training), or a sweep's best (``--mixture NAME``: ``<root>/sweeps/NAME/best_mixture.json``,
whose routing, k, threshold, guidance, steps and seed are the defaults; the flags override them),
or a folder ``jobs/export_mixture.py`` wrote (``--mixture-dir PATH``: its own settings, the flags
over them; no campaign is needed and the default ``--out`` is ``./samples/``), or a dense student
``jobs/distill.py`` trained (``--student ID``: ``<root>/students/ID``, sampled as a one-expert
mixture at its own guidance). Every expert it
uses must be trained (``python jobs/train_all_experts.py``).

Prints, for each image, the experts it used with their routing weights: the blend weights of
the routing strategy (``--routing``, ``--k``), **averaged over the sampling trajectory** (every
ODE evaluation from t = 1 to t = 0, in equal parts), so the weights of an image sum to 1 and an
expert that top-k routing never picked for it is absent. Writes the grid to ``--out`` (default
``<root>/samples/<first prompt>.png``; one row per prompt, ``--num`` images each) and runs in
this process (``--device``, default auto: a GPU when this machine has one); no Ray cluster is
needed, and under ``ray job submit`` it runs in the job's driver.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hdd_ray.choices import STRATEGIES
from hdd_ray.cli import parse_job_args

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig
    from hdd_ray.ensemble import MixtureSpec


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise SystemExit(f"error: --prompts {args.prompts}: no such file")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    return prompts


def _default_out(root: str, prompt: str) -> str:
    from hdd_ray import storage

    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "sample"
    return storage.join(root, "samples", f"{slug}.png")


def main(argv: list[str] | None = None) -> int:
    """Sample the mixture for the prompts; returns the process exit status."""
    cfg, args = parse_job_args(__doc__, argv, extra=[
        ("--prompt", {"action": "append", "default": None, "metavar": "TEXT",
                      "help": "a prompt (repeat for several)"}),
        ("--prompts", {"default": None, "metavar": "FILE",
                       "help": "a text file, one prompt per line (# comments skipped)"}),
        ("--num", {"type": int, "default": 4, "help": "images per prompt (default 4)"}),
        ("--seed", {"type": int, "default": None, "help": "noise seed (default sampling.seed)"}),
        ("--assignment", {"default": None, "metavar": "'D F F D ...'",
                          "help": "objective per cluster, '-' leaves an expert out "
                                  "(default: experts.ddpm_clusters)"}),
        ("--mixture", {"default": None, "metavar": "NAME",
                       "help": "a sweep's best mixture (sweep name or best_mixture.json path)"}),
        ("--mixture-dir", {"default": None, "metavar": "PATH",
                           "help": "a mixture folder (jobs/export_mixture.py)"}),
        ("--student", {"default": None, "metavar": "ID",
                       "help": "a distilled student of the campaign (jobs/distill.py)"}),
        ("--routing", {"default": None, "choices": list(STRATEGIES)}),
        ("--k", {"type": int, "default": None, "help": "experts per sample for topk"}),
        ("--threshold", {"type": float, "default": None}),
        ("--guidance", {"type": float, "default": None, "help": "classifier-free guidance"}),
        ("--steps", {"type": int, "default": None, "help": "ODE steps"}),
        ("--out", {"default": None, "metavar": "PATH", "help": "the PNG grid to write"}),
        ("--device", {"default": "auto", "help": "cpu, cuda, cuda:<i>, or auto"}),
    ])
    from hdd_ray.errors import CampaignError, ConfigError, MixtureError, SweepError

    prompts = _read_prompts(args)
    if not prompts:
        print("error: no prompt: give --prompt TEXT (repeatable) or --prompts FILE",
              file=sys.stderr)
        return 2
    if args.num < 1:
        print(f"error: --num {args.num}: must be >= 1", file=sys.stderr)
        return 2
    if args.steps is not None and args.steps < 1:
        print(f"error: --steps {args.steps}: must be >= 1", file=sys.stderr)
        return 2
    try:
        cfg, spec = _mixture(cfg, args)
        return _sample(cfg, args, prompts, spec)
    except (CampaignError, ConfigError, MixtureError, SweepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _mixture(cfg: CampaignConfig,
             args: argparse.Namespace) -> tuple[CampaignConfig, MixtureSpec]:
    """The campaign (a sweep's variant with ``--mixture``) and the mixture to sample: the
    config's or the sweep's best, its assignment replaced by ``--assignment``, its routing,
    guidance, steps and seed by the flags given (checked: one line naming the flag)."""
    from hdd_ray.choices import parse_mixture
    from hdd_ray.ensemble import MixtureSpec

    if args.student:  # a dense student: a one-expert mixture at its own guidance
        from hdd_ray import storage
        from hdd_ray.campaign import STUDENT_JSON, CampaignPaths
        from hdd_ray.ensemble import student_config
        from hdd_ray.errors import ConfigError

        if args.mixture or args.assignment or args.mixture_dir:
            raise ConfigError("--student: a student is one model (no --mixture, --mixture-dir "
                              "or --assignment with it)")
        card = storage.join(CampaignPaths(storage.absolute(cfg.root)).student_dir(args.student),
                            STUDENT_JSON)
        if not storage.exists(card):
            raise ConfigError(f"--student {args.student}: no {card} (python jobs/distill.py)")
        try:
            student = storage.read_json(card)
            cfg = student_config(cfg, student)
        except (ValueError, TypeError, KeyError, AttributeError, OSError) as exc:
            raise ConfigError(f"--student {args.student}: {card} is unreadable or incomplete "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:100]})"
                              ) from None
        spec = MixtureSpec.from_config(cfg)
    elif args.mixture_dir:  # an exported folder: its own settings, the flags over them
        from hdd_ray.errors import ConfigError
        from hdd_ray.mixture_folder import folder_config, read_mixture

        if args.mixture or args.assignment:
            raise ConfigError("--mixture-dir: a mixture folder has its own assignment "
                              "(no --mixture or --assignment with it)")
        cfg = folder_config(args.mixture_dir)
        spec = MixtureSpec.from_config(  # with the experts it leaves out
            cfg, retired=read_mixture(args.mixture_dir)["spec"].get("retired"))
    elif args.mixture:
        from hdd_ray.sweep import load_mixture_spec

        cfg, spec = load_mixture_spec(cfg, args.mixture)
    else:
        spec = MixtureSpec.from_config(cfg)
    k_clusters = cfg.clustering.k
    ddpm, retired = (parse_mixture(args.assignment, k_clusters, "--assignment")
                     if args.assignment else (None, None))
    return cfg, spec.override(k_clusters, "--", ddpm_clusters=ddpm, retired=retired,
                              routing=args.routing,
                              k=args.k, threshold=args.threshold, guidance=args.guidance,
                              steps=args.steps,
                              seed=args.seed if args.seed is not None else cfg.sampling.seed)


def _sample(cfg: CampaignConfig, args: argparse.Namespace, prompts: list[str],
            spec: MixtureSpec) -> int:
    import torch

    from hdd_ray import storage
    from hdd_ray.devices import resolve_device
    from hdd_ray.ensemble import Mixture, load_mixture, route
    from hdd_ray.evaluation.grids import page_path, save_grid
    from hdd_ray.progress import Progress

    device = resolve_device(args.device)
    images_prompts = [p for p in prompts for _ in range(args.num)]
    n = len(images_prompts)
    batch = cfg.sampling.batch_size  # the mixture samples batch after batch, in order
    if args.student:
        from hdd_ray.campaign import CampaignPaths

        mixture = Mixture.from_student(CampaignPaths(cfg.root).student_dir(args.student), cfg,
                                       device)
    elif args.mixture_dir:
        mixture = Mixture.from_folder(args.mixture_dir, device)
    else:
        mixture = load_mixture(cfg, spec.ddpm_clusters, device, retired=spec.retired)
    k_clusters = cfg.clustering.k
    print(f"mixture {spec.assignment(k_clusters)} ({spec.routing}"
          + (f", k={spec.k}" if spec.routing == "topk" else "")
          + f", guidance {spec.guidance:g}, {spec.steps} {cfg.sampling.sampler} "
          f"steps, seed {spec.seed}) on {device}: {n} images", flush=True)

    calls = 2 * spec.steps - 1 if cfg.sampling.sampler == "heun" else spec.steps
    weights_sum = torch.zeros(n, k_clusters, dtype=torch.float64)
    counted = [0]
    router = mixture.router_probs

    with Progress(calls * -(-n // batch), "sampling", unit="evals") as bar:
        def recording_router(x_t, t, cond=None):
            probs = router(x_t, t, cond)
            w = route(probs.float(), spec.routing, spec.k, spec.threshold)
            start = (counted[0] // calls) * batch  # the batch this call belongs to
            weights_sum[start: start + w.shape[0]] += w.double().cpu()
            counted[0] += 1
            bar.update()
            return probs

        mixture.router_probs = recording_router  # MixtureField asks the router through this
        images = mixture.sample(images_prompts, seed=spec.seed, strategy=spec.routing,
                                k=spec.k, threshold=spec.threshold, guidance=spec.guidance,
                                steps=spec.steps)
    weights = weights_sum / calls
    out = args.out or _default_out("." if args.mixture_dir else cfg.root, prompts[0])
    if not storage.is_uri(out):
        Path(out).resolve().parent.mkdir(parents=True, exist_ok=True)
    pages = save_grid(out, images, images_prompts, per_row=args.num)
    names = [d.get("expert_id", f"cluster {c}") for c, (_, d) in enumerate(mixture.experts)]
    print("experts used per image (routing weights averaged over the trajectory):")
    for i, prompt in enumerate(images_prompts):
        used = [(w, c) for c, w in enumerate(weights[i].tolist()) if w > 1e-4]
        used.sort(reverse=True)
        text = ", ".join(f"{names[c]} {w:.2f}" for w, c in used)
        print(f"  [{i}] {prompt!r}: {text}")
    print("wrote " + ", ".join(page_path(out, i) for i in range(len(pages))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
