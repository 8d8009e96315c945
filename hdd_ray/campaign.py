"""The campaign layer: its directory, its manifest, the ids of its experts and router, its
objective assignments, and loading finished experts and the router for inference.

Training, the ensemble, evaluation and sweeps all read the campaign through this module; none of
them needs the training launcher to find an expert (ARCHITECTURE.md describes the layers and the
campaign directory layout).

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
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hdd_ray import storage
from hdd_ray.config import CampaignConfig, ResolvedExpert, to_dict
from hdd_ray.errors import CampaignError, ConfigError, ExpertRejected

if TYPE_CHECKING:
    from hdd_ray.models.expert import ExpertModel, RouterModel

WEIGHTS = "weights.safetensors"
EXPERT_JSON = "expert.json"
ROUTER_JSON = "router.json"

#: training settings that change neither an expert's nor the router's weights, so they are left
#: out of identities: changing them keeps the cached run
NON_IDENTITY_TRAIN_KEYS = ("checkpoint_every", "compile")

#: letters of an objective assignment string ("D F F D"): cluster uses ddpm_eps / the base


# ------------------------------------------------------------------------------- the directory


@dataclass(frozen=True)
class CampaignPaths:
    """Where each stage's outputs live under one campaign root (a local path or a URI).

    The layout is described in ARCHITECTURE.md; every path of the campaign is built here.
    """

    root: str

    @property
    def corpus(self) -> str:
        """Input shards written by the demo corpus (or ``corpus.uri``)."""
        return storage.join(self.root, "corpus")

    @property
    def clusters(self) -> str:
        """Clustering outputs: manifest, centroids, assignments, per-cluster shards."""
        return storage.join(self.root, "clusters")

    @property
    def manifest(self) -> str:
        """``clusters/manifest.json``."""
        return storage.join(self.clusters, "manifest.json")

    def cluster_dir(self, k: int) -> str:
        """Per-cluster training shards ``clusters/<k>/``."""
        return storage.join(self.clusters, str(k))

    @property
    def heldout(self) -> str:
        """Held-out evaluation split ``clusters/heldout/``."""
        return storage.join(self.clusters, "heldout")

    @property
    def experts(self) -> str:
        """All experts' storage (the Ray Train storage path of the expert runs)."""
        return storage.join(self.root, "experts")

    def expert_dir(self, expert_id: str) -> str:
        """One expert's storage (Ray Train run + final weights + expert.json)."""
        return storage.join(self.experts, expert_id)

    @property
    def router(self) -> str:
        """The routers' storage (the Ray Train storage path of the router runs)."""
        return storage.join(self.root, "router")

    def router_dir(self, router_id: str) -> str:
        """One router's storage (Ray Train run + final weights + router.json)."""
        return storage.join(self.router, router_id)

    @property
    def mixtures(self) -> str:
        """Evaluated mixtures (and the comparison table)."""
        return storage.join(self.root, "mixtures")

    def mixture_dir(self, mixture_id: str) -> str:
        """One evaluated mixture: ``metrics.json`` and its sample grid."""
        return storage.join(self.mixtures, mixture_id)

    @property
    def velocity_error(self) -> str:
        """Per-t velocity-error curves of the experts (``evaluation/velocity_error.py``)."""
        return storage.join(self.mixtures, "velocity_error")

    @property
    def sweeps(self) -> str:
        """Sweeps of objective assignments (the Ray Tune storage path)."""
        return storage.join(self.root, "sweeps")

    def sweep_dir(self, name: str) -> str:
        """One sweep: its Tune experiment, ranking, plot and ``best_mixture.json``."""
        return storage.join(self.sweeps, name)

    @property
    def evaluation(self) -> str:
        """Caches shared by every evaluation of the campaign."""
        return storage.join(self.root, "evaluation")

    @property
    def reference_stats(self) -> str:
        """Cached FID reference statistics, keyed by data hash and extractor."""
        return storage.join(self.evaluation, "reference_stats")

    @property
    def reference_clip(self) -> str:
        """The demo's own reference CLIP (weights + ``reference_clip.json``)."""
        return storage.join(self.evaluation, "reference_clip")

    def local(self) -> str:
        """The root as an absolute local path (raises for object-store roots)."""
        if storage.is_uri(self.root):
            raise ValueError(f"root={self.root!r} is not a local path")
        return storage.resolve(self.root)[1]  # absolute, a file:// scheme stripped


