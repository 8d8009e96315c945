"""A frozen text tower's features, computed once by prepare and stored beside each sample.

When the experts' text tower is frozen (``experts.text.encoder: open_clip`` with its weights),
it is a fixed function of the caption, so running it at every training step repeats work (2 %
of DiT-XL/2's FLOPs, 11 % of DiT-B/2's). Prepare's Ray Data actors run it once per caption, as
they encode latents, and each sample of the cluster shards holds :data:`TEXT_MEMBER`: float16
``[n, width]``, the tower's output at the caption's ``n`` real tokens (start, words, end); the
padding is left out, since the DiT's cross-attention masks it. Training reads them
(:func:`stack_features`: zero-padded to the tower's context length, with the mask of real
tokens) and never runs the tower.

The manifest's ``text_features`` record says which tower made them (``identity``: its
architecture and weights by content) with its ``width`` and ``context_length``; prepare's
fingerprint includes the identity, so a changed tower prepares the shards again, and a training
run whose tower is not the record's is refused (:mod:`hdd_ray.training.jobs`). A tower without
weights (random initialisation, tests) is not the same function in two processes: its features
are not stored and it runs in the loop as before.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["FEATURE_DTYPE", "TEXT_MEMBER", "TextFeatureEncoder", "TextFeatures",
           "decode_features", "encode_features", "stack_features"]

#: the shard member holding a caption's stored features (``np.save`` of float16 ``[n, width]``)
TEXT_MEMBER = "text.npy"
#: their storage dtype
FEATURE_DTYPE = "float16"


@dataclass
class TextFeatures:
    """A batch of stored caption features: ``tokens`` float16 ``[B, L, width]`` (zeros past
    each caption's real tokens) and ``mask`` bool ``[B, L]`` (True = real token), ``L`` the
    tower's context length. The loop hands it to the model where captions would go."""

    tokens: Tensor
    mask: Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def pin_memory(self) -> TextFeatures:
        """Both tensors in pinned host memory (a non-blocking copy to the GPU)."""
        return TextFeatures(self.tokens.pin_memory(), self.mask.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TextFeatures:
        """Both tensors on ``device``."""
        return TextFeatures(self.tokens.to(device, non_blocking=non_blocking),
                            self.mask.to(device, non_blocking=non_blocking))


def encode_features(features: np.ndarray) -> bytes:
    """One caption's ``[n, width]`` features -> :data:`TEXT_MEMBER` bytes (float16)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(features, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


def decode_features(data: bytes, width: int, context_length: int) -> np.ndarray:
    """:data:`TEXT_MEMBER` bytes -> float16 ``[n, width]``; raises on a shape that is not
    ``1 <= n <= context_length`` rows of ``width``."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 2 or arr.shape[1] != width or not 1 <= arr.shape[0] <= context_length:
        raise ValueError(f"text features of shape {arr.shape}, expected [1..{context_length}, "
                         f"{width}]")
    return np.ascontiguousarray(arr, dtype=np.float16)


def stack_features(features: Sequence[np.ndarray], context_length: int) -> TextFeatures:
    """Per-caption ``[n_i, width]`` features -> one :class:`TextFeatures` batch, padded to
    ``context_length``."""
    width = int(features[0].shape[1])
    tokens = np.zeros((len(features), context_length, width), np.float16)
    mask = np.zeros((len(features), context_length), bool)
    for i, f in enumerate(features):
        tokens[i, :len(f)] = f
        mask[i, :len(f)] = True
    return TextFeatures(torch.from_numpy(tokens), torch.from_numpy(mask))


class TextFeatureEncoder:
    """The frozen tower of a ``text_features`` record, run on captions by prepare's actors."""

    def __init__(self, record: dict[str, Any], device: str = "cpu") -> None:
        from hdd_ray.models.text import build_text_encoder

        self.tower = build_text_encoder("open_clip", arch=record["arch"],
                                        pretrained=record["pretrained"]).to(device)
        if self.tower.dim != int(record["width"]):
            raise ValueError(f"text tower {record['arch']}: width {self.tower.dim}, the record "
                             f"says {record['width']}")
        self.device = device

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> list[bytes]:
        """Each caption's :data:`TEXT_MEMBER` bytes: the tower's output at its real tokens."""
        if not captions:
            return []
        cond = self.tower.encode(captions, self.device)
        tokens = cond["tokens"].float().cpu().numpy()
        mask = cond["mask"].cpu().numpy()
        return [encode_features(tokens[i][mask[i]]) for i in range(len(captions))]
