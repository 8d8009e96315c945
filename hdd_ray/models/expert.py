"""The networks that experts and the router train, and how their weights are saved and loaded.

Exported weights are safetensors (never pickles) beside a JSON description; loading rebuilds the
architecture from the JSON and refuses weights whose names or shapes do not match it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from hdd_ray import storage
from hdd_ray.errors import WeightsMismatch
from hdd_ray.models import build_router, build_text_encoder
from hdd_ray.models.adaln_zero import build_expert_dit
from hdd_ray.models.text_features import TextFeatures

log = logging.getLogger(__name__)


class ExpertModel(nn.Module):
    """A DiT with its text encoder: ``forward(x, t, cond)`` with ``cond = {ids, mask[, drop]}``.

    The ``learned`` text encoder is trained with the expert (part of its weights); an
    ``open_clip`` tower is frozen and loaded from its own weights, so it is not exported.
    ``adaln``: the DiT's modulation, ``single`` (PixArt's) or ``zero`` (the original DiT's,
    :mod:`hdd_ray.models.adaln_zero`).
    """

    def __init__(self, model: str, text: dict[str, Any], image_size: int, channels: int,
                 adaln: str = "single") -> None:
        super().__init__()
        kind = text["encoder"]
        if kind == "learned":
            self.text = build_text_encoder(
                "learned", vocab_size=text["vocab_size"], max_len=text["max_len"],
                dim=text["dim"], depth=text["depth"],
            )
        else:
            self.text = build_text_encoder("open_clip", arch=text["arch"], pretrained=text["pretrained"])
        self.text_frozen = kind != "learned"
        self.net = build_expert_dit(model, input_size=image_size, in_channels=channels,
                                    text_dim=self.text.dim, adaln=adaln)
        # E[x0] of the cluster's training data: the conversion's prior near t = 1
        self.register_buffer("data_mean", torch.zeros(channels, image_size, image_size))
        self.has_data_mean = False

    def set_data_mean(self, images: Tensor) -> None:
        """Record the mean image of the training data ``[N, C, H, W]`` (exported with the weights)."""
        mean = images.mean(0)
        if self.data_mean.is_cuda and not mean.is_cuda:  # a stream's, every step: no host wait
            mean = mean.pin_memory()
        self.data_mean.copy_(mean, non_blocking=True)
        self.has_data_mean = True

    def prior_mean(self) -> Tensor | None:
        """The training data's mean ``[C, H, W]``, or ``None`` when unknown (weights exported
        before experts carried it): the conversion then holds its edge estimate near t = 1."""
        return self.data_mean if self.has_data_mean else None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # the one optional key: files and checkpoints from before experts carried their data
        # mean load without it (the mean stays as it is: unknown, or set by the training task)
        key = prefix + "data_mean"
        present = key in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if present:
            self.has_data_mean = True
        elif key in missing_keys:
            missing_keys.remove(key)

    def tokenize(self, captions: list[str] | TextFeatures,
                 device: torch.device | str | None = None) -> dict[str, Tensor]:
        """Captions -> ``{"ids", "mask"}`` for :meth:`forward`; a frozen tower's stored features
        of them (:class:`hdd_ray.models.text_features.TextFeatures`) -> ``{"tokens", "mask"}``, so the
        tower does not run."""
        if isinstance(captions, TextFeatures):
            if not self.text_frozen or captions.tokens.shape[-1] != self.text.dim:
                raise ValueError(f"stored text features of width {captions.tokens.shape[-1]} "
                                 f"for a {'frozen' if self.text_frozen else 'learned'} text "
                                 f"encoder of width {self.text.dim}")
            feats = captions
            if device is not None:
                if torch.device(device).type == "cuda" and not feats.tokens.is_pinned():
                    feats = feats.pin_memory()
                feats = feats.to(device, non_blocking=True)
            return {"tokens": feats.tokens, "mask": feats.mask}
        tok = self.text.tokenizer(list(captions))
        ids, mask = tok if isinstance(tok, tuple) else (tok, tok != 0)
        if device is None:
            return {"ids": ids, "mask": mask}
        if torch.device(device).type == "cuda":  # pinned: a copy that does not block the host
            ids, mask = ids.pin_memory(), mask.pin_memory()
        return {"ids": ids.to(device, non_blocking=True), "mask": mask.to(device, non_blocking=True)}

    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Caption token features (precompute them once when sampling many steps)."""
        if self.text_frozen:
            with torch.no_grad():
                return self.text(ids)
        return self.text(ids, mask)

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Native prediction at network time ``t`` (see ``diffusion.objectives``).

        ``cond`` holds ``ids`` + ``mask`` (and optionally ``drop``), or precomputed ``tokens``
        + ``mask`` from :meth:`encode_text`.
        """
        mask = cond["mask"]
        tokens = cond.get("tokens")
        if tokens is None:
            tokens = self.encode_text(cond["ids"], mask)
        inner = {"tokens": tokens.to(x.dtype) if not torch.is_autocast_enabled() else tokens, "mask": mask}
        if "drop" in cond:
            inner["drop"] = cond["drop"]
        return self.net(x, t, inner)

    def exported_state(self) -> dict[str, Tensor]:
        """The weights an expert file holds (a frozen text tower is left out)."""
        return {
            k: v for k, v in self.state_dict().items()
            if not (self.text_frozen and k.startswith("text."))
        }


class RouterModel(nn.Module):
    """The router ``r(x_t, t) -> logits over K clusters`` (no text)."""

    def __init__(self, model: str, image_size: int, channels: int, num_experts: int) -> None:
        super().__init__()
        self.net = build_router(model, input_size=image_size, in_channels=channels, num_experts=num_experts)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Logits ``[B, K]``; ``t`` is network time (1000 x flow-matching t)."""
        return self.net(x, t)

    def exported_state(self) -> dict[str, Tensor]:
        """All weights."""
        return self.state_dict()