# -------------------------------------------------------------------------------- the manifest


def load_manifest(cfg: CampaignConfig) -> dict[str, Any]:
    """The clustering manifest; one line naming the fix when the corpus was not prepared."""
    paths = CampaignPaths(cfg.root)
    if not storage.exists(paths.manifest):
        raise CampaignError(
            f"no clusters at {paths.clusters}: run `python jobs/prepare_corpus.py root={cfg.root}` first"
        )
    try:
        manifest = storage.read_json(paths.manifest)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("clusters"), list):
            raise ValueError("not a manifest (no clusters list)")
        k = int(manifest.get("k", -1))
    except (ValueError, TypeError, OSError) as exc:
        raise CampaignError(
            f"{paths.manifest} is corrupt ({str(exc).splitlines()[0][:120]}): run "
            f"`python jobs/prepare_corpus.py root={cfg.root}` (it prepares the corpus again)"
        ) from None
    if k != cfg.clustering.k:
        raise CampaignError(
            f"clustering.k={cfg.clustering.k} but {paths.manifest} has k={manifest.get('k')}: "
            "re-run prepare_corpus with --force or fix clustering.k"
        )
    _check_latents(cfg, manifest, paths.manifest)
    return manifest


def _check_latents(cfg: CampaignConfig, manifest: dict[str, Any], where: str) -> None:
    """Never mix: the campaign's ``latents`` settings must be the prepared corpus's."""
    from hdd_ray.latents import config_settings, describe_vae, settings_of

    try:  # the VAE's content, scaling, shift and dtype: never its path
        want = config_settings(cfg)
    except ConfigError as exc:
        raise CampaignError(str(exc)) from None
    have = settings_of(manifest.get("latents"))
    if want != have:
        now = f"latents.vae={cfg.latents.vae!r}" if want else "latents.vae=None (pixel space)"
        raise CampaignError(
            f"{now} but {where} was prepared in {describe_vae(manifest.get('latents'))}"
            f"{' with other latents settings' if want and have else ''}: re-run "
            "prepare_corpus with --force, or set latents back")


def cluster_info(manifest: dict[str, Any], cluster: int) -> dict[str, Any]:
    """The manifest's entry of one cluster: ``count``, ``hash`` (of its data), ``shards``."""
    for entry in manifest.get("clusters", []):
        if int(entry["cluster"]) == cluster:
            return entry
    return {"cluster": cluster, "count": 0, "hash": "", "shards": []}


def cluster_shards(cfg: CampaignConfig, manifest: dict[str, Any], cluster: int) -> list[str]:
    """Full paths of a cluster's training shards."""
    clusters_dir = CampaignPaths(cfg.root).clusters
    return [storage.join(clusters_dir, s) for s in cluster_info(manifest, cluster)["shards"]]


def heldout_shards(cfg: CampaignConfig, manifest: dict[str, Any] | None = None) -> list[str]:
    """Full paths of the held-out evaluation split's shards."""
    manifest = manifest or load_manifest(cfg)
    clusters_dir = CampaignPaths(cfg.root).clusters
    return [storage.join(clusters_dir, s) for s in manifest.get("heldout", {}).get("shards", [])]


# ------------------------------------------------------------------------- identities and ids


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
    """``train`` without the keys of :data:`LATER_TRAIN_DEFAULTS` left at those values: what a
    recipe recorded before the keys existed (an id, a sweep's description) compares equal to."""
    return {k: v for k, v in train.items()
            if not (k in LATER_TRAIN_DEFAULTS and v == LATER_TRAIN_DEFAULTS[k])}


def _identity_train(train: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in without_later_defaults(train).items()
            if k not in NON_IDENTITY_TRAIN_KEYS}


