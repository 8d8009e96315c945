"""Where each expert (and the router) starts, resolved: the checkpoint read once (its format, its
content hash, the network it holds), the network the expert then trains, what of it enters the
expert's identity, and the one-line check of every start before Ray takes resources.

An expert's start is part of what it is: a different init is a different expert, so its
format and content hash (never its path) enter the expert's identity, with the mode
(``experts.init_mode``), the AdaLN variant and the network when they differ from a scratch
expert's (scratch ids are those of earlier releases).

**The network an expert trains** (:func:`resolve_network`): a ``ddpm_eps`` expert's network
predicts ``eps`` on its own schedule, reading time as its checkpoint does (a DiT's integer
step); a checkpoint on another schedule starts it with one warning line (the start is then not
exact). A ``fm_velocity`` expert in ``exact`` mode keeps its checkpoint's network (``eps`` on
the linear schedule for a DiT or PixArt) and is trained through the conversion, with the
sampling conversion's settings, which then enter its identity; in ``paper`` mode it is a
velocity network fed ``round(999 t)`` with a fresh head. ``experts.network`` overrides ``auto``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hdd_ray import storage
from hdd_ray.campaign.artifacts import file_sha256
from hdd_ray.config import to_dict
from hdd_ray.diffusion.networks import NetworkSpec
from hdd_ray.errors import ConfigError, WeightsMismatch

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig, ResolvedExpert

log = logging.getLogger(__name__)

__all__ = ["ExpertStart", "check_starts", "describe_init", "describe_router_init",
           "expert_start", "resolve_network", "start_identity", "weights_sha256"]


@dataclass(frozen=True)
class ExpertStart:
    """What an expert starts from and the network it trains."""

    init: dict[str, Any] | None  # {"path", "format", "sha256"}; None: from scratch
    mode: str
    adaln: str
    network: NetworkSpec
    # sampling.conversion, where the loss reads a VP network as a velocity (else None)
    conversion: dict[str, Any] | None = None


#: described checkpoints by (path, file signature): a large file is read once per process
_DESCRIBED: dict[tuple[str, Any], dict[str, Any]] = {}
_WARNED: set[tuple[str, ...]] = set()


def _signature(path: str) -> Any:
    if storage.is_uri(path):
        fs, inner = storage.resolve(path)
        info = fs.get_file_info(inner)
        return (info.size, info.mtime_ns)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, n) for d, _, names in os.walk(path) for n in names)
    return tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns, os.stat(f).st_ctime_ns)
                 for f in files)


_HASHES: dict[tuple[str, Any], str] = {}


def weights_sha256(path: str) -> str:
    """SHA-256 of a checkpoint's weights file (a folder's ``weights.safetensors`` or
    ``diffusion_pytorch_model.*``), as ``sha256sum`` prints it; read once per file version."""
    from hdd_ray.models.pretrained import weights_file

    try:
        path = weights_file(path)
    except WeightsMismatch:
        pass
    key = (path, _signature(path))
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def describe_init(key: str, path: str) -> dict[str, Any]:
    """``{"path", "format", "sha256", "adaln", "network", "state"}`` of the checkpoint at
    ``path`` (``state``: its tensors on the ``meta`` device, shapes only). Cached per file
    version. One-line :class:`ConfigError` naming ``key`` on a bad file."""
    from hdd_ray.models.pretrained import read_checkpoint

    path = path if storage.is_uri(path) else os.path.abspath(os.path.expanduser(path))
    try:
        cache_key = (path, _signature(path))
    except OSError as exc:
        raise ConfigError(f"{key}={path!r}: unreadable ({exc})") from None
    if cache_key not in _DESCRIBED:
        try:
            ckpt = read_checkpoint(path, meta=True)
        except WeightsMismatch as exc:
            raise ConfigError(f"{key}={path!r}: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{key}={path!r}: unreadable ({exc})") from None
        _DESCRIBED[cache_key] = {
            "path": path, "format": ckpt.format, "sha256": weights_sha256(ckpt.weights_file),
            "adaln": ckpt.adaln, "network": ckpt.network, "state": ckpt.state}
    return _DESCRIBED[cache_key]


def _warn_once(key: tuple[str, ...], message: str, *args: Any) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message, *args)


def resolve_network(expert: ResolvedExpert, held: NetworkSpec | None, key: str = "experts.init",
                    has_init: bool | None = None) -> NetworkSpec:
    """The network ``expert`` trains, given the network its checkpoint holds (``held``;
    ``None`` from scratch or for an hdd_ray file without its ``expert.json``)."""
    has_init = expert.init is not None if has_init is None else has_init
    asked = (expert.network or {}).get("parameterization", "auto")
    asked_schedule = (expert.network or {}).get("schedule")
    if expert.objective == "ddpm_eps":
        if not has_init or held is None or not held.is_vp:
            return NetworkSpec("eps", expert.schedule, "native")
        if (held.parameterization, held.schedule) != ("eps", expert.schedule):
            _warn_once(("schedule", str(expert.init), str(expert.cluster)),
                       "expert %d: its checkpoint predicts %s on the %s schedule, the expert "
                       "trains eps on %s: it starts from those weights, not exactly",
                       expert.cluster, held.parameterization, held.schedule, expert.schedule)
        return NetworkSpec("eps", expert.schedule, held.time)
    if has_init and expert.init_mode == "paper":
        return NetworkSpec("velocity", None, "paper")
    if asked == "auto":
        if not has_init:
            return NetworkSpec()
        if held is None:
            raise ConfigError(f"{key}={expert.init!r}: an hdd_ray weights file without its "
                              "expert.json: its network is unknown; point at the expert's "
                              "folder or set experts.network.parameterization")
        return held
    if asked == "velocity":
        return NetworkSpec("velocity", None,
                           held.time if held is not None and not held.is_vp else "native")
    schedule = asked_schedule or (held.schedule if held is not None and held.is_vp
                                  else None) or expert.schedule or "linear"
    time = held.time if held is not None and held.is_vp and held.schedule == schedule \
        else "native"
    return NetworkSpec(asked, schedule, time)


def expert_start(cfg: CampaignConfig, expert: ResolvedExpert) -> ExpertStart:
    """The resolved start of ``expert`` (reads its checkpoint once per process)."""
    key = "experts.init"
    if expert.init is None:
        return ExpertStart(None, expert.init_mode, expert.adaln, resolve_network(expert, None))
    info = describe_init(key, expert.init)
    network = resolve_network(expert, info["network"], key)
    conversion = (to_dict(cfg.sampling.conversion)
                  if expert.objective == "fm_velocity" and network.is_vp else None)
    init = {k: info[k] for k in ("path", "format", "sha256")}
    return ExpertStart(init, expert.init_mode, expert.adaln, network, conversion)


def start_identity(start: ExpertStart, expert: ResolvedExpert) -> dict[str, Any]:
    """What the start adds to an expert's identity: nothing for a scratch expert of the
    objective's own network and AdaLN-Single (its id is unchanged); else the init's format
    and content hash (not its path), the mode, the variant, the network and, when the loss
    converts, the conversion's settings."""
    out: dict[str, Any] = {}
    if start.init is not None:
        out["init"] = {"format": start.init["format"], "sha256": start.init["sha256"]}
        out["init_mode"] = start.mode
    if start.adaln != "single":
        out["adaln"] = start.adaln
    if start.network != NetworkSpec.native(expert.objective, expert.schedule):
        out["network"] = start.network.as_dict()
    if start.conversion is not None:
        out["conversion"] = start.conversion
    return out


