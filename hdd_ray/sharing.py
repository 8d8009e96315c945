"""Share a mixture: a campaign's mixture (an objective assignment, or a sweep's best) exported
to one self-contained folder with its model card (:func:`export_mixture`; the format is
:mod:`hdd_ray.mixture_folder`'s), logged to MLflow as a model and registered
(:mod:`hdd_ray.registry`), and the sweep's registration of its best (:func:`register_best`,
``sweep.register_as``).

The model card (``README.md``) holds what a user of the folder needs: the metrics with their
95 % intervals when the mixture was evaluated (``mixtures/<id>/metrics.json``), the experts,
the router, the sampling settings, the towers, the clusters' montage, and the commands that
load it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

from hdd_ray import storage
from hdd_ray.campaign import (
    ROUTER_JSON,
    CampaignPaths,
    content_identity,
    load_manifest,
    router_id,
    short_hash,
)
from hdd_ray.errors import MixtureError

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig
    from hdd_ray.ensemble import MixtureSpec
    from hdd_ray.registry import Logged

log = logging.getLogger(__name__)

__all__ = ["evaluation_key", "export_mixture", "model_card", "register_best", "version_tags"]

#: the metrics a mixture folder keeps of ``metrics.json`` (with their intervals)
METRIC_KEYS = ("fid", "fid_low", "fid_high", "fid_n", "fid_floor", "fid_floor_low",
               "fid_floor_high", "clip_score", "clip_score_low", "clip_score_high",
               "clip_score_real", "diversity", "diversity_low", "diversity_high",
               "diversity_metric", "num_samples", "extractor", "reference_hash",
               "evaluation_version", "mixture_id")


def export_mixture(cfg: CampaignConfig, spec: MixtureSpec, out: str, copy_towers: bool = False,
                   force: bool = False, mixture_id: str | None = None,
                   sweep: str | None = None) -> dict[str, Any]:
    """Write the mixture ``spec`` of the campaign ``cfg`` (the variant of its assignment and
    schedule) to the local folder ``out`` -> its ``mixture.json``.

    Every expert must be trained (one line names the missing ones). ``mixture_id`` names the
    evaluated mixture whose metrics go in the card (default: this spec's, evaluated on a CPU
    or a GPU); ``sweep`` the sweep it is the best of. ``out`` must be new or empty, or a
    mixture folder to replace with ``force``.
    """
    from hdd_ray.choices import format_assignment
    from hdd_ray.ensemble import trained_experts
    from hdd_ray.mixture_folder import write_folder
    from hdd_ray.prepare.manifest import OUTPUT_FILES

    if "centroid" in (spec.router, cfg.sampling.router):
        raise MixtureError("sampling.router=centroid: a mixture folder holds the learned router "
                           "only; export with sampling.router=learned")
    folder = os.path.abspath(os.path.expanduser(out))
    manifest = load_manifest(cfg)
    experts = [(eid, d) for c, (eid, d) in enumerate(trained_experts(cfg, manifest,
                                                                     spec.retired))
               if c not in spec.retired]  # the experts it uses: none of those it leaves out
    rid = router_id(cfg, manifest)
    router = CampaignPaths(cfg.root).router_dir(rid)
    if not storage.exists(storage.join(router, ROUTER_JSON)):
        raise MixtureError(f"router {rid} not trained yet: run `python jobs/train_all_experts.py "
                           f"root={cfg.root}`")
    metrics = _metrics(cfg, spec, [eid for eid, _ in experts], rid, mixture_id)
    k = cfg.clustering.k
    sampling = dataclasses.asdict(cfg.sampling)
    sampling.update(routing=spec.routing, k=spec.k, threshold=spec.threshold,
                    guidance_scale=spec.guidance, steps=spec.steps, seed=spec.seed)
    montage = storage.join(CampaignPaths(cfg.root).clusters, OUTPUT_FILES["montage"])
    from hdd_ray import __version__

    mixture = {
        "name": cfg.name, "hdd_ray_version": __version__,
        "assignment": format_assignment(spec.ddpm_clusters, k, spec.retired),
        "spec": {**dataclasses.asdict(spec), "ddpm_clusters": list(spec.ddpm_clusters),
                 "retired": list(spec.retired)},
        "sampling": sampling, "k": k,
        "image": {"size": cfg.corpus.image_size, "channels": cfg.corpus.channels},
        "mixture_id": (metrics or {}).get("mixture_id") or mixture_id,
        "metrics": metrics,
        "evaluation_key": evaluation_key(cfg, metrics) if metrics else None,
        "source": {"campaign": cfg.name, "root": cfg.root, "sweep": sweep,
                   "data_hash": manifest.get("data_hash")},
    }
    described = write_folder(folder, mixture, [d for _, d in experts], router, copy_towers,
                             model_card,
                             storage.read_bytes(montage) if storage.exists(montage) else None,
                             replace=force)
    log.info("mixture %s exported to %s", mixture["assignment"], folder)
    return described


def _metrics(cfg: CampaignConfig, spec: MixtureSpec, expert_ids: list[str], rid: str,
             given: str | None) -> dict[str, Any] | None:
    """The evaluated mixture's metrics kept by a folder (:data:`METRIC_KEYS`), or None when it
    was not evaluated."""
    from hdd_ray.evaluation.mixture import METRICS_FILE, mixture_id

    paths = CampaignPaths(cfg.root)
    ids = [given] if given else [mixture_id(cfg, spec, expert_ids, router=rid, device_type=t)
                                 for t in ("cpu", "cuda")]
    for mid in ids:
        path = storage.join(paths.mixture_dir(mid), METRICS_FILE)
        if storage.exists(path):
            saved = storage.read_json(path)
            return {key: saved[key] for key in METRIC_KEYS if key in saved}
    return None


def evaluation_key(cfg: CampaignConfig, metrics: dict[str, Any]) -> str:
    """What makes two FIDs comparable, hashed: the feature extractor (name, architecture and
    weights by content), the reference data (``reference_hash``), ``fid_n`` and the evaluation
    version. The champion alias moves only between versions of one key."""
    ev = cfg.evaluation
    return short_hash({"extractor": metrics.get("extractor"),
                       "extractor_arch": content_identity(ev.extractor_arch),
                       "extractor_weights": content_identity(ev.extractor_weights),
                       "reference_hash": metrics.get("reference_hash"),
                       "fid_n": metrics.get("fid_n"),
                       "evaluation_version": metrics.get("evaluation_version")})


def version_tags(described: dict[str, Any]) -> dict[str, str]:
    """The tags of a registered version of the mixture folder described by ``described``
    (its ``mixture.json``): what it is, its FID with interval, its evaluation settings' key."""
    tags = {"assignment": described["assignment"], "routing": described["spec"]["routing"],
            "mixture_id": str(described.get("mixture_id")),
            "campaign": described["name"], "sweep": str(described["source"].get("sweep"))}
    metrics = described.get("metrics") or {}
    for key in ("fid", "fid_low", "fid_high", "fid_n", "clip_score", "diversity"):
        if metrics.get(key) is not None:
            tags[key] = str(metrics[key])
    if described.get("evaluation_key"):
        tags["evaluation_key"] = described["evaluation_key"]
    return tags


