"""Latent space: experts and the router train on VAE latents; mixtures decode what they sample.

``latents.vae`` names a local folder of a diffusers ``AutoencoderKL`` (sd-vae-ft-mse, the SDXL
VAE, a 16-channel SD3/FLUX-style VAE; ``latents.subfolder`` for a pipeline folder's ``vae/``).
Nothing is downloaded. With ``latents.vae=null`` (the default) everything stays in pixel space
and :func:`to_pixels` is the identity.

* **Encode once.** The prepare stage's embed pass (Ray Data actor pool, GPU actors when
  ``clustering.gpus_per_actor`` asks) encodes each image, in batches, to the posterior mean
  ``z``, stores ``(z - shift_factor) * scaling_factor`` (float16, or bfloat16-rounded) in a
  ``latent.npy`` member per sample (:func:`encode_member`); the shards hold no image.
* **Identity.** A VAE is identified by the sha256 of every file of its folder (config and
  weights: :attr:`VaeInfo.sha256`); the manifest records it with the latent shape and the
  scaling and shift, experts and the router hash it into their ids, and nothing mixes latents of
  two VAEs (:func:`check_same_vae`).
* **Decode.** :func:`to_pixels` unscales (``x / scaling_factor + shift_factor``) and decodes
  through the VAE in batches on the device of its input, returning images in [-1, 1].
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hdd_ray.errors import ConfigError, HddRayError, MixtureError

if TYPE_CHECKING:
    from torch import Tensor

    from hdd_ray.config import CampaignConfig

__all__ = [
    "IDENTITY_KEYS",
    "LATENT_MEMBER",
    "SETTINGS_KEYS",
    "Vae",
    "VaeInfo",
    "check_same_vae",
    "decode_member",
    "encode_member",
    "latent_record",
    "load_vae",
    "to_pixels",
    "vae_info",
]

log = logging.getLogger(__name__)

#: the shard member holding one sample's scaled latent (``np.save`` of float16 ``[C, h, w]``)
LATENT_MEMBER = "latent.npy"
VAE_CLASS = "AutoencoderKL"
DTYPES = ("float16", "bfloat16")
_DEFAULT_SCALING = 0.18215  # diffusers' AutoencoderKL default (sd-vae)
_DECODE_BATCH = 32

_INFO_CACHE: dict[tuple, VaeInfo] = {}
_VAE_CACHE: dict[tuple[str, str], Vae] = {}


# --------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class VaeInfo:
    """What a VAE folder is, read from its files (the weights are hashed, not loaded)."""

    path: str  # absolute folder (with the subfolder)
    root: str  # ``latents.vae`` as an absolute path
    subfolder: str | None
    sha256: str  # of every file of the folder, in name order: config + weights
    in_channels: int
    latent_channels: int
    factor: int  # spatial downsampling: 2 ** (down blocks - 1)
    scaling_factor: float
    shift_factor: float
    dtype: str  # storage dtype of the latents

    @property
    def identity(self) -> str:
        """The short form of :attr:`sha256` used in ids and one-line errors."""
        return self.sha256[:16]

    def shape(self, image_size: int) -> list[int]:
        """The latent shape ``[C, h, w]`` of a ``image_size``² image."""
        s = image_size // self.factor
        return [self.latent_channels, s, s]


def _files_signature(folder: str) -> tuple:
    """``(name, size, mtime, inode, ctime)`` per file: what changes when one is rewritten
    (``cp -p`` / ``os.utime`` can set the mtime back, not the ctime)."""
    out = []
    for n in os.listdir(folder):
        path = os.path.join(folder, n)
        if os.path.isfile(path):
            st = os.stat(path)
            out.append((n, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))
    return tuple(sorted(out))


def vae_info(latents: Any, image_size: int | None = None, channels: int | None = None) -> VaeInfo:
    """Read and check the VAE folder of a ``latents`` config section (one line on a problem).

    Raises :class:`ConfigError` when ``latents.vae`` is missing, is not a diffusers
    ``AutoencoderKL`` folder, does not take ``channels`` image channels, or ``image_size`` is not
    divisible by its downsampling factor. The sha256 is cached per file sizes and mtimes.
    """
    if not latents.vae:
        raise ConfigError("latents.vae=None: no VAE configured (pixel space)")
    import importlib.util

    if importlib.util.find_spec("diffusers") is None:
        raise ConfigError(f"latents.vae={latents.vae!r} needs the diffusers package: "
                          "pip install 'hdd_ray[latents]'")
    root = os.path.abspath(os.path.expanduser(str(latents.vae)))
    folder = os.path.join(root, latents.subfolder) if latents.subfolder else root
    where = f"latents.vae={latents.vae!r}" + (f" (subfolder {latents.subfolder!r})"
                                              if latents.subfolder else "")
    if not os.path.isdir(folder):
        raise ConfigError(f"{where}: no such folder (a local diffusers AutoencoderKL folder; "
                          "nothing is downloaded)")
    config_path = os.path.join(folder, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        raise ConfigError(f"{where}: no readable config.json: not a diffusers {VAE_CLASS} "
                          "folder") from None
    if not isinstance(config, dict) or config.get("_class_name") != VAE_CLASS:
        cls = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise ConfigError(f"{where}: its config.json describes {cls!r}, not a diffusers "
                          f"{VAE_CLASS}")
    if not any(n.startswith("diffusion_pytorch_model") for n in os.listdir(folder)):
        raise ConfigError(f"{where}: no diffusion_pytorch_model.* weights in {folder}")
    key = (folder, _files_signature(folder), latents.scaling_factor, latents.shift_factor,
           latents.dtype)
    info = _INFO_CACHE.get(key)
    if info is None:
        h = hashlib.sha256()
        for name, *_ in key[1]:
            h.update(name.encode() + b"\x00")
            with open(os.path.join(folder, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
        scaling = latents.scaling_factor
        if scaling is None:
            scaling = config.get("scaling_factor") or _DEFAULT_SCALING
        shift = latents.shift_factor
        if shift is None:
            shift = config.get("shift_factor") or 0.0
        info = VaeInfo(
            path=folder, root=root, subfolder=latents.subfolder, sha256=h.hexdigest(),
            in_channels=int(config.get("in_channels", 3)),
            latent_channels=int(config.get("latent_channels", 4)),
            factor=2 ** (len(config.get("block_out_channels", [64])) - 1),
            scaling_factor=float(scaling), shift_factor=float(shift), dtype=str(latents.dtype),
        )
        _INFO_CACHE[key] = info
    if channels is not None and channels != info.in_channels:
        raise ConfigError(f"corpus.channels={channels}: the VAE at {where} takes "
                          f"{info.in_channels} channels; set corpus.channels={info.in_channels}")
    if image_size is not None and image_size % info.factor:
        raise ConfigError(f"corpus.image_size={image_size}: not divisible by the VAE's "
                          f"downsampling factor {info.factor} ({where})")
    return info


def latent_record(info: VaeInfo, image_size: int) -> dict[str, Any]:
    """The manifest's ``latents`` record (also the training loop's ``latents`` config)."""
    return {
        "vae": info.root, "subfolder": info.subfolder, "sha256": info.sha256,
        "identity": info.identity, "shape": info.shape(image_size), "factor": info.factor,
        "scaling_factor": info.scaling_factor, "shift_factor": info.shift_factor,
        "dtype": info.dtype, "image_size": image_size, "member": LATENT_MEMBER,
    }


#: what of a ``latents`` record determines a model's weights (not where the VAE lies)
IDENTITY_KEYS = ("identity", "shape", "scaling_factor", "shift_factor", "dtype")
#: what of a ``latents`` record a campaign's ``latents`` settings give: the VAE's content
#: (``sha256``), scaling, shift and storage dtype
SETTINGS_KEYS = ("sha256", "scaling_factor", "shift_factor", "dtype")


def identity_of(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """What of a ``latents`` record determines a model's weights (:data:`IDENTITY_KEYS`)."""
    if not record:
        return None
    return {k: record[k] for k in IDENTITY_KEYS}


