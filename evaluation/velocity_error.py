"""Per-t velocity-error curves of one cluster's experts: its DDPM expert converted, and its FM twin.

    python evaluation/velocity_error.py --cluster 0                      # the demo campaign
    python evaluation/velocity_error.py --cluster 3 --draws 16 --x0-clamp 1
    python evaluation/velocity_error.py --config jobs/configs/<campaign>.yaml root=s3://b/c --cluster 0
    ray job submit --working-dir . -- python evaluation/velocity_error.py --cluster 0

Loads the cluster's ``ddpm_eps`` expert (the campaign's schedule) and its ``fm_velocity`` twin
(both must be trained: the demo trains them as its mixture and its all-FM baseline), draws the
cluster's held-out images with their captions, and for t from 0 to 1 computes the MSE of each
velocity against the flow-matching target ``eps - x0``: the FM expert, the DDPM expert converted
with the defaults (``ddpm``) and with the earlier scheme (``ddpm_before``: divide by
``max(1 - t, 1e-3)``), and with ``--x0-clamp`` (default: ``sampling.conversion.x0_clamp``) both
with that clamp; at guidance 1 and the campaign's ``sampling.guidance_scale``.

Writes ``<root>/mixtures/velocity_error/c<k>.csv`` and ``c<k>.png`` and logs them to the MLflow
run "velocity error c<k>" (found or created). Results: ``evaluation/README.md``.
"""

from __future__ import annotations

import sys

from hdd_ray.cli import parse_job_args


def main(argv: list[str] | None = None) -> int:
    """Draw the curves; returns the process exit status."""
    cfg, args = parse_job_args(__doc__, argv, extra=[
        ("--cluster", {"type": int, "required": True, "help": "the cluster whose experts to compare"}),
        ("--draws", {"type": int, "default": 8, "help": "noise draws per image and t"}),
        ("--x0-clamp", {"type": float, "default": None,
                        "help": "also measure with this x0 clamp (default: the campaign's)"}),
    ])
    from hdd_ray import campaign, storage, tracking
    from hdd_ray.config import resolve_experts
    from hdd_ray.errors import CampaignError
    from hdd_ray.evaluation.velocity_error import curves_csv, curves_png, expert_curves
    from hdd_ray.samples import read_split

    k = args.cluster
    if not 0 <= k < cfg.clustering.k:
        print(f"error: --cluster {k}: outside 0..{cfg.clustering.k - 1}", file=sys.stderr)
        return 2
    try:
        manifest = campaign.load_manifest(cfg)
        experts = {}
        for name, ddpm in (("fm", []), ("ddpm", [k])):
            variant = campaign.with_assignment(cfg, ddpm)
            eid = campaign.expert_id(variant, resolve_experts(variant)[k], manifest)
            directory = campaign.CampaignPaths(cfg.root).expert_dir(eid)
            if not storage.exists(storage.join(directory, campaign.EXPERT_JSON)):
                raise CampaignError(
                    f"expert {eid} not trained yet: run `python jobs/train_all_experts.py "
                    f"root={cfg.root} experts.ddpm_clusters={ddpm}`")
            experts[name] = campaign.load_expert(directory)
    except CampaignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # latent space: the experts' velocities are over latents
    held = read_split(campaign.heldout_shards(cfg, manifest), manifest.get("latents"),
                      cfg.corpus.image_size, cfg.corpus.channels)
    keep = (held.labels == k).nonzero().flatten().tolist()
    if not keep:
        print(f"error: no held-out images of cluster {k}", file=sys.stderr)
        return 2
    images, captions = held.images[keep], [held.captions[i] for i in keep]
    guidances = sorted({1.0, float(cfg.sampling.guidance_scale)})
    x0_clamp = args.x0_clamp if args.x0_clamp is not None else cfg.sampling.conversion.x0_clamp
    rows = expert_curves(experts["fm"], experts["ddpm"], images, captions, guidances,
                         x0_clamp, draws=args.draws)

    out = campaign.CampaignPaths(cfg.root).velocity_error
    title = f"cluster {k} ({len(keep)} held-out images, {cfg.experts.schedule} DDPM)"
    csv_text, png = curves_csv(rows), curves_png(rows, title)
    storage.write_bytes(storage.join(out, f"c{k}.csv"), csv_text.encode())
    storage.write_bytes(storage.join(out, f"c{k}.png"), png)
    exp = tracking.connect(cfg)
    if exp is not None:
        run = exp.find_or_create(f"velocity error c{k}", {"stage": "velocity_error",
                                                          "cluster": str(k)}, ("stage", "cluster"))
        run.log_text(csv_text, f"velocity_error/c{k}.csv")
        run.log_image(png, artifact_file=f"velocity_error/c{k}.png")
        for name in (n for n in rows[0] if n not in ("guidance", "t")):
            for g in guidances:  # one metric per field and guidance, step = 1000 t
                run.log_curve(f"mse_{name}_g{g:g}", [(round(1000 * r["t"]), r[name])
                                                     for r in rows if r["guidance"] == g])
        run.finish()
    print(f"cluster {k}: velocity MSE against eps - x0 (t = 0.5 / 0.99 / 1)")
    for g in guidances:
        sel = {r["t"]: r for r in rows if r["guidance"] == g}
        for name in (n for n in rows[0] if n not in ("guidance", "t")):
            print(f"  guidance {g:g} {name:22s} " + " / ".join(
                f"{sel[t][name]:.3g}" for t in (0.5, 0.99, 1.0) if t in sel))
    print(f"wrote {storage.join(out, f'c{k}.csv')} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