#: content hashes of local files, keyed by (absolute path, inode, size, mtime_ns, ctime_ns):
#: ids are computed many times per launch, a large weights file is read once per process.
#: ctime cannot be set back (``cp -p`` and ``os.utime`` keep the mtime, not the ctime)
_CONTENT_HASHES: dict[tuple[str, int, int, int, int], str] = {}


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes (a local path or a URI), read in 8 MiB blocks."""
    fs, inner = storage.resolve(path)
    h = hashlib.sha256()
    with fs.open_input_stream(inner) as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def content_identity(value: str | None) -> Any:
    """What a weights or config reference contributes to an identity: the SHA-256 of a local
    file's (or a local folder's) content, so a file replaced under the same name changes the
    id and a moved one does not; a tag or a URI as given (``None`` stays ``None``)."""
    if not value or storage.is_uri(str(value)) or not os.path.exists(str(value)):
        return value
    path = os.path.abspath(str(value))
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, n) for d, _, names in os.walk(path) for n in names)
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        key = (f, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key not in _CONTENT_HASHES:
            _CONTENT_HASHES[key] = file_sha256(f)
        h.update(f"{os.path.relpath(f, path)}\t{_CONTENT_HASHES[key]}\n".encode())
    return {"sha256": h.hexdigest()}


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


def expert_identity(cfg: CampaignConfig, expert: ResolvedExpert,
                    manifest: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the expert's weights (resources excluded).

    The data hash is its own cluster's, so re-clustering that leaves a cluster unchanged keeps
    its expert. Local pretrained files (the open_clip text tower's weights or config) count by
    content. Precision counts as applied: ``"precision": "bf16"`` is added only when bf16
    autocast really runs (GPUs asked for), so CPU ids are those of earlier releases.

    World size is not part of it, by design: ``train.batch_size`` is the **global** batch of a
    micro-step, split evenly over the run's workers
    (:func:`hdd_ray.training.loop.rank_batch_size`), so 1 worker and 4 workers train the same
    recipe (same global batch, learning rate and steps); only the random streams and float
    summation order differ (ARCHITECTURE.md, "Batch size"). A partial run may therefore resume
    under another world size.
    """
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
    identity.update(_latent_identity(manifest))
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


