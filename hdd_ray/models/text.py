"""Text conditioning: a hash tokenizer + small learned encoder (demo) and a frozen open_clip tower.

Both encoders expose ``encode(captions) -> {"tokens": [B, L, dim], "mask": [B, L] bool}`` and a
``dim`` property, which is what :class:`hdd_ray.models.dit.DiT` consumes as ``cond``.
"""

from __future__ import annotations

import re
import zlib

import torch
from torch import Tensor, nn

from hdd_ray import towers
from hdd_ray.choices import TEXT_ENCODER_KINDS
from hdd_ray.models.dit import EncoderBlock

__all__ = [
    "HashTokenizer",
    "LearnedTextEncoder",
    "OpenCLIPTextEncoder",
    "TEXT_ENCODER_KINDS",
    "build_text_encoder",
    "register_tiny_open_clip_config",
]

_WORD = re.compile(r"[^\W_]+")  # runs of letters/digits, any script
_ARCH_KEY = "experts.text.arch"
_WEIGHTS_KEY = "experts.text.pretrained"


class HashTokenizer:
    """Word-level tokenizer without a vocabulary file: ``id = 1 + crc32(word) % (vocab_size - 1)``.

    Lowercases, splits on non-alphanumerics, truncates to ``max_len`` and pads with id 0. crc32
    (not Python's salted ``hash``) makes ids identical in every process. A caption with no words is
    encoded as the single empty word (``crc32("") = 0``, id 1), so no mask row is all False.
    """

    def __init__(self, vocab_size: int = 1024, max_len: int = 16) -> None:
        if vocab_size < 2 or max_len < 1:
            raise ValueError(
                f"HashTokenizer needs vocab_size >= 2 and max_len >= 1, got "
                f"vocab_size={vocab_size}, max_len={max_len}"
            )
        self.vocab_size, self.max_len = vocab_size, max_len

    def word_id(self, word: str) -> int:
        """Id of one (already lowercased) word, in ``1 .. vocab_size - 1``."""
        return 1 + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - 1)

    def __call__(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Tokenize -> ``(ids [B, max_len] long, mask [B, max_len] bool, True = real token)``."""
        ids = torch.zeros(len(captions), self.max_len, dtype=torch.long)
        for i, caption in enumerate(captions):
            words = _WORD.findall(caption.lower())[: self.max_len] or [""]
            ids[i, : len(words)] = torch.tensor([self.word_id(w) for w in words])
        return ids, ids != 0


class LearnedTextEncoder(nn.Module):
    """Small pre-norm transformer over hash-token ids, trained jointly with each expert."""

    def __init__(
        self,
        vocab_size: int = 1024,
        max_len: int = 16,
        dim: int = 64,
        depth: int = 1,
        num_heads: int = 4,
    ) -> None:
        super().__init__()
        self.tokenizer = HashTokenizer(vocab_size, max_len)
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.blocks = nn.ModuleList([EncoderBlock(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    @property
    def dim(self) -> int:
        """Width of the output token features."""
        return self.token_embedding.embedding_dim

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """``ids`` [B, L] long, ``mask`` [B, L] bool -> token features [B, L, dim]."""
        x = self.token_embedding(ids) + self.pos_embedding[:, : ids.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def encode(self, captions: list[str], device: torch.device | str | None = None) -> dict:
        """Tokenize and encode -> ``{"tokens": [B, L, dim], "mask": [B, L]}`` (differentiable)."""
        device = device or self.token_embedding.weight.device
        ids, mask = (z.to(device) for z in self.tokenizer(captions))
        return {"tokens": self(ids, mask), "mask": mask}


class OpenCLIPTextEncoder(nn.Module):
    """Frozen open_clip text tower returning per-token features (after ``ln_final``).

    ``arch`` is an open_clip name or config ``.json``; ``pretrained`` an open_clip tag
    (downloaded by open_clip into its cache, so it needs the network or a warm cache), a local
    checkpoint file, or ``None`` for random weights (tests). Loaded by :mod:`hdd_ray.towers`
    (QuickGELU for OpenAI weights).
    Only the text tower is kept; it is in eval mode with ``requires_grad=False`` for good, and
    ``train()`` does not switch it back. The mask marks the tokenizer's non-zero ids (SOT, words,
    EOT); the CLIP text tower is causal, so real tokens never see the padding.
    """

    def __init__(self, arch: str, pretrained: str | None = None) -> None:
        super().__init__()
        model = towers.open_clip_model(arch, pretrained, arch_key=_ARCH_KEY,
                                       weights_key=_WEIGHTS_KEY)
        arch = towers.open_clip_arch(arch, _ARCH_KEY)
        tower = model.text if hasattr(model, "text") else model  # CustomTextCLIP vs CLIP
        if not hasattr(tower, "token_embedding") or getattr(tower, "cls_emb", None) is not None:
            raise ValueError(f"open_clip {arch}: only CLIP-style causal text towers are supported")
        if getattr(tower, "use_pad_mask", False):
            raise ValueError(
                f"open_clip {arch}: text towers that need a padding mask are not supported"
            )
        self.arch, self.pretrained = arch, pretrained
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.tokenizer = towers.open_clip_tokenizer(arch)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> OpenCLIPTextEncoder:
        """Stay in eval mode: the tower is frozen, its behaviour must not depend on the caller."""
        return super().train(False)

    @property
    def dim(self) -> int:
        """Width of the output token features (the text transformer's width)."""
        return self.token_embedding.embedding_dim

    def forward(self, ids: Tensor) -> Tensor:
        """``ids`` [B, L] open_clip token ids -> per-token features [B, L, width]."""
        length = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:length]
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        return self.ln_final(self.transformer(x, attn_mask=mask))

    @torch.no_grad()
    def encode(self, captions: list[str], device: torch.device | str | None = None) -> dict:
        """Tokenize and encode -> ``{"tokens": [B, L, width], "mask": [B, L]}`` (no grad)."""
        device = device or self.token_embedding.weight.device
        ids = self.tokenizer(list(captions)).to(device)
        return {"tokens": self(ids), "mask": ids != 0}


def build_text_encoder(kind: str, **kwargs) -> nn.Module:
    """Build a text encoder: ``"learned"`` or ``"open_clip"`` (frozen).

    ``kwargs`` go to the constructor (``vocab_size, max_len, dim, depth`` or ``arch, pretrained``).
    """
    if kind == "learned":
        return LearnedTextEncoder(**kwargs)
    if kind == "open_clip":
        return OpenCLIPTextEncoder(**kwargs)
    raise ValueError(
        f"unknown text encoder {kind!r}; expected one of {', '.join(TEXT_ENCODER_KINDS)}"
    )


TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def register_tiny_open_clip_config(name: str = "hdd-tiny-clip") -> str:
    """Register a tiny CLIP architecture with open_clip under ``name`` and return the name.

    open_clip ships no tiny config; this one (1-layer ViT of width 64 on 32 px, 1-layer text tower
    of width 64, context 16) builds in milliseconds for tests and the demo's reference CLIP.
    Idempotent within a process; call it in each process (e.g. each Ray worker) that needs it
    (:func:`hdd_ray.towers.register_open_clip_config`).
    """
    return towers.register_open_clip_config(name, TINY_OPEN_CLIP_CONFIG)