def describe_router_init(path: str) -> str:
    """The content hash of ``router.init`` (a finished router's weights file)."""
    from hdd_ray.models.pretrained import router_weights

    try:
        weights = router_weights(path)
    except WeightsMismatch as exc:
        raise ConfigError(f"router.init={path!r}: {exc}") from None
    return weights_sha256(weights)


def _meta_net(cfg: CampaignConfig, expert: ResolvedExpert, size: int, channels: int) -> Any:
    import torch

    from hdd_ray.models.adaln_zero import build_expert_dit

    text_dim = int(expert.text.get("dim") or 1) if expert.text.get("encoder") == "learned" else 1
    with torch.device("meta"):
        return build_expert_dit(expert.model, size, channels, text_dim, expert.adaln)


def check_starts(cfg: CampaignConfig, experts: list[ResolvedExpert], size: int,
                 channels: int) -> None:
    """Every expert's checkpoint read (shapes only) and fitted to its DiT of input ``size`` and
    ``channels``, and ``router.init`` to the router: one-line :class:`ConfigError` naming the
    config key and the first mismatched weight (both shapes) before Ray takes resources."""
    from hdd_ray.models.pretrained import Checkpoint, fit_state

    for e in experts:
        if e.init is None:
            continue
        start = expert_start(cfg, e)
        info = describe_init("experts.init", e.init)
        ckpt = Checkpoint(info["path"], info["format"], info["state"], info["adaln"],
                          info["network"])
        expected = _meta_net(cfg, e, size, channels).state_dict()
        try:
            fit_state(ckpt, expected, e.adaln, start.mode, e.model)
        except WeightsMismatch as exc:
            raise ConfigError(f"experts.init={e.init!r} (expert {e.cluster}, {e.model}, "
                              f"experts.adaln={e.adaln}): {exc}") from None
    if cfg.router.init:
        _check_router_init(cfg, size, channels)


def _check_router_init(cfg: CampaignConfig, size: int, channels: int) -> None:
    import torch

    from hdd_ray.models.expert import RouterModel
    from hdd_ray.models.pretrained import read_state, router_weights

    key = f"router.init={cfg.router.init!r}"
    try:
        state, _ = read_state(router_weights(cfg.router.init), meta=True)
    except WeightsMismatch as exc:
        raise ConfigError(f"{key}: {exc}") from None
    with torch.device("meta"):
        want = RouterModel(cfg.router.model, size, channels, cfg.clustering.k).state_dict()
    for name, tensor in want.items():
        if name not in state:
            raise ConfigError(f"{key}: not a {cfg.router.model} router of {cfg.clustering.k} "
                              f"clusters (no {name})")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ConfigError(f"{key}: {name} has shape {list(state[name].shape)}, "
                              f"{cfg.router.model} needs {list(tensor.shape)}")
    extra = sorted(set(state) - set(want))
    if extra:
        raise ConfigError(f"{key}: {extra[0]} has no place in {cfg.router.model}")