def router_identity(cfg: CampaignConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """What determines the router's weights (precision as applied, as for experts)."""
    train = to_dict(cfg.router.train)
    identity = {"model": cfg.router.model, "train": _identity_train(train),
                "k": cfg.clustering.k, "data_hash": str(manifest["data_hash"]),
                "image_size": cfg.corpus.image_size, "channels": cfg.corpus.channels}
    if applied_precision(train, to_dict(cfg.router.resources)) == "bf16":
        identity["precision"] = "bf16"
    identity.update(_latent_identity(manifest))
    return identity


def router_id(cfg: CampaignConfig, manifest: dict[str, Any]) -> str:
    """Deterministic id of the campaign's router."""
    return "router-" + short_hash(router_identity(cfg, manifest))


# ----------------------------------------------------------------------- objective assignments


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


# ------------------------------------------------------------------- finished experts, router


def check_existing(directory: str, identity: dict[str, Any], json_name: str) -> str:
    """``"finished"``, ``"partial"`` (checkpoints only), ``"missing"`` or ``"corrupt"``.

    :func:`existing_state` with the reason dropped. Raises :class:`ExpertRejected` when
    ``json_name`` describes a different model, or is corrupt without a run of its own here.
    """
    return existing_state(directory, identity, json_name)[0]


def existing_state(directory: str, identity: dict[str, Any], json_name: str) -> tuple[str, str]:
    """``(state, reason)`` of a run directory (an expert's or the router's).

    ``finished``: the JSON parses, holds what reuse needs, describes this identity, and the
    weights match the JSON's ``weights_sha256`` (an older export without one: the safetensors
    file is whole). ``corrupt`` (``reason`` says why, in one line): the JSON or the weights are
    damaged, but the directory holds a run of its own (``checkpoint_*``: Ray Train's, or the
    task executor's ``checkpoint_task``): the launcher trains it again (resuming from the last
    checkpoint). ``partial``:
    checkpoints only; ``missing``: nothing usable.

    Raises :class:`ExpertRejected` (one line) when the JSON describes another identity, or
    when a damaged expert has no run here (a contributed expert is never repaired silently).
    """
    desc_path = storage.join(directory, json_name)
    own_run = any(n.startswith("checkpoint_") for n in storage.listdir(directory))
    if storage.exists(desc_path) and storage.exists(storage.join(directory, WEIGHTS)):
        desc, problem = read_description(desc_path)
        if desc is not None:
            _check_same_vae(directory, desc.get("identity", {}), identity)
            diffs = [f"{k}: {desc.get('identity', {}).get(k)!r} here vs {v!r} in the campaign"
                     for k, v in identity.items() if desc.get("identity", {}).get(k) != v]
            if diffs:
                raise ExpertRejected(
                    f"{directory} does not match the campaign ({'; '.join(diffs[:3])})")
            problem = weights_problem(directory, desc, json_name)
        if not problem:
            return "finished", ""
        if not own_run:
            raise ExpertRejected(f"{directory}: {problem}; rejected (a contributed run is never "
                                 "repaired: train it again or remove it)")
        return "corrupt", f"{problem}: training again"
    if own_run:
        return "partial", ""
    return "missing", ""


def _check_same_vae(directory: str, theirs: Any, ours: dict[str, Any]) -> None:
    """A run trained against another VAE (or in the other space) is rejected in one line."""
    if not isinstance(theirs, dict) or theirs.get("latents") == ours.get("latents"):
        return

    def name(ident: Any) -> str:
        return f"VAE {ident.get('identity')}" if isinstance(ident, dict) else "pixel space"

    raise ExpertRejected(f"{directory} was trained against {name(theirs.get('latents'))}, the "
                         f"campaign uses {name(ours.get('latents'))}: rejected")


#: what a finished run's JSON must hold to be reused
REQUIRED_KEYS = ("identity", "steps")


def read_description(path: str) -> tuple[dict[str, Any] | None, str]:
    """``(expert.json / router.json as a dict, "")``, or ``(None, one-line reason)`` when it is
    unreadable, not JSON, not an object or lacks a key reuse needs."""
    name = os.path.basename(str(path).rstrip("/"))
    try:
        desc = storage.read_json(path)
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"{name} is unreadable ({str(exc).splitlines()[0][:120]})"
    if not isinstance(desc, dict):
        return None, f"{name} is not a JSON object"
    missing = [k for k in REQUIRED_KEYS if k not in desc]
    if missing:
        return None, f"{name} lacks {', '.join(missing)}"
    if not isinstance(desc["identity"], dict):
        return None, f"{name} has identity of type {type(desc['identity']).__name__}, not an object"
    try:
        int(desc["steps"])
    except (TypeError, ValueError):
        return None, f"{name} has steps={desc['steps']!r}, not a number"
    return desc, ""


def weights_problem(directory: str, desc: dict[str, Any], json_name: str = EXPERT_JSON) -> str:
    """``""`` when ``weights.safetensors`` is what ``desc`` says, else a one-line reason.

    With ``weights_sha256`` (every export since checksums): the file's SHA-256 must equal it
    (:func:`verified_sha256`: hashed once per file version, not on every launch).
    Without (older exports): the safetensors header must parse and the file must be as long
    as the header says (catches truncation and garbage, not a same-length substitution).
    """
    path = storage.join(directory, WEIGHTS)
    expected = desc.get("weights_sha256")
    if expected:
        actual = verified_sha256(directory)
        if actual != expected:
            return (f"{WEIGHTS} checksum mismatch (sha256 {actual[:12]}..., {json_name} records "
                    f"{str(expected)[:12]}...)")
        return ""
    return safetensors_problem(storage.read_bytes(path))


#: a run directory's record of its weights' SHA-256 at a file signature (size, mtime, ...)
VERIFIED_FILE = ".weights_verified.json"
_VERIFIED: dict[tuple[str, tuple], str] = {}
#: a file changed less than this long ago is hashed without caching: a rewrite within the
#: file system's timestamp granularity could keep its size and times ("racy" signatures)
SETTLED_NS = 2_000_000_000


def _file_signature(path: str) -> dict[str, int] | None:
    """What changes when a file is rewritten: size, mtime (and, on local disks, inode and
    ctime, which ``cp -p`` / ``os.utime`` cannot set back); ``None`` without an mtime."""
    fs, inner = storage.resolve(path)
    if not storage.is_uri(path):
        st = os.stat(inner)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
                "ctime_ns": st.st_ctime_ns}
    info = fs.get_file_info(inner)
    if info.mtime_ns is None or info.size is None:
        return None
    return {"size": int(info.size), "mtime_ns": int(info.mtime_ns)}


