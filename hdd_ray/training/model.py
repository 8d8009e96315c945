"""The networks that experts and the router train, and how their weights are saved and loaded.

Exported weights are safetensors (never pickles) beside a JSON description; loading rebuilds the
architecture from the JSON and refuses weights whose names or shapes do not match it.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from hdd_ray import storage
from hdd_ray.errors import WeightsMismatch
from hdd_ray.models import build_dit, build_router, build_text_encoder


class ExpertModel(nn.Module):
    """A DiT with its text encoder: ``forward(x, t, cond)`` with ``cond = {ids, mask[, drop]}``.

    The ``learned`` text encoder is trained with the expert (part of its weights); an
    ``open_clip`` tower is frozen and loaded from its own weights, so it is not exported.
    """

    def __init__(self, model: str, text: dict[str, Any], image_size: int, channels: int) -> None:
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
        self.net = build_dit(model, input_size=image_size, in_channels=channels, text_dim=self.text.dim)

    def tokenize(self, captions: list[str], device: torch.device | str | None = None) -> dict[str, Tensor]:
        """Captions -> ``{"ids", "mask"}`` for :meth:`forward`."""
        tok = self.text.tokenizer(list(captions))
        ids, mask = tok if isinstance(tok, tuple) else (tok, tok != 0)
        return {"ids": ids.to(device), "mask": mask.to(device)}

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


def save_weights(path: str, state: dict[str, Tensor]) -> None:
    """Write a state dict as safetensors (local path or URI; atomic on local disks)."""
    data = save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()})
    storage.write_bytes(path, data)


def load_weights(module: nn.Module, path: str, what: str) -> None:
    """Load safetensors into ``module``, refusing any name or shape mismatch in one line."""
    try:
        state = load_safetensors(storage.read_bytes(path))
    except Exception as exc:  # truncated / not safetensors
        raise WeightsMismatch(f"{what}: cannot read weights {path}: {str(exc).splitlines()[0]}") from None
    expected = module.exported_state() if hasattr(module, "exported_state") else module.state_dict()
    missing = sorted(set(expected) - set(state))
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