def register_best(cfg: CampaignConfig, parent_run_id: str | None = None) -> Logged | None:
    """``sweep.register_as``: export the sweep's best mixture to ``<root>/sweeps/<name>/mixture``
    (a temporary folder for a remote root), log it to MLflow, register it as a version of
    ``sweep.register_as`` and move ``champion`` to it when its FID is lower under the same
    evaluation settings (:func:`hdd_ray.registry.promote`). ``None`` when tracking is off.

    A version registered earlier for the same mixture (its ``mixture_id`` tag) is reused."""
    import tempfile

    from hdd_ray.registry import Logged, log_mixture, promote
    from hdd_ray.sweep.best import best_file, load_mixture_spec

    name, sweep = cfg.sweep.register_as, cfg.sweep.name
    if not cfg.tracking.enabled:
        log.warning("sweep.register_as=%s: tracking.enabled is false, so nothing is registered",
                    name)
        return None
    variant, spec = load_mixture_spec(cfg, sweep)
    best = storage.read_json(best_file(cfg, sweep))
    existing = _registered_version(cfg, name, best.get("mixture_id"))
    if existing is not None:
        client, version = existing
        moved, why = promote(client, name, version)
        return Logged("", f"models:/{name}/{version}", name, version, moved, why)
    with tempfile.TemporaryDirectory() as tmp:
        out = (os.path.join(tmp, "mixture") if storage.is_uri(cfg.root)
               else storage.join(CampaignPaths(cfg.root).sweep_dir(sweep), "mixture"))
        described = export_mixture(variant, spec, out, force=True,
                                   mixture_id=best.get("mixture_id"), sweep=sweep)
        return log_mixture(cfg, out, described, register=name, parent_run_id=parent_run_id,
                           version_tags=version_tags(described))


def _registered_version(cfg: CampaignConfig, name: str,
                        mixture: str | None) -> tuple[Any, str] | None:
    """``(client, version)`` of ``name``'s version tagged with the mixture id ``mixture``."""
    from hdd_ray import tracking

    exp = tracking.connect(cfg) if mixture else None
    if exp is None:
        return None
    for v in exp.client.search_model_versions(f"name = {tracking.filter_literal(name)}"):
        if v.tags.get("mixture_id") == mixture:
            return exp.client, str(v.version)
    return None


# ------------------------------------------------------------------------------- the card