def config_settings(cfg: CampaignConfig) -> dict[str, Any] | None:
    """The settings (:data:`SETTINGS_KEYS`) of the record ``cfg.latents`` would give: the
    VAE's content, scaling, shift and dtype, not where it lies (None in pixel space).

    Hashes the VAE's files (:func:`vae_info`, cached per file sizes and mtimes), so a moved
    folder or a relative path from another working directory gives the same settings while
    weights replaced in place do not. Raises :class:`ConfigError` when the VAE is unreadable.
    """
    if not cfg.latents.vae:
        return None
    info = vae_info(cfg.latents)
    return {"sha256": info.sha256, "scaling_factor": info.scaling_factor,
            "shift_factor": info.shift_factor, "dtype": info.dtype}


def describe_vae(record: dict[str, Any] | None) -> str:
    """A short readable name of a ``latents`` record: ``VAE <identity> (<folder>)`` (without
    the folder for an identity, which holds none), or pixel space."""
    if not isinstance(record, dict) or not record:
        return "pixel space (no VAE)"
    folder = f" ({record['vae']})" if record.get("vae") else ""
    return f"VAE {record.get('identity')}{folder}"


MIX_MESSAGE = ("cannot mix {first_name} ({first}) with {name} ({other}): experts of one "
               "mixture must share one VAE")


def check_same_vae(named: list[tuple[str, dict[str, Any] | None]],
                   error: type[HddRayError] = MixtureError,
                   keys: tuple[str, ...] = IDENTITY_KEYS, message: str = MIX_MESSAGE) -> None:
    """The one "same VAE" check: refuse (one line, ``error``) what lies in other latent spaces.

    ``named`` is ``(name, its latents record or None)`` per thing: an expert or the router (its
    description's record, or its identity's), the prepared corpus (the manifest's), the
    campaign's settings (:func:`config_settings`). Each is compared with the first on ``keys``
    (:data:`IDENTITY_KEYS` by default, :data:`SETTINGS_KEYS` against a config; never where the
    VAE lies); None (pixel space) matches only pixel space. ``message`` is formatted with
    ``first_name`` and ``name``, ``first`` and ``other`` (their :func:`describe_vae`) and
    ``differs`` (``" with other latents settings"`` when both are latent spaces).
    """
    if not named:
        return
    first_name, first = named[0]
    for name, other in named[1:]:
        if _vae_key(other, keys) != _vae_key(first, keys):
            raise error(message.format(
                first_name=first_name, first=describe_vae(first), name=name,
                other=describe_vae(other),
                differs=" with other latents settings" if first and other else ""))


