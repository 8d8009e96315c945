r"""Distil a mixture into one dense student: one flow-matching DiT that samples in one network
call per ODE step instead of the mixture's router and top-k guided experts.

    python jobs/distill.py                                        # the config's mixture
    python jobs/distill.py distill.teacher="D F F D F F F F" distill.train.steps=2000
    python jobs/distill.py --best objectives                      # a sweep's best mixture
    python jobs/distill.py --mixture-dir digits-mixture           # an exported mixture folder
    python jobs/distill.py --routing top1 --guidance 3 distill.model=DiT-S/2
    python jobs/distill.py distill.data_weight=1                  # the monolith baseline
    ray job submit --working-dir . -- python jobs/distill.py root=/abs/path/runs/demo \
        distill.resources.gpus_per_worker=1

The teacher is the mixture (``distill.teacher``: None = the config's assignment, ``"D F - D
..."``, or ``best`` = the best mixture of the sweep ``sweep.name``; ``--assignment``,
``--best SWEEP`` and ``--mixture-dir PATH`` over it), sampled with its routing, guidance and
conversion (the flags override them as for jobs/sample.py). Every expert it uses and the
router must be trained. The student (``distill.model``, default ``experts.model``; ``distill.train``,
``distill.resources``) trains on every cluster's shards with the teacher's routed, guided
velocity as its target, mixed with the data's by ``distill.data_weight`` (1 = the monolith
baseline, trained on data alone); it samples at guidance 1.

It is a run like an expert's: ``<root>/students/<id>/`` (its id hashes the teacher's experts,
router and settings and the student's own), preemptible and resumed from its last checkpoint,
DDP with ``ray.executor=train`` and ``distill.resources.num_workers > 1``, its MLflow run a
child of this job's campaign run, tagged with its teacher. Sample it with
``python jobs/sample.py --student ID``. Prints the run's status line; exits 1 if it failed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from hdd_ray.cli import MIXTURE_FLAGS, parse_job_args

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig


def main(argv: list[str] | None = None) -> int:
    """Distil the teacher mixture into the student; returns the process exit status."""
    cfg, args = parse_job_args(__doc__, argv, extra=[
        ("--assignment", {"metavar": "'D F F D ...'",
                          "help": "the teacher's objective per cluster, '-' leaves one out "
                                  "(default: distill.teacher, else experts.ddpm_clusters)"}),
        ("--best", {"metavar": "SWEEP", "help": "a sweep's best mixture as the teacher"}),
        ("--mixture-dir", {"metavar": "PATH",
                           "help": "an exported mixture folder as the teacher"}),
        *MIXTURE_FLAGS[:-2],  # --routing, --k, --threshold, --guidance
        ("--steps", {"type": int, "default": None,
                     "help": "the teacher's ODE steps (recorded: how it samples)"}),
    ])
    from hdd_ray import storage, tracking
    from hdd_ray.campaign import load_manifest, model_shape
    from hdd_ray.errors import CampaignError, ConfigError, MixtureError, SweepError
    from hdd_ray.placement import init_ray
    from hdd_ray.progress import format_table
    from hdd_ray.training.distill import student_plan
    from hdd_ray.training.jobs import student_job
    from hdd_ray.training.launcher import train_student

    cfg = replace(cfg, root=storage.absolute(cfg.root))
    try:  # the teacher and the memory plan: refused in one line before Ray starts
        manifest = load_manifest(cfg)
        teacher = _teacher(cfg, args, manifest)
        plan = student_plan(cfg, model_shape(cfg, manifest), teacher)
        if plan.refusal():
            raise ConfigError(plan.refusal())
        job = student_job(cfg, manifest, teacher)
    except (CampaignError, ConfigError, MixtureError, SweepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = job.settings.expert.model if job.settings.expert else "?"
    print(f"{job.name}: the mixture {teacher['assignment']} ({teacher['routing']}, guidance "
          f"{teacher['guidance']:g}) distilled into one {model}" if job.objective == "distill"
          else f"{job.name}: the monolith baseline, one {model} trained on the data alone "
          f"(samples at guidance {teacher['guidance']:g})", flush=True)
    with tracking.run(cfg, "distill", tags={"stage": "campaign"},
                      keep_without_children=False) as parent:
        init_ray(cfg)
        status = train_student(cfg, job, parent.run_id if parent else None)
        print(format_table([status]))
        if not status.ok and parent is not None:
            parent.finish(ok=False)
    return 0 if status.ok else 1


def _teacher(cfg: CampaignConfig, args: argparse.Namespace,
             manifest: dict[str, Any]) -> dict[str, Any]:
    """The teacher's record (:mod:`hdd_ray.training.distill`): an exported folder, a sweep's
    best or an assignment of this campaign, its settings replaced by the flags given."""
    from hdd_ray.campaign import with_assignment
    from hdd_ray.choices import parse_mixture
    from hdd_ray.ensemble import MixtureSpec
    from hdd_ray.errors import ConfigError
    from hdd_ray.training.distill import campaign_teacher, folder_teacher

    k = cfg.clustering.k
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: must be >= 1")
    chosen = [flag for flag, value in (("--assignment", args.assignment), ("--best", args.best),
                                       ("--mixture-dir", args.mixture_dir)) if value]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)}: give one teacher")
    flags = {"routing": args.routing, "k": args.k, "threshold": args.threshold,
             "guidance": args.guidance, "steps": args.steps}
    if args.mixture_dir:
        teacher = folder_teacher(args.mixture_dir, k)
        if any(v is not None for v in flags.values()):
            raise ConfigError("--mixture-dir: a mixture folder's teacher keeps its own routing, "
                              "guidance and steps")
        return teacher
    sweep = args.best or (cfg.sweep.name if cfg.distill.teacher == "best" else None)
    if sweep:
        from hdd_ray.sweep.best import load_mixture_spec

        variant, spec = load_mixture_spec(cfg, sweep)
    else:
        text = args.assignment or cfg.distill.teacher
        ddpm, retired = (parse_mixture(text, k, "--assignment" if args.assignment
                                       else "distill.teacher") if text else (None, None))
        spec = MixtureSpec.from_config(cfg, ddpm, retired=retired)
        variant = with_assignment(cfg, spec.ddpm_clusters)
    spec = spec.override(k, "--", **flags)
    return campaign_teacher(variant, spec, manifest, sweep=sweep)


if __name__ == "__main__":
    raise SystemExit(main())