def model_card(m: dict[str, Any]) -> str:
    """The folder's ``README.md`` from its ``mixture.json`` ``m``."""
    spec, s = m["spec"], m["sampling"]
    src = m["source"]
    best = f", the best mixture of sweep `{src['sweep']}`" if src.get("sweep") else ""
    lines = [
        f"# {m['name']}: mixture {m['assignment']}", "",
        f"A Heterogeneous Decentralized Diffusion mixture of {m['k']} experts (D = DDPM "
        "eps-prediction, F = flow matching), each trained alone on one cluster of the data; a "
        "router blends their velocities at every sampling step. Exported by hdd_ray "
        f"{m.get('hdd_ray_version')} from campaign `{src['campaign']}` ({src['root']}){best}.",
        f"Images: {m['image']['size']} x {m['image']['size']} px, {m['image']['channels']} "
        "channel(s).", "",
        "## Metrics", "", *_metrics_lines(m), "",
        "## Experts", "",
        "| cluster | objective | schedule | expert id | architecture | text encoder | steps "
        "| training samples |", "|---|---|---|---|---|---|---|---|",
        *(f"| {e['cluster']} | {e['objective']} | {e.get('schedule') or ''} | {e['expert_id']} "
          f"| {e.get('architecture', '')} | {e.get('text_encoder', '')} | {e.get('steps', '')} "
          f"| {e.get('num_samples', '')} |" for e in m["experts"]), "",
        *([f"Left out (`-`): cluster {', '.join(str(c) for c in spec['retired'])}: no "
           "weights here; the router's weight for it is masked and the rest renormalised.", ""]
          if spec.get("retired") else []),
        f"Router: `{m['router']['router_id']}` ({m['router'].get('architecture', '')}).", "",
        "## Sampling", "",
        f"{spec['routing']} routing" + (f" (k = {spec['k']})" if spec["routing"] == "topk" else "")
        + (f" (threshold {spec['threshold']})" if spec["routing"] == "threshold" else "")
        + f", guidance {spec['guidance']:g}, {spec['steps']} {s['sampler']} steps, time shift "
        f"{s['time_shift']:g}, seed {spec['seed']}, batches of {s['batch_size']}; the DDPM "
        "conversion near t = 1: "
        + ", ".join(f"{key} {value}" for key, value in s["conversion"].items()) + ".", "",
        "## Towers", "", *_tower_lines(m), "",
        "## Clusters", "", "![the clusters, one row each](montage.png)", "",
        "## Use", "", "```python", "import hdd_ray", "",
        "mixture = hdd_ray.Mixture.from_folder(\"PATH/TO/THIS/FOLDER\")  # checks every file",
        "images = mixture.sample([\"a handwritten digit seven\"], seed=0)  # [N, C, H, W] in "
        "[-1, 1]", "```", "",
        "```bash", "python jobs/sample.py --mixture-dir PATH/TO/THIS/FOLDER "
        "--prompt \"a handwritten digit seven\" --out seven.png", "```", "",
        "Registered in MLflow (`jobs/export_mixture.py --register NAME`): "
        "`mlflow.pyfunc.load_model(\"models:/NAME@champion\").predict(pandas.DataFrame("
        "{\"prompt\": [...], \"seed\": [...]}))` gives uint8 images `[N, H, W, C]`.", "",
        "`manifest.json` holds the sha256 of every file: loading refuses a file that does not "
        "match, in one line naming it.", ""]
    return "\n".join(lines)


def _metrics_lines(m: dict[str, Any]) -> list[str]:
    from hdd_ray.evaluation.statistics import Interval

    metrics = m.get("metrics")
    if not metrics:
        return ["Not evaluated: `python jobs/train_all_experts.py` (with evaluation) or a sweep "
                "evaluates it; export again afterwards to record the metrics here."]
    names = {"fid": f"FID (n = {metrics.get('fid_n')})",
             "fid_floor": "FID floor (real held-out images)", "clip_score": "CLIP score",
             "diversity": f"diversity ({metrics.get('diversity_metric', '')})"}
    rows = ["| metric | estimate | 95 % interval |", "|---|---|---|"]
    for key, label in names.items():
        iv = Interval.of(metrics, key)
        if iv is not None:
            rows.append(f"| {label} | {iv.estimate:.4g} | [{iv.low:.4g}, {iv.high:.4g}] |")
    rows += ["", f"{metrics.get('num_samples')} samples; features: {metrics.get('extractor')}; "
             f"evaluation version {metrics.get('evaluation_version')}; evaluated mixture "
             f"`{metrics.get('mixture_id')}`; settings key `{m.get('evaluation_key')}` (FIDs of "
             "one key are comparable)."]
    return rows


def _tower_lines(m: dict[str, Any]) -> list[str]:
    lines = []
    rec = m.get("latents")
    if rec:
        where = (f"copied to `{rec['copy']}`" if rec.get("copy")
                 else f"referenced at `{rec['vae']}`" + (f" (subfolder `{rec['subfolder']}`)"
                                                         if rec.get("subfolder") else ""))
        lines.append(f"* VAE (latent space {rec.get('shape')}): {where}, sha256 "
                     f"`{rec['sha256']}`")
    else:
        lines.append("* Pixel space: no VAE.")
    for t in m.get("text_towers") or []:
        where = f"copied to `{t['copy']}`" if t.get("copy") else f"referenced at `{t['path']}`"
        lines.append(f"* Text tower file `{t['value']}`: {where}, sha256 `{t['sha256']}`")
    if not m.get("text_towers"):
        lines.append("* Text: no tower file (learned text encoders are in the experts' weights,"
                     " or open_clip tags are loaded from open_clip's cache).")
    lines.append("A referenced tower must be at that path with that content; "
                 "`jobs/export_mixture.py --copy-towers` carries them in the folder.")
    return lines