def _vae_key(record: Any, keys: tuple[str, ...]) -> Any:
    """What :func:`check_same_vae` compares of a record: its ``keys`` (None in pixel space)."""
    if not record:
        return None
    return {k: record.get(k) for k in keys} if isinstance(record, dict) else record


# --------------------------------------------------------------------------- the model


class Vae:
    """A loaded ``AutoencoderKL`` on one device: scaled encode and decode in batches.

    Runs in float32 on the CPU; on a GPU in the storage dtype unless the VAE's config asks to
    upcast (``force_upcast``, e.g. the SDXL VAE, whose fp16 activations overflow).
    """

    def __init__(self, info: VaeInfo, device: Any = "cpu") -> None:
        import torch
        from diffusers import AutoencoderKL

        self.info = info
        self.device = torch.device(device)
        with open(os.path.join(info.path, "config.json"), encoding="utf-8") as f:
            upcast = json.load(f).get("force_upcast", True)
        dtype = torch.float32
        if self.device.type == "cuda" and not upcast:
            dtype = getattr(torch, info.dtype)
        try:
            model = AutoencoderKL.from_pretrained(info.root, subfolder=info.subfolder,
                                                  torch_dtype=dtype)
        except Exception as exc:  # a damaged folder: one line, no traceback
            raise ConfigError(f"latents.vae={info.root!r}: cannot load the {VAE_CLASS} "
                              f"({str(exc).strip().splitlines()[0][:200]})") from None
        self.dtype = dtype
        self.model = model.eval().requires_grad_(False).to(self.device)

    def encode(self, images: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` in [-1, 1] -> scaled latents ``[B, c, h, w]`` float32.

        The posterior mean (deterministic: the same image always gives the same latent).
        """
        import torch

        with torch.inference_mode():
            z = self.model.encode(images.to(self.device, self.dtype)).latent_dist.mean
        return ((z.float() - self.info.shift_factor) * self.info.scaling_factor)

    def decode(self, latents: Tensor, batch_size: int = _DECODE_BATCH) -> Tensor:
        """Scaled latents ``[B, c, h, w]`` -> images ``[B, C, H, W]`` in [-1, 1] (float32, on
        the latents' device), decoded ``batch_size`` at a time on this VAE's device."""
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, latents.shape[0], batch_size):
                z = latents[start:start + batch_size].float()
                z = z / self.info.scaling_factor + self.info.shift_factor
                x = self.model.decode(z.to(self.device, self.dtype)).sample
                out.append(x.float().clamp(-1, 1).to(latents.device))
        if not out:
            c = self.info.in_channels
            s = latents.shape[-1] * self.info.factor
            return latents.new_zeros((0, c, s, s), dtype=torch.float32)
        return torch.cat(out)


def load_vae(info: VaeInfo, device: Any = "cpu") -> Vae:
    """The VAE of ``info`` on ``device`` (loaded once per process and device)."""
    key = (info.sha256 + info.path + str(info.scaling_factor) + str(info.shift_factor),
           str(device))
    if key not in _VAE_CACHE:
        _VAE_CACHE[key] = Vae(info, device)
    return _VAE_CACHE[key]


def to_pixels(cfg: Any, x: Tensor) -> Tensor:
    """Samples in model space ``[B, C, h, w]`` -> images ``[B, C, H, W]`` in [-1, 1].

    The identity in pixel space (``latents.vae`` unset); otherwise unscaled and decoded through
    the campaign's VAE in batches on ``x``'s device (the job's device).
    """
    lat = getattr(cfg, "latents", None)
    if lat is None or not lat.vae:
        return x
    return load_vae(vae_info(lat), x.device).decode(x)


# --------------------------------------------------------------------------- shard members


def encode_member(latent: np.ndarray, dtype: str = "float16") -> bytes:
    """One sample's scaled latent ``[C, h, w]`` -> ``latent.npy`` bytes.

    ``float16`` (the default): stored as float16. ``bfloat16``: rounded to bfloat16 (float32's
    range, for VAEs whose latents overflow float16) and stored as float32, since ``.npy`` has no
    bfloat16; any ``np.load`` reader gets the right values either way.
    """
    arr = np.asarray(latent, np.float32)
    if dtype == "bfloat16":
        bits = arr.view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
        arr = rounded.view(np.float32)
    else:
        arr = arr.astype(np.float16)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def decode_member(data: bytes) -> np.ndarray:
    """``latent.npy`` bytes -> the stored array (float16 or float32)."""
    return np.load(io.BytesIO(data), allow_pickle=False)
