"""The router ``r(x_t, t) -> logits over K experts`` (DDM: a ViT trunk on the noisy image).

It sees only the noisy image and the network time, never the caption: routing is trained with
cross-entropy on cluster labels of ``x_t`` drawn on the flow-matching path, so it needs the data
and the cluster assignment but no expert.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hdd_ray.choices import ROUTER_SIZES
from hdd_ray.models.dit import EncoderBlock, TimestepEmbedder, run_blocks, sincos_pos_embed_2d

__all__ = ["ROUTER_SIZES", "Router", "build_router"]


class Router(nn.Module):
    """ViT classifier over patches of ``x_t`` with a learned CLS token carrying the timestep.

    ``forward(x_t, t)``: ``x_t`` [B, C, H, W], ``t`` [B] float network time -> logits [B, K].
    The timestep embedding is added to the CLS token, which every patch can attend to.
    ``activation_checkpointing``: each block recomputed in the backward pass (as the DiT's).
    """

    def __init__(
        self,
        input_size: int,
        in_channels: int,
        num_experts: int,
        patch_size: int = 2,
        hidden_size: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        self.num_experts = num_experts
        self.activation_checkpointing = activation_checkpointing
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer(
            "pos_embed",
            sincos_pos_embed_2d(hidden_size, input_size // patch_size)[None],
            persistent=False,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.blocks = nn.ModuleList(
            [EncoderBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.head = nn.Linear(hidden_size, num_experts)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Logits [B, K] of ``p(k | x_t, t)``."""
        h = self.x_embedder(x_t).flatten(2).transpose(1, 2) + self.pos_embed
        cls = self.cls_token + self.t_embedder(t)[:, None]
        h = torch.cat([cls.to(h.dtype), h], dim=1)
        h = run_blocks(self.blocks, h, checkpointed=self.activation_checkpointing)
        return self.head(self.norm(h[:, 0]))


def build_router(size: str, input_size: int, in_channels: int, num_experts: int) -> Router:
    """Build a registered router size over ``in_channels`` x ``input_size``^2 inputs."""
    if size not in ROUTER_SIZES:
        raise ValueError(f"unknown router size {size!r}; expected one of {', '.join(ROUTER_SIZES)}")
    return Router(input_size, in_channels, num_experts, **ROUTER_SIZES[size])
