"""A mixture in one folder: what ``jobs/export_mixture.py`` writes (:func:`write_folder`) and
:meth:`hdd_ray.ensemble.Mixture.from_folder` reads (:func:`read_folder`), with no campaign,
config file or experiment tracker.

Layout (format :data:`FORMAT`)::

    <folder>/
      mixture.json        what the mixture is: spec and sampling settings, image shape, the
                          experts and the router (ids, folders), the latent space and the
                          towers it needs (recorded paths with their content sha256, or the
                          copies' folders), metrics and where it came from
      experts/c<k>/       expert.json (the expert's card) + weights.safetensors, per cluster
      router/             router.json + weights.safetensors
      towers/vae/         with --copy-towers: the VAE folder's files
      towers/text/        with --copy-towers: local text-tower files (weights, open_clip config)
      README.md           the model card
      montage.png         the clusters' montage (when the campaign has one)
      manifest.json       sha256 and size of every other file, written last

**Reading checks everything.** Every file listed in ``manifest.json`` must be there with its
sha256; the weights are checked from the bytes they are loaded from (their card records the
same sha256), so nothing is read twice. A tower kept by reference must be at its recorded path
with the recorded content (a VAE by :attr:`hdd_ray.latents.VaeInfo.sha256`, a text-tower file
by :func:`hdd_ray.campaign.content_identity`). Every problem is one :class:`MixtureError` line
naming the file. An open_clip pretrained *tag* is not a file: it is loaded the way the experts
were trained, from open_clip's cache, and cannot be copied.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hdd_ray import storage
from hdd_ray.campaign import EXPERT_JSON, ROUTER_JSON, WEIGHTS, content_identity, load_expert
from hdd_ray.errors import ConfigError, MixtureError, WeightsMismatch, first_line

if TYPE_CHECKING:
    import torch

    from hdd_ray.config import CampaignConfig
    from hdd_ray.models.expert import ExpertModel, RouterModel

__all__ = ["CARD_FILE", "FORMAT", "MANIFEST_FILE", "MIXTURE_FILE", "MONTAGE_FILE",
           "folder_config", "read_folder", "read_mixture", "write_folder"]

FORMAT = "hdd_ray.mixture/1"
MIXTURE_FILE = "mixture.json"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"
MONTAGE_FILE = "montage.png"
VAE_COPY = "towers/vae"
TEXT_COPIES = "towers/text"
_TEXT_KEYS = ("pretrained", "arch")  # text settings that may name a local file
_BLOCK = 8 << 20


# ------------------------------------------------------------------------------- writing


def write_folder(folder: str, mixture: dict[str, Any], experts: list[str], router: str,
                 copy_towers: bool, card: Callable[[dict[str, Any]], str],
                 montage: bytes | None = None, replace: bool = False) -> dict[str, Any]:
    """Write the mixture folder ``folder`` (local) -> its ``mixture.json``.

    ``mixture`` holds what the campaign says of the mixture (``name``, ``assignment``,
    ``spec``, ``sampling``, ``k``, ``image``, ``metrics``, ``source``, ...); ``experts`` are
    the experts' run directories in cluster order and ``router`` the router's (local or URIs):
    their cards and weights are copied, the weights checked against the sha256 their card
    records. The latent space (the experts' VAE) and local text-tower files are recorded with
    their content hashes, and copied with ``copy_towers``. ``card(mixture.json)`` gives the
    README; the manifest is written last.

    Everything is written to a hidden sibling folder first, renamed to ``folder`` once whole:
    a failed export leaves nothing. ``folder`` must be new or empty, or (``replace``) a mixture
    folder, which is deleted only when its replacement is complete.
    """
    folder = os.path.abspath(folder)
    old = os.path.isdir(folder) and bool(os.listdir(folder))
    if old and not replace:
        raise MixtureError(f"{folder}: exists and is not empty (pass --force to replace an "
                           "exported mixture)")
    if old and not os.path.isfile(os.path.join(folder, MANIFEST_FILE)):
        raise MixtureError(f"{folder}: not a mixture folder (no {MANIFEST_FILE}); refusing to "
                           "replace it")
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.partial-",
                               dir=os.path.dirname(folder))
    try:
        described = _write(partial, mixture, experts, router, copy_towers, card, montage)
        if os.path.isdir(folder):
            shutil.rmtree(folder)  # empty, or the mixture folder it replaces
        os.rename(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return described


def _write(folder: str, mixture: dict[str, Any], experts: list[str], router: str,
           copy_towers: bool, card: Callable[[dict[str, Any]], str],
           montage: bytes | None) -> dict[str, Any]:
    """:func:`write_folder`'s files, into the new folder ``folder``."""
    descs = [storage.read_json(storage.join(d, EXPERT_JSON)) for d in experts]
    router_desc = storage.read_json(storage.join(router, ROUTER_JSON))
    # the towers first: a tag that cannot be copied fails before any weights are
    latents, sums = _vae_tower(folder, router_desc.get("latents"), copy_towers)
    text, text_sums = _text_towers(folder, descs, copy_towers)
    sums.update(text_sums)
    entries = []
    for directory, desc in zip(experts, descs, strict=True):
        rel = f"experts/c{int(desc['cluster'])}"
        sums.update(_copy_run(directory, EXPERT_JSON, desc, folder, rel))
        entries.append({"cluster": int(desc["cluster"]), "expert_id": desc["expert_id"],
                        "objective": desc["objective"], "schedule": desc.get("schedule"),
                        "architecture": desc.get("architecture"),
                        "text_encoder": (desc.get("text") or {}).get("encoder"),
                        "steps": desc.get("steps"), "num_samples": desc.get("num_samples"),
                        "folder": rel})
    sums.update(_copy_run(router, ROUTER_JSON, router_desc, folder, "router"))
    described = {"format": FORMAT, **mixture, "experts": entries,
                 "router": {"router_id": router_desc["router_id"], "folder": "router",
                            "architecture": router_desc.get("architecture")},
                 "latents": latents, "text_towers": text}
    files = {MIXTURE_FILE: json.dumps(described, indent=2).encode(),
             CARD_FILE: card(described).encode()}
    if montage is not None:
        files[MONTAGE_FILE] = montage
    for rel, data in files.items():
        with open(os.path.join(folder, rel), "wb") as f:
            f.write(data)
        sums[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest = {"format": FORMAT, "files": dict(sorted(sums.items()))}
    with open(os.path.join(folder, MANIFEST_FILE), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return described


def _copy(src: str, dst: str) -> dict[str, Any]:
    """Copy ``src`` (a local path or URI) to the local ``dst`` -> its sha256 and size."""
    fs, inner = storage.resolve(src)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    h, size = hashlib.sha256(), 0
    with fs.open_input_stream(inner) as f, open(dst, "wb") as out:
        while block := f.read(_BLOCK):
            h.update(block)
            size += len(block)
            out.write(block)
    return {"sha256": h.hexdigest(), "size": size}


def _copy_run(directory: str, json_name: str, desc: dict[str, Any], folder: str,
              rel: str) -> dict[str, dict[str, Any]]:
    """A run's card and weights into ``folder/rel``; refuses weights whose sha256 is not the
    one the card records (one line naming them)."""
    out = {f"{rel}/{json_name}": _copy(storage.join(directory, json_name),
                                       os.path.join(folder, rel, json_name))}
    weights = _copy(storage.join(directory, WEIGHTS), os.path.join(folder, rel, WEIGHTS))
    recorded = desc.get("weights_sha256")
    if recorded and weights["sha256"] != recorded:
        raise MixtureError(f"{storage.join(directory, WEIGHTS)}: damaged (sha256 "
                           f"{weights['sha256'][:12]}..., its {json_name} records "
                           f"{recorded[:12]}...); train the run again before exporting")
    out[f"{rel}/{WEIGHTS}"] = weights
    return out


def _vae_tower(folder: str, record: dict[str, Any] | None,
               copy: bool) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """The latent space's record for ``mixture.json`` (None in pixel space) and, with
    ``copy``, the VAE's files copied to ``towers/vae`` (the files its sha256 covers)."""
    if not record:
        return None, {}
    from hdd_ray.config import LatentsConfig
    from hdd_ray.latents import vae_info

    try:
        info = vae_info(LatentsConfig(vae=record["vae"], subfolder=record.get("subfolder"),
                                      scaling_factor=record["scaling_factor"],
                                      shift_factor=record["shift_factor"],
                                      dtype=record["dtype"]))
    except ConfigError as exc:
        raise MixtureError(f"the experts' VAE: {exc}") from None
    if info.sha256 != record["sha256"]:
        raise MixtureError(f"the VAE at {info.path} is not the one the experts were trained "
                           f"with (sha256 {info.sha256[:12]}..., recorded "
                           f"{record['sha256'][:12]}...)")
    sums: dict[str, dict[str, Any]] = {}
    if copy:
        for name in sorted(os.listdir(info.path)):
            if os.path.isfile(os.path.join(info.path, name)):
                sums[f"{VAE_COPY}/{name}"] = _copy(os.path.join(info.path, name),
                                                   os.path.join(folder, VAE_COPY, name))
    return {**record, "copy": VAE_COPY if copy else None}, sums


def _text_towers(folder: str, descs: list[dict[str, Any]],
                 copy: bool) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every local file the experts' text settings name (``pretrained`` weights, an open_clip
    config ``.json``): its value, absolute path and content sha256, and with ``copy`` its copy
    under ``towers/text``. A tag with ``copy`` is refused (one line)."""
    from hdd_ray.towers import is_local_path

    towers: dict[str, dict[str, Any]] = {}
    sums = {}
    for desc in descs:
        text = desc.get("text") or {}
        for key in _TEXT_KEYS if text.get("encoder") == "open_clip" else ():
            value = text.get(key)
            if not value or value in towers:
                continue
            local = is_local_path(str(value)) if key == "pretrained" else str(value).endswith(".json")
            if not local:
                if copy and key == "pretrained":
                    raise MixtureError(f"expert {desc['expert_id']}: text.pretrained={value!r} is "
                                       "an open_clip tag, not a file: --copy-towers copies local "
                                       "files only")
                continue
            path = os.path.abspath(os.path.expanduser(str(value)))
            if not os.path.isfile(path):
                raise MixtureError(f"expert {desc['expert_id']}: its text.{key} {value!r} is not "
                                   f"at {path} (export from where the campaign ran)")
            # a numbered folder keeps the file's name (an open_clip config registers by it)
            rel = f"{TEXT_COPIES}/{len(towers)}/{os.path.basename(path)}" if copy else None
            if rel:
                sums[rel] = _copy(path, os.path.join(folder, rel))
            towers[value] = {"value": value, "path": path,
                             "sha256": content_identity(path)["sha256"], "copy": rel}
    return list(towers.values()), sums


# ------------------------------------------------------------------------------- reading


def read_mixture(path: str) -> dict[str, Any]:
    """A mixture folder's ``mixture.json`` (not verified: :func:`read_folder` does that);
    one line when ``path`` is not a mixture folder."""
    folder = _folder(path)
    described = _read_json(folder, MIXTURE_FILE)
    if described.get("format") != FORMAT:
        raise MixtureError(f"{os.path.join(folder, MIXTURE_FILE)}: format "
                           f"{described.get('format')!r}, this version reads {FORMAT!r}")
    return described


def folder_config(path: str, described: dict[str, Any] | None = None) -> CampaignConfig:
    """The campaign settings a mixture folder's :class:`~hdd_ray.ensemble.Mixture` samples
    with: its ``sampling`` section (routing, guidance and steps of the exported mixture), K,
    the image shape, its assignment and the latent space (the VAE's copy or recorded path);
    ``root`` is the folder, tracking is off. One line when ``mixture.json`` does not hold them."""
    from hdd_ray.config import CampaignConfig, ConversionConfig, LatentsConfig, SamplingConfig

    folder = _folder(path)
    m = described or read_mixture(folder)
    try:
        sampling = dict(m["sampling"])
        conversion = ConversionConfig(**sampling.pop("conversion"))
        cfg = CampaignConfig(name=str(m["name"]), root=folder,
                             sampling=SamplingConfig(**sampling, conversion=conversion))
        cfg.clustering.k = int(m["k"])
        cfg.corpus.image_size, cfg.corpus.channels = int(m["image"]["size"]), int(m["image"]["channels"])
        cfg.experts.ddpm_clusters = [int(c) for c in m["spec"]["ddpm_clusters"]]
        cfg.evaluation.num_samples = int(m["spec"]["num_samples"])
        cfg.tracking.enabled = False
        rec = m.get("latents")
        if rec:
            copied = rec.get("copy")
            cfg.latents = LatentsConfig(
                vae=os.path.join(folder, copied) if copied else rec["vae"],
                subfolder=None if copied else rec.get("subfolder"),
                scaling_factor=rec["scaling_factor"], shift_factor=rec["shift_factor"],
                dtype=rec["dtype"])
        cfg.sampling.validate(cfg.clustering.k)
        cfg.latents.validate()
    except (KeyError, TypeError, ValueError) as exc:
        raise MixtureError(f"{os.path.join(folder, MIXTURE_FILE)}: not a mixture this version "
                           f"reads ({first_line(exc)})") from None
    return cfg


def read_folder(path: str, device: str | torch.device = "cpu") -> tuple[
        list[tuple[ExpertModel | None, dict[str, Any]]], RouterModel, CampaignConfig]:
    """Load a mixture folder -> ``(experts with their cards, router, settings)``, the networks
    on ``device``, after checking every file against the manifest and the towers by content
    (module docstring). One entry per cluster: a cluster the mixture leaves out (its spec's
    ``retired``) has no model (``None``) and a card saying so.
    :meth:`~hdd_ray.ensemble.Mixture.from_folder` builds the mixture."""
    from hdd_ray.latents import check_same_vae

    folder = _folder(path)
    files = _verify(folder)
    described = read_mixture(folder)
    cfg = folder_config(folder, described)
    _check_vae(folder, described.get("latents"), cfg)
    text = _usable_text_towers(folder, described.get("text_towers") or [])
    kept = {int(e["cluster"]): e for e in described["experts"]}
    experts: list[tuple[ExpertModel | None, dict[str, Any]]] = []
    try:  # weights that do not load (their checksum, their shapes) are the folder's damage
        for cluster in range(cfg.clustering.k):
            if cluster not in kept:
                experts.append((None, {"cluster": cluster, "retired": True}))
                continue
            rel = kept[cluster]["folder"]
            desc = _read_json(folder, f"{rel}/{EXPERT_JSON}")
            _check_weights(folder, files, rel, desc)
            settings = {k: text.get(v, v) if k in _TEXT_KEYS else v
                        for k, v in (desc.get("text") or {}).items()}
            model, desc = load_expert(os.path.join(folder, rel), text=settings)
            experts.append((model.to(device), desc))
        router = _load_router(folder, files, described["router"]["folder"]).to(device)
    except WeightsMismatch as exc:
        raise MixtureError(str(exc)) from None
    check_same_vae([*((f"expert {d['expert_id']}", d.get("latents"))
                      for m, d in experts if m is not None),
                    ("the folder's VAE", described.get("latents"))])
    return experts, router, cfg


def _folder(path: str) -> str:
    folder = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isdir(folder):
        raise MixtureError(f"{path}: no such mixture folder")
    return folder


def _read_json(folder: str, rel: str) -> dict[str, Any]:
    path = os.path.join(folder, rel)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise MixtureError(f"{path}: missing (not a whole mixture folder; export it with "
                           "jobs/export_mixture.py)") from None
    except (OSError, ValueError) as exc:
        raise MixtureError(f"{path}: unreadable ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise MixtureError(f"{path}: not a JSON object")
    return data


def file_digest(path: str) -> str:
    """SHA-256 of a local file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _verify(folder: str) -> dict[str, dict[str, Any]]:
    """Check every file of the manifest but the weights (checked as they are loaded) ->
    the manifest's files."""
    manifest = _read_json(folder, MANIFEST_FILE)
    files = manifest.get("files")
    if manifest.get("format") != FORMAT or not isinstance(files, dict):
        raise MixtureError(f"{os.path.join(folder, MANIFEST_FILE)}: not a {FORMAT} manifest")
    for rel, record in files.items():
        path = os.path.normpath(os.path.join(folder, rel))
        if os.path.isabs(rel) or not path.startswith(folder + os.sep):
            raise MixtureError(f"{os.path.join(folder, MANIFEST_FILE)}: {rel!r} lies outside "
                               "the folder")
        if not os.path.isfile(path):
            raise MixtureError(f"{path}: missing from the mixture folder")
        if os.path.basename(rel) != WEIGHTS:
            _check_file(path, record)
    return files


def _check_file(path: str, record: dict[str, Any]) -> None:
    actual = file_digest(path)
    if actual != record.get("sha256"):
        raise MixtureError(f"{path}: damaged or changed (sha256 {actual[:12]}..., the manifest "
                           f"records {str(record.get('sha256'))[:12]}...); export the mixture "
                           "again")


def _check_weights(folder: str, files: dict[str, dict[str, Any]], rel: str,
                   desc: dict[str, Any]) -> None:
    """The weights of ``rel``: checked as they load when their card records the manifest's
    sha256 (the card is verified), else hashed here."""
    record = files.get(f"{rel}/{WEIGHTS}")
    if record is None:
        raise MixtureError(f"{os.path.join(folder, MANIFEST_FILE)}: lists no {rel}/{WEIGHTS}")
    if desc.get("weights_sha256") != record.get("sha256"):
        _check_file(os.path.join(folder, rel, WEIGHTS), record)


def _load_router(folder: str, files: dict[str, dict[str, Any]], rel: str) -> RouterModel:
    from hdd_ray.models.expert import RouterModel, load_weights

    desc = _read_json(folder, f"{rel}/{ROUTER_JSON}")
    _check_weights(folder, files, rel, desc)
    model = RouterModel(desc["architecture"], desc["image_size"], desc["channels"], desc["k"])
    load_weights(model, os.path.join(folder, rel, WEIGHTS), f"router {desc['router_id']}",
                 sha256=desc.get("weights_sha256"))
    return model.eval()


def _check_vae(folder: str, record: dict[str, Any] | None, cfg: CampaignConfig) -> None:
    """The VAE the folder samples through is the recorded one (by content), one line if not."""
    if not record:
        return
    from hdd_ray.latents import vae_info

    where = "its copy" if record.get("copy") else "its recorded path"
    try:
        info = vae_info(cfg.latents)
    except ConfigError as exc:
        raise MixtureError(f"mixture folder {folder}: the VAE at {where} is unusable ({exc}); "
                           "export with --copy-towers to carry it") from None
    if info.sha256 != record["sha256"]:
        raise MixtureError(f"mixture folder {folder}: the VAE at {info.path} is not the one "
                           f"it was exported with (sha256 {info.sha256[:12]}..., recorded "
                           f"{record['sha256'][:12]}...)")


def _usable_text_towers(folder: str, towers: list[dict[str, Any]]) -> dict[str, str]:
    """``{value in the experts' text settings: the file to load}``: the folder's copy, or
    the recorded path checked by content (one line when it is missing or another file)."""
    out = {}
    for t in towers:
        path = os.path.join(folder, t["copy"]) if t.get("copy") else t["path"]
        if not t.get("copy"):  # a copy is covered by the manifest
            if not os.path.isfile(path):
                raise MixtureError(f"mixture folder {folder}: text tower {t['value']!r} is not "
                                   f"at its recorded path {path}; export with --copy-towers "
                                   "to carry it")
            if content_identity(path)["sha256"] != t["sha256"]:
                raise MixtureError(f"mixture folder {folder}: {path} is not the text tower it "
                                   "was exported with (another content)")
        out[t["value"]] = path
    return out