#: weights an older file may lack (exported before experts carried their data mean)
OPTIONAL_KEYS = ("data_mean",)
_warned: set[str] = set()


def _warn_no_data_mean(what: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning("%s: its weights carry no data_mean (exported before experts recorded "
                    "their data's mean); the conversion holds its edge estimate near t = 1",
                    what)


def save_weights(path: str, state: dict[str, Tensor]) -> None:
    """Write a state dict as safetensors (local path or URI; atomic on local disks)."""
    data = save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()})
    storage.write_bytes(path, data)


def load_weights(module: nn.Module, path: str, what: str, sha256: str | None = None) -> None:
    """Load safetensors into ``module``, refusing any name or shape mismatch in one line (and,
    given ``sha256``, bytes whose SHA-256 differs: hashed from the bytes read, no second read)."""
    try:
        data = storage.read_bytes(path)
        if sha256:
            import hashlib

            actual = hashlib.sha256(data).hexdigest()
            if actual != sha256:
                raise ValueError(f"checksum mismatch (sha256 {actual[:12]}..., expected "
                                 f"{sha256[:12]}...)")
        state = load_safetensors(data)
    except Exception as exc:  # truncated / not safetensors / damaged
        raise WeightsMismatch(f"{what}: cannot read weights {path}: {str(exc).splitlines()[0]}") from None
    expected = module.exported_state() if hasattr(module, "exported_state") else module.state_dict()
    missing = sorted(set(expected) - set(state) - set(OPTIONAL_KEYS))
    if "data_mean" in expected and "data_mean" not in state:
        _warn_no_data_mean(what)
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise WeightsMismatch(
            f"{what}: weights do not match the architecture "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise WeightsMismatch(
                f"{what}: weight {k} has shape {list(v.shape)}, the architecture needs "
                f"{list(expected[k].shape)}"
            )
    module.load_state_dict(state, strict=False)
