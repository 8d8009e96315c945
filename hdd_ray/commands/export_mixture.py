r"""Share a mixture: write it to one self-contained folder, log it to MLflow as a model, and
register it in MLflow's Model Registry.

    python jobs/export_mixture.py --out digits-mixture              # the config's mixture
    python jobs/export_mixture.py --best objectives --out best      # a sweep's best mixture
    python jobs/export_mixture.py --assignment "D F F D F F F F" --routing top1 --out m
    python jobs/export_mixture.py --assignment "D - F D F F F F" --out m   # expert 1 left out
    python jobs/export_mixture.py --out m --copy-towers             # carry the VAE / text towers
    python jobs/export_mixture.py --out m --register digits         # + a registered version
    python jobs/export_mixture.py --config jobs/configs/<campaign>.yaml root=s3://bucket/c \
        --best objectives --out /abs/path/mixture --register my-mixture

The folder holds every expert's weights and card (``expert.json``), the router, the sampling
settings (``mixture.json``: routing, k, threshold, guidance, steps, seed; ``--routing`` and the
other flags override the config's or the sweep's), the VAE and text-tower files the experts
need, by reference (path + content sha256) or copied (``--copy-towers``), a model card
(``README.md``) with the metrics and their 95 % intervals when the mixture was evaluated, the
clusters' montage, and ``manifest.json`` with the sha256 of every file. Load it anywhere:

    import hdd_ray; mixture = hdd_ray.Mixture.from_folder("digits-mixture")
    python jobs/sample.py --mixture-dir digits-mixture --prompt "a handwritten 7"

Every expert of the mixture must be trained (``python jobs/train_all_experts.py``). With
tracking on (``tracking.enabled``, the default) the folder is also logged as an MLflow pyfunc
model in a run of the campaign's experiment; ``--register NAME`` registers it as a version of
``NAME`` and moves the alias ``champion`` to it when its FID is lower than the champion's under
the same evaluation settings (or there is none yet). ``--force`` replaces an exported folder.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import TYPE_CHECKING

from hdd_ray.cli import MIXTURE_FLAGS, parse_job_args

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig
    from hdd_ray.ensemble import MixtureSpec


def main(argv: list[str] | None = None) -> int:
    """Export the mixture (and log / register it); returns the process exit status."""
    cfg, args = parse_job_args(__doc__, argv, extra=[
        ("--out", {"metavar": "DIR",
                   "help": "the folder to write (default ./<name>-<assignment>)"}),
        ("--copy-towers", {"action": "store_true",
                           "help": "copy the VAE and text-tower files into the folder"}),
        ("--assignment", {"metavar": "'D F F D ...'",
                          "help": "objective per cluster, '-' leaves an expert out "
                                  "(default: experts.ddpm_clusters)"}),
        *MIXTURE_FLAGS,  # --routing, --k, --threshold, --guidance, --steps, --seed
        ("--best", {"metavar": "SWEEP",
                    "help": "a sweep's best mixture (its name, or a best_mixture.json)"}),
        ("--register", {"metavar": "NAME",
                        "help": "register the logged model as a version of NAME"}),
    ])
    from hdd_ray.config import check_safe_name
    from hdd_ray.errors import CampaignError, ConfigError, MixtureError, SweepError

    try:
        if args.register is not None:
            check_safe_name("--register", args.register)
            if not cfg.tracking.enabled:
                raise ConfigError("--register needs MLflow: tracking.enabled is false")
        cfg, spec, evaluated = _spec(cfg, args)
        return _export(cfg, args, spec, evaluated)
    except (CampaignError, ConfigError, MixtureError, SweepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _spec(cfg: CampaignConfig, args: argparse.Namespace) -> tuple[
        CampaignConfig, MixtureSpec, str | None]:
    """The campaign variant of the mixture, its spec and the id of its evaluation: the
    config's (``--assignment``) or the sweep's best (``--best``: its evaluation, unless a flag
    changes it), the flags given in place of its settings (checked)."""
    from hdd_ray import storage
    from hdd_ray.campaign import with_assignment
    from hdd_ray.choices import parse_mixture
    from hdd_ray.ensemble import MixtureSpec
    from hdd_ray.errors import ConfigError

    k, evaluated = cfg.clustering.k, None
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: must be >= 1")
    if args.best:
        if args.assignment:
            raise ConfigError("--assignment: a sweep's best (--best) has its own assignment")
        from hdd_ray.sweep.best import best_file, load_mixture_spec

        evaluated = storage.read_json(best_file(cfg, args.best, "--best")).get("mixture_id")
        cfg, spec = load_mixture_spec(cfg, args.best)
    else:
        ddpm, retired = (parse_mixture(args.assignment, k, "--assignment") if args.assignment
                         else (None, None))
        spec = MixtureSpec.from_config(cfg, ddpm, retired=retired)
        cfg = with_assignment(cfg, spec.ddpm_clusters)
    given = spec.override(k, "--", routing=args.routing, k=args.k, threshold=args.threshold,
                          guidance=args.guidance, steps=args.steps, seed=args.seed)
    return cfg, given, evaluated if given == spec else None


def _export(cfg: CampaignConfig, args: argparse.Namespace, spec: MixtureSpec,
            evaluated: str | None) -> int:
    from hdd_ray.registry import log_mixture
    from hdd_ray.sharing import export_mixture, version_tags

    assignment = spec.assignment(cfg.clustering.k)
    out = args.out or f"{cfg.name}-{re.sub(r'[^A-Za-z]', '', assignment)}"
    described = export_mixture(cfg, spec, out, copy_towers=args.copy_towers, force=args.force,
                               mixture_id=evaluated, sweep=args.best)
    metrics = described.get("metrics")
    print(f"mixture {assignment} ({spec.routing}, guidance {spec.guidance:g}, {spec.steps} "
          f"steps) -> {out}" + (f"; FID {metrics['fid']:.4g} [{metrics['fid_low']:.4g}, "
                                f"{metrics['fid_high']:.4g}]" if metrics else "; not evaluated"))
    logged = log_mixture(cfg, out, described, register=args.register,
                         version_tags=version_tags(described))
    if logged is None:
        print("MLflow: not logged (tracking off or unreachable)")
        return 0 if args.register is None else 2
    print(f"MLflow: logged as {logged.model_uri} (run {logged.run_id})")
    if logged.version is not None:
        print(f"registered {logged.name} version {logged.version}: {logged.reason}"
              + (f" -> alias champion (models:/{logged.name}@champion)" if logged.champion
                 else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
