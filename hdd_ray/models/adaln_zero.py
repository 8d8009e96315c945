"""The original DiT's AdaLN-Zero as a variant of our DiT (``experts.adaln: zero``).

facebookresearch/DiT modulates each block by its own ``adaLN_modulation`` (SiLU, then a linear
map [6 D, D]) of the conditioning ``c = t_emb + y_emb``; PixArt's AdaLN-Single, our default,
computes one shared modulation (``t_block``) and adds a per-block table. No AdaLN-Single maps
exactly onto per-block AdaLN-Zero, so starting *exactly* from a DiT checkpoint needs this
variant. It costs ``6 D^2`` parameters per block (~223M for DiT-XL/2's 28 blocks of 1,152).

The variant keeps the DiT's forward unchanged by swapping modules:

* ``t_embedder`` returns ``c = t_emb(t) + class_embedding``: one learned vector in place of
  DiT's class table (a text-conditioned expert has no class; started from an ImageNet DiT it is
  the null class's row, so step 0 is the checkpoint's unconditional model);
* ``t_block`` is the identity, so each block receives ``c`` and applies its own modulation;
* the final layer's shift and scale are its own ``adaLN_modulation`` of ``c`` ([2 D, D]).

Cross-attention stays (its output projection starts at zero: the text path adds exactly
nothing at step 0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hdd_ray.choices import ADALN_VARIANTS
from hdd_ray.models.dit import DiT, DiTBlock, FinalLayer, TimestepEmbedder, build_dit

__all__ = ["ConditionedTimestepEmbedder", "ZeroBlock", "ZeroFinalLayer", "adaln_variant",
           "build_expert_dit", "to_adaln_zero"]


class ConditionedTimestepEmbedder(TimestepEmbedder):
    """DiT's conditioning ``c = t_emb(t) + y``, with ``y`` one learned vector (``class_embedding``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__(hidden_size, frequency_embedding_size)
        self.class_embedding = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        """``c`` [B, hidden] for float times ``t`` [B]."""
        return super().forward(t) + self.class_embedding.to(self.mlp[0].weight.dtype)


class ZeroBlock(DiTBlock):
    """A :class:`DiTBlock` modulated by its own ``adaLN_modulation`` of ``c`` (AdaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__(hidden_size, num_heads, mlp_ratio)
        del self.scale_shift_table
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def modulation(self, t0: Tensor) -> Tensor:
        """Shift, scale and gate of attention and MLP, [B, 6, C], from ``c`` [B, C]."""
        return self.adaLN_modulation(t0).reshape(t0.shape[0], 6, -1)


class ZeroFinalLayer(FinalLayer):
    """The final layer with DiT's ``adaLN_modulation`` of ``c`` ([2 D, D]) for shift and scale."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__(hidden_size, patch_size, out_channels)
        del self.scale_shift_table
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def modulation(self, t: Tensor) -> Tensor:
        """Shift and scale of the output, [B, 2, C], from ``c`` [B, C]."""
        return self.adaLN_modulation(t).reshape(t.shape[0], 2, -1)


def to_adaln_zero(net: DiT) -> DiT:
    """``net`` turned into the AdaLN-Zero variant in place, initialised as DiT initialises it
    (modulations and output at zero, timestep MLP and class vector N(0, 0.02)); returns it."""
    hidden = net.hidden_size
    old = net.t_embedder
    net.t_embedder = ConditionedTimestepEmbedder(hidden, old.frequency_embedding_size)
    net.t_block = nn.Identity()
    blocks = []
    for block in net.blocks:
        new = ZeroBlock(hidden, block.attn.num_heads, block.mlp.fc1.out_features / hidden)
        # keep everything but the modulation (attention, cross-attention, MLP as initialised)
        new.load_state_dict({k: v for k, v in block.state_dict().items()
                             if k != "scale_shift_table"}, strict=False)
        blocks.append(new)
    net.blocks = nn.ModuleList(blocks)
    lin = net.final_layer.linear
    net.final_layer = ZeroFinalLayer(hidden, net.patch_size, lin.out_features // net.patch_size**2)
    with torch.no_grad():
        for lin in (net.t_embedder.mlp[0], net.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        nn.init.normal_(net.t_embedder.class_embedding, std=0.02)
        for mod in [b.adaLN_modulation[1] for b in net.blocks] + [
                net.final_layer.adaLN_modulation[1], net.final_layer.linear]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)
    return net


def adaln_variant(net: nn.Module) -> str:
    """``"zero"`` or ``"single"``: which modulation ``net`` (a :class:`DiT`) uses."""
    return "zero" if isinstance(getattr(net, "t_embedder", None), ConditionedTimestepEmbedder) \
        else "single"


def build_expert_dit(size: str, input_size: int, in_channels: int, text_dim: int,
                     adaln: str = "single") -> DiT:
    """A registered DiT size with the modulation ``adaln`` (``single`` or ``zero``)."""
    if adaln not in ADALN_VARIANTS:
        raise ValueError(f"unknown AdaLN variant {adaln!r}, allowed: {', '.join(ADALN_VARIANTS)}")
    net = build_dit(size, input_size=input_size, in_channels=in_channels, text_dim=text_dim)
    return to_adaln_zero(net) if adaln == "zero" else net