def verified_sha256(directory: str) -> str:
    """SHA-256 of ``<directory>/weights.safetensors``, read in full once per file version.

    Cached per (path, signature) in this process and in ``<directory>/.weights_verified.json``
    (signature + sha, for later launches); a file whose size or mtime changed is hashed again,
    and one without an mtime (some object stores), or changed within :data:`SETTLED_NS`,
    every time. Writing the record is best effort (a read-only directory is hashed every
    launch).
    """
    path = storage.join(directory, WEIGHTS)
    try:
        sig = _file_signature(path)
    except OSError:
        sig = None
    if sig is None or time.time_ns() - max(sig["mtime_ns"], sig.get("ctime_ns", 0)) < SETTLED_NS:
        return file_sha256(path)
    key = (path, tuple(sorted(sig.items())))
    if key in _VERIFIED:
        return _VERIFIED[key]
    record_path = storage.join(directory, VERIFIED_FILE)
    try:
        record = storage.read_json(record_path) if storage.exists(record_path) else None
    except (OSError, ValueError):
        record = None
    if (isinstance(record, dict) and record.get("signature") == sig
            and isinstance(record.get("sha256"), str)):
        sha = record["sha256"]
    else:
        sha = file_sha256(path)
        try:
            storage.write_json(record_path, {"signature": sig, "sha256": sha})
        except OSError:
            pass
    _VERIFIED[key] = sha
    return sha


def record_verified(directory: str, sha: str) -> None:
    """Write the verified-hash record of weights this process has just written and hashed, so
    that reusing the run later reads nothing in full and writes nothing (best effort)."""
    path = storage.join(directory, WEIGHTS)
    try:
        sig = _file_signature(path)
        if sig is not None:
            storage.write_json(storage.join(directory, VERIFIED_FILE),
                               {"signature": sig, "sha256": sha})
            _VERIFIED[(path, tuple(sorted(sig.items())))] = sha
    except OSError:
        pass


def safetensors_problem(data: bytes) -> str:
    """``""`` for a whole safetensors file, else a one-line reason (header, length)."""
    if len(data) < 8:
        return f"{WEIGHTS} is truncated ({len(data)} bytes)"
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        return f"{WEIGHTS} is truncated or not safetensors (header of {n} bytes, file of {len(data)})"
    try:
        header = json.loads(data[8:8 + n])
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, TypeError, KeyError, AttributeError):
        return f"{WEIGHTS} has an unreadable safetensors header"
    if 8 + n + end != len(data):
        return f"{WEIGHTS} is truncated ({len(data)} bytes, its header says {8 + n + end})"
    return ""


def load_expert(directory: str) -> tuple[ExpertModel, dict[str, Any]]:
    """An exported expert (safetensors + expert.json), checked against its description."""
    from hdd_ray.models.expert import ExpertModel, load_weights

    desc = storage.read_json(storage.join(directory, EXPERT_JSON))
    model = ExpertModel(desc["architecture"], desc["text"], desc["image_size"], desc["channels"])
    load_weights(model, storage.join(directory, WEIGHTS), f"expert {desc['expert_id']}",
                 sha256=desc.get("weights_sha256"))  # in full: never the verified cache
    return model.eval(), desc


def load_router(cfg: CampaignConfig, manifest: dict[str, Any] | None = None) -> RouterModel:
    """The campaign's trained router (one line naming the fix when it is missing)."""
    from hdd_ray.models.expert import RouterModel, load_weights

    manifest = manifest or load_manifest(cfg)
    rid = router_id(cfg, manifest)
    directory = CampaignPaths(cfg.root).router_dir(rid)
    if not storage.exists(storage.join(directory, ROUTER_JSON)):
        raise CampaignError(f"router {rid} not trained yet: run `python jobs/train_all_experts.py root={cfg.root}`")
    size, channels = model_shape(cfg, manifest)
    model = RouterModel(cfg.router.model, size, channels, cfg.clustering.k)
    load_weights(model, storage.join(directory, WEIGHTS), f"router {rid}")
    return model.eval()


__all__ = [
    "EXPERT_JSON", "NON_IDENTITY_TRAIN_KEYS", "REQUIRED_KEYS",
    "ROUTER_JSON", "WEIGHTS", "CampaignPaths", "applied_precision", "campaign_assignments",
    "check_existing", "cluster_info", "cluster_shards", "content_identity", "existing_state",
    "expert_id", "expert_identity", "file_sha256", "read_description",
    "safetensors_problem", "verified_sha256", "weights_problem", "heldout_shards", "load_expert",
    "load_manifest", "load_router", "model_shape", "router_id", "router_identity",
    "short_hash", "with_assignment",
]
