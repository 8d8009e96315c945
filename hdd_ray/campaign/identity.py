"""Identities and ids: what determines an expert's or the router's weights, hashed into its
id (:func:`short_hash`), and the campaign's objective assignments.

Ids are deterministic: an expert's id hashes everything that determines its weights (its
*identity*: cluster, objective, schedule, model, text encoder, training settings, its cluster's
data hash, image size and channels), never where or how fast it runs. A finished expert (valid
``weights.safetensors`` + ``expert.json``) is therefore reused by any campaign that asks for the
same identity.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from hdd_ray.campaign.artifacts import content_identity
from hdd_ray.campaign.directory import CampaignPaths, cluster_info
from hdd_ray.campaign.generations import contributed_expert, parent_view
from hdd_ray.campaign.starts import describe_router_init, expert_start, start_identity
from hdd_ray.config import to_dict
from hdd_ray.errors import CampaignError

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig, ResolvedExpert

#: how a step fits in GPU memory (micro-batches, recomputed activations): the same samples, noise
#: and mean loss (hdd_ray.training.memory), so left out of identities and of a sweep's
#: description, like the world size
MEMORY_TRAIN_KEYS = ("micro_batch_size", "activation_checkpointing")
#: training settings that change neither an expert's nor the router's weights, so they are left
#: out of identities: changing them keeps the cached run
NON_IDENTITY_TRAIN_KEYS = ("checkpoint_every", "async_checkpoint", "compile",
                           *MEMORY_TRAIN_KEYS)


def short_hash(obj: Any, n: int = 10) -> str:
    """The first ``n`` hex digits (64: all) of sha256 over ``obj`` as JSON with sorted keys.

    Every id of the campaign (experts, router, mixtures) is a readable prefix plus this hash of
    what defines the thing, so equal definitions get equal ids across runs and machines. Values
    JSON cannot write (paths, numpy scalars) are written as ``str(value)``.
    """
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


#: train keys added after ids were first published: left out of an identity at these (default)
#: values, so the ids of runs trained before the keys existed do not change
LATER_TRAIN_DEFAULTS = {"lr_schedule": "constant", "warmup_steps": 0}


def without_later_defaults(train: dict[str, Any]) -> dict[str, Any]:
    """``train`` without the keys of :data:`LATER_TRAIN_DEFAULTS` left at those values, and
    without :data:`MEMORY_TRAIN_KEYS`: what a recipe recorded before the keys existed (an id, a
    sweep's description) compares equal to."""
    return {k: v for k, v in train.items() if k not in MEMORY_TRAIN_KEYS
            and not (k in LATER_TRAIN_DEFAULTS and v == LATER_TRAIN_DEFAULTS[k])}


def _identity_train(train: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in without_later_defaults(train).items()
            if k not in NON_IDENTITY_TRAIN_KEYS}


def applied_precision(train: dict[str, Any], resources: dict[str, Any]) -> str:
    """The precision a run actually trains in: ``bf16`` only when it asks for GPUs (bf16
    autocast is a no-op on CPUs, :func:`hdd_ray.devices.autocast`), else ``fp32``."""
    gpus = float(resources.get("gpus_per_worker", 0) or 0) > 0
    return "bf16" if gpus and train.get("mixed_precision") == "bf16" else "fp32"


def _text_identity(text: dict[str, Any]) -> dict[str, Any]:
    """The text encoder's settings with local pretrained files (weights, an open_clip config
    ``.json``) replaced by their content hash; unchanged (old ids kept) when none is local."""
    out = dict(text)
    for key in ("pretrained", "arch"):
        ident = content_identity(out.get(key))
        if ident is not out.get(key):
            out[key] = ident
    return out


def text_features_record(text: dict[str, Any]) -> dict[str, Any] | None:
    """The ``text_features`` record prepare stores for the experts' text settings ``text``
    (``experts.text`` as a dict; :mod:`hdd_ray.models.text_features`): the tower's
    ``identity`` (its architecture and weights, local files by content), where it is
    (``arch``, ``pretrained``), its ``width`` and ``context_length``, the storage ``dtype`` and
    shard ``member``. None for a learned encoder, and for a frozen tower without weights (a
    random tower differs in every process, so its features are not stored). Raises
    ``ValueError`` or ``FileNotFoundError`` (one line) for an architecture open_clip does not
    know, a tag it does not have or a weights file that is not there (:mod:`hdd_ray.towers`'s
    own checks, before any actor loads the tower)."""
    if text.get("encoder", "learned") == "learned" or not text.get("pretrained"):
        return None
    from hdd_ray import towers
    from hdd_ray.models.text_features import FEATURE_DTYPE, TEXT_MEMBER

    towers.resolve_open_clip(str(text["arch"]), str(text["pretrained"]), "experts.text.arch",
                             "experts.text.pretrained")
    shape = towers.open_clip_text_config(str(text["arch"]), "experts.text.arch")
    ident = {"arch": content_identity(text["arch"]),
             "pretrained": content_identity(text["pretrained"])}
    return {"identity": short_hash(ident, 16), "arch": str(text["arch"]),
            "pretrained": str(text["pretrained"]), "width": int(shape["width"]),
            "context_length": int(shape["context_length"]), "dtype": FEATURE_DTYPE,
            "member": TEXT_MEMBER}


def check_text_features(cfg: CampaignConfig, manifest: dict[str, Any],
                        text: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The manifest's ``text_features`` record when the experts' text settings ``text``
    (default ``experts.text``) train from stored features (a frozen tower with weights), else
    None. Raises :class:`CampaignError` (one line; jobs call it before Ray takes anything) when
    the corpus was prepared without them or by another tower: features are never mixed."""
    try:
        want = text_features_record(text if text is not None else to_dict(cfg.experts.text))
    except (ValueError, OSError) as exc:
        raise CampaignError(str(exc).splitlines()[0]) from None
    if want is None:
        return None
    have = manifest.get("text_features")
    if not have or have.get("identity") != want["identity"]:
        what = (f"by the text tower {have.get('arch')} ({have.get('pretrained')})" if have
                else "without stored text features")
        raise CampaignError(
            f"experts.text: the frozen tower {want['arch']} ({want['pretrained']}) but the corpus "
            f"at {CampaignPaths(cfg.root).clusters} was prepared {what}: run "
            f"`python jobs/prepare_corpus.py root={cfg.root}` (it stores this tower's features)")
    return have


def expert_identity(cfg: CampaignConfig, expert: ResolvedExpert,
                    manifest: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the expert's weights (resources excluded).

    The data hash is its own cluster's, so re-clustering that leaves a cluster unchanged keeps
    its expert. Its start (:mod:`hdd_ray.campaign.starts`): a different init is a different
    expert, counted by content, never by path. Local pretrained files (the open_clip text tower's weights or config) count by
    content. Precision counts as applied: ``"precision": "bf16"`` is added only when bf16
    autocast really runs (GPUs asked for), so CPU ids are those of earlier releases.

    World size is not part of it, by design: ``train.batch_size`` is the **global** batch of a
    micro-step, split evenly over the run's workers
    (:func:`hdd_ray.training.loop.rank_batch_size`), so 1 worker and 4 workers train the same
    recipe (same global batch, learning rate and steps); only the random streams and float
    summation order differ (ARCHITECTURE.md, "Batch size"). A partial run may therefore resume
    under another world size.

    A contributed expert (``jobs/add_expert.py --expert-dir``) was trained elsewhere: its
    identity is its weights by content with its cluster, objective, data and shape.
    """
    contributed = contributed_expert(manifest, expert.cluster)
    if contributed is not None:
        return {"cluster": expert.cluster, "objective": expert.objective,
                "contributed": contributed,
                "data_hash": str(cluster_info(manifest, expert.cluster)["hash"]),
                "image_size": cfg.corpus.image_size, "channels": cfg.corpus.channels,
                **_latent_identity(manifest)}
    identity = {
        "cluster": expert.cluster,
        "objective": expert.objective,
        "schedule": expert.schedule,
        "model": expert.model,
        "text": _text_identity(expert.text),
        "train": _identity_train(expert.train),
        "data_hash": str(cluster_info(manifest, expert.cluster)["hash"]),
        "image_size": cfg.corpus.image_size,
        "channels": cfg.corpus.channels,
    }
    if applied_precision(expert.train, expert.resources or {}) == "bf16":
        identity["precision"] = "bf16"
    stored = manifest.get("text_features")
    if stored and text_features_record(expert.text) is not None:
        identity["text_features"] = stored.get("dtype")  # trained from stored features
    identity.update(_latent_identity(manifest))
    # its start: the init's format and content hash, mode, AdaLN variant, network (nothing
    # for a scratch expert of the objective's own network: its id is unchanged)
    identity.update(start_identity(expert_start(cfg, expert), expert))
    return identity


def _latent_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """``{"latents": <the VAE's identity, latent shape, scaling>}`` in latent space; nothing in
    pixel space, so pixel-space ids stay what they were."""
    from hdd_ray.latents import identity_of

    ident = identity_of(manifest.get("latents"))
    return {"latents": ident} if ident else {}


def model_shape(cfg: CampaignConfig, manifest: dict[str, Any]) -> tuple[int, int]:
    """``(size, channels)`` of what the experts and the router see: the latent shape in latent
    space (the manifest's record), else the corpus's image size and channels."""
    rec = manifest.get("latents")
    if rec:
        return int(rec["shape"][1]), int(rec["shape"][0])
    return cfg.corpus.image_size, cfg.corpus.channels


def expert_id(cfg: CampaignConfig, expert: ResolvedExpert, manifest: dict[str, Any]) -> str:
    """Deterministic id of an expert in this campaign, e.g. ``c1-ddpm-<hash of its identity>``."""
    tag = "ddpm" if expert.objective == "ddpm_eps" else "fm"
    return f"c{expert.cluster}-{tag}-{short_hash(expert_identity(cfg, expert, manifest))}"


def with_k(cfg: CampaignConfig, k: int) -> CampaignConfig:
    """The same campaign over the cluster set of ``k`` clusters (a generation of its manifest:
    :mod:`hdd_ray.campaign.generations`)."""
    return dataclasses.replace(cfg, clustering=dataclasses.replace(cfg.clustering, k=int(k)))


def router_train(cfg: CampaignConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """The router's training settings in the generation ``manifest`` views: ``router.train``,
    with ``router.grow.steps`` for an incremental router of a grown cluster set."""
    train = to_dict(cfg.router.train)
    if grown_from(cfg, manifest) is not None:
        train["steps"] = int(cfg.router.grow.steps)
    return train


def grown_from(cfg: CampaignConfig, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The previous cluster set's generation view when the router of ``manifest``'s is
    fine-tuned from that set's router (``router.grow.mode=incremental`` and a grown set), else
    None (generation 0, or ``scratch``)."""
    parent = parent_view(manifest)
    if parent is None or cfg.router.grow.mode != "incremental":
        return None
    return parent


def router_identity(cfg: CampaignConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """What determines the router's weights (precision as applied, as for experts): its cluster
    set (K and the generation's ``data_hash``, which covers every cluster's data: prepare's
    corpus hash, or a grown set's chain; :mod:`hdd_ray.campaign.generations`), and for an
    incremental router of a grown set the router it starts from (by id) and its replay."""
    train = router_train(cfg, manifest)
    identity = {"model": cfg.router.model, "train": _identity_train(train),
                "k": cfg.clustering.k, "data_hash": str(manifest["data_hash"]),
                "image_size": cfg.corpus.image_size, "channels": cfg.corpus.channels}
    if applied_precision(train, to_dict(cfg.router.resources)) == "bf16":
        identity["precision"] = "bf16"
    identity.update(_latent_identity(manifest))
    parent = grown_from(cfg, manifest)
    if parent is not None:  # one output more, fine-tuned from the previous set's router
        identity["grown_from"] = router_id(with_k(cfg, parent["k"]), parent)
        identity["replay_samples"] = int(cfg.router.grow.replay_samples)
    elif cfg.router.init:  # a router fine-tuned from another: by content
        identity["init"] = {"sha256": describe_router_init(cfg.router.init)}
    return identity


def router_id(cfg: CampaignConfig, manifest: dict[str, Any]) -> str:
    """Deterministic id of the campaign's router."""
    return "router-" + short_hash(router_identity(cfg, manifest))


#: what a student's teacher contributes to its identity: the mixture it follows, never paths
TEACHER_IDENTITY_KEYS = ("experts", "router", "routing", "k", "threshold", "guidance",
                         "retired", "conversion", "sampler", "mixed_precision")


def student_identity(cfg: CampaignConfig, manifest: dict[str, Any],
                     teacher: dict[str, Any] | None) -> dict[str, Any]:
    """What determines a distilled student's weights (``distill``; precision as applied): its
    architecture, text encoder, training settings and data weight, the data (every cluster's:
    the manifest's hash), and, when it learns from one (``distill.data_weight < 1``), its
    teacher: the experts' and router's ids, routing, guidance, conversion and sampler settings
    (:data:`TEACHER_IDENTITY_KEYS` of the record,
    :func:`hdd_ray.training.distill.campaign_teacher`). The monolith baseline
    (``data_weight: 1``) has no teacher: one monolith per recipe, whatever the mixture."""
    d = cfg.distill
    train, resources = to_dict(d.train), to_dict(d.resources)
    identity: dict[str, Any] = {
        "student": "fm_velocity", "model": d.model or cfg.experts.model,
        "text": _text_identity(to_dict(cfg.experts.text)), "train": _identity_train(train),
        "data_weight": float(d.data_weight), "data_hash": str(manifest["data_hash"]),
        "image_size": cfg.corpus.image_size, "channels": cfg.corpus.channels}
    if cfg.experts.adaln != "single":
        identity["adaln"] = cfg.experts.adaln
    if applied_precision(train, resources) == "bf16":
        identity["precision"] = "bf16"
    identity.update(_latent_identity(manifest))
    if teacher is not None and float(d.data_weight) < 1:
        ids = dict(teacher, experts=[e and e["expert_id"] for e in teacher["experts"]],
                   router=teacher["router"]["router_id"])
        identity["teacher"] = {key: ids.get(key) for key in TEACHER_IDENTITY_KEYS}
    return identity


def student_id(cfg: CampaignConfig, manifest: dict[str, Any],
               teacher: dict[str, Any] | None) -> str:
    """Deterministic id of a student (``student-<hash>``), or of the monolith baseline
    (``monolith-<hash>``: ``distill.data_weight: 1``)."""
    prefix = "monolith" if float(cfg.distill.data_weight) >= 1 else "student"
    return f"{prefix}-{short_hash(student_identity(cfg, manifest, teacher))}"


def with_assignment(cfg: CampaignConfig, ddpm_clusters: Iterable[int],
                    schedule: str | None = None) -> CampaignConfig:
    """The same campaign with another objective assignment (and DDPM schedule, when given)."""
    experts = dataclasses.replace(cfg.experts, ddpm_clusters=sorted(ddpm_clusters))
    if schedule is not None:
        experts = dataclasses.replace(experts, schedule=schedule)
    return dataclasses.replace(cfg, experts=experts)


def campaign_assignments(cfg: CampaignConfig) -> list[list[int]]:
    """The objective assignments the campaign needs: its own, plus the evaluation baseline."""
    out = [sorted(cfg.experts.ddpm_clusters)]
    base = cfg.evaluation.baseline_ddpm_clusters
    if cfg.evaluation.enabled and base is not None and sorted(base) not in out:
        out.append(sorted(base))
    return out
