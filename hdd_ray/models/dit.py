"""DiT with PixArt-alpha's AdaLN-Single and cross-attention to text tokens.

Follows facebookresearch/DiT (``models.py``: patchify, fixed 2-D sin-cos positions, timestep
embedder, zero-initialised output) and PixArt-alpha (``PixArtBlock``, ``T2IFinalLayer``,
``CaptionEmbedder``): one timestep embedder and one ``t_block`` shared by every block, each block
adding its own learned ``scale_shift_table`` to the shared modulation.

``activation_checkpointing`` (``train.activation_checkpointing``): each block's activations
are recomputed in the backward pass instead of kept (``torch.utils.checkpoint``, non-reentrant),
so a forward keeps only the blocks' inputs; same values and gradients, ~1/3 more compute
(:mod:`hdd_ray.training.memory`).

The network is agnostic to the objective: it maps ``(x, t, cond)`` to a tensor shaped like ``x``
and the caller decides whether that is ``eps`` or a velocity. ``t`` is *network time*, a float
(DDPM ``tau`` in [0, 1000] or flow-matching ``t * 1000``), never rounded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hdd_ray.choices import DIT_SIZES

__all__ = [
    "DIT_SIZES",
    "Attention",
    "CrossAttention",
    "DiT",
    "DiTBlock",
    "EncoderBlock",
    "Mlp",
    "TimestepEmbedder",
    "build_dit",
    "count_parameters",
    "run_blocks",
    "sincos_pos_embed_2d",
    "timestep_embedding",
]


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of float timesteps ``t`` [B] -> [B, dim].

    ``emb = [cos(t f_0) .. cos(t f_{h-1}), sin(t f_0) .. sin(t f_{h-1})]`` with
    ``f_i = max_period^(-i / h)``, ``h = dim // 2`` (GLIDE / DiT). Computed in float64 when ``t``
    is float64 and in float32 otherwise, so half-precision inputs never quantise the time.
    """
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half
    )
    args = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin-cos positional embedding [grid_size**2, dim], row-major patch order.

    Same values as DiT's ``get_2d_sincos_pos_embed``: half the channels encode the column, half
    the row, each as ``[sin(p w_i), cos(p w_i)]`` with ``w_i = 10000^(-i / (dim / 4))``.
    """
    if dim % 4:
        raise ValueError(f"hidden_size={dim}: must be divisible by 4 for 2-D sin-cos positions")
    coords = torch.arange(grid_size, dtype=torch.float64)
    col, row = torch.meshgrid(coords, coords, indexing="xy")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_axis(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one_axis(col), one_axis(row)], dim=1).float()


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (works on the meta device)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def run_blocks(blocks: nn.ModuleList, h: Tensor, *args: Tensor | None,
               checkpointed: bool = False) -> Tensor:
    """``h`` through every block of ``blocks`` (each called as ``block(h, *args)``).

    ``checkpointed`` (while gradients are recorded): each block through
    ``torch.utils.checkpoint`` (non-reentrant; autocast state restored on recompute), so only
    its input is kept and its activations are recomputed in the backward pass.
    """
    for block in blocks:
        if checkpointed and torch.is_grad_enabled():
            h = checkpoint(block, h, *args, use_reentrant=False)
        else:
            h = block(h, *args)
    return h


class Fp32LayerNorm(nn.LayerNorm):
    """A LayerNorm computed in float32 whatever its input's dtype: the DiT's residual stream is
    bf16 under autocast, its statistics are not (CUDA's autocast does the same for every
    LayerNorm; CPU's would keep bf16). The same parameters and state dict as ``nn.LayerNorm``."""

    def forward(self, x: Tensor) -> Tensor:
        """``x`` normalised over its last dimensions, in float32 (float64 stays float64)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Float timestep -> hidden vector: sinusoidal features then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: Tensor) -> Tensor:
        """Embed ``t`` [B] (any float, not necessarily an integer step) -> [B, hidden]."""
        emb = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP to the last dimension."""
        return self.fc2(self.act(self.fc1(x)))


def _heads(x: Tensor, num_heads: int) -> Tensor:
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def _key_mask(mask: Tensor | None) -> Tensor | None:
    # [B, L] True = attend  ->  [B, 1, 1, L], broadcast over heads and queries by SDPA.
    return None if mask is None else mask[:, None, None, :]


class Attention(nn.Module):
    """Multi-head self-attention (fused qkv) with an optional key padding mask."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x`` [B, N, C]; ``mask`` [B, N] bool, True = a real token that may be attended."""
        b, n, c = x.shape
        q, k, v = (_heads(z, self.num_heads) for z in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=_key_mask(mask))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Multi-head cross-attention from image tokens to text tokens (PixArt's layout)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        """``x`` [B, N, C] queries, ``y`` [B, L, C] keys/values, ``mask`` [B, L] True = valid."""
        b, n, c = x.shape
        q = _heads(self.q_linear(x), self.num_heads)
        k, v = (_heads(z, self.num_heads) for z in self.kv_linear(y).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=_key_mask(mask))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DiTBlock(nn.Module):
    """PixArt block: modulated gated self-attention, plain cross-attention, modulated gated MLP.

    ``shift/scale/gate = scale_shift_table + t0`` where ``t0`` [B, 6*C] comes from the model's one
    shared ``t_block``; the per-block table [6, C] is this block's only timestep parameter.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = Fp32LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = Fp32LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def modulation(self, t0: Tensor) -> Tensor:
        """Shift, scale and gate of attention and MLP, [B, 6, C], from ``t0`` [B, 6*C]."""
        # in t0's dtype: under bf16 autocast the residual stream stays bf16 (an fp32 table would
        # promote it, doubling activation bytes); the parameter itself stays fp32
        return self.scale_shift_table[None].to(t0.dtype) + t0.reshape(t0.shape[0], 6, -1)

    def forward(self, x: Tensor, y: Tensor, t0: Tensor, mask: Tensor) -> Tensor:
        """``x`` [B, N, C], ``y`` [B, L, C] caption, ``t0`` [B, 6*C], ``mask`` [B, L]."""
        mod = self.modulation(t0)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = x + gate_msa * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(x, y, mask)
        return x + gate_mlp * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class EncoderBlock(nn.Module):
    """Plain pre-norm transformer block (router trunk, learned text encoder)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x`` [B, N, C]; ``mask`` [B, N] key padding mask, True = real token."""
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """PixArt's T2IFinalLayer: its own [2, C] table + the timestep embedding ``t``."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = Fp32LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def modulation(self, t: Tensor) -> Tensor:
        """Shift and scale of the output, [B, 2, C], from the timestep embedding ``t`` [B, C]."""
        return self.scale_shift_table[None].to(t.dtype) + t[:, None]

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``x`` [B, N, C], ``t`` [B, C] -> [B, N, p*p*out]."""
        shift, scale = self.modulation(t).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Text-conditioned DiT (PixArt-alpha layout) predicting a tensor shaped like its input.

    ``forward(x, t, cond)``: ``x`` [B, C, H, W]; ``t`` [B] float network time; ``cond`` holds
    ``tokens`` [B, L, text_dim], ``mask`` [B, L] bool (True = real token; every row needs at
    least one True) and optionally ``drop`` [B] bool (True = replace that sample's caption by the
    learned null caption ``y_null`` on every position, for classifier-free guidance).
    ``final_conv``: a 3x3 convolution after unpatchify (U-ViT's; the identity at init), which
    smooths the seams between large patches.
    """

    def __init__(
        self,
        input_size: int,
        in_channels: int,
        patch_size: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        text_dim: int,
        mlp_ratio: float = 4.0,
        final_conv: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        #: recompute each block's activations in the backward pass (not part of the weights)
        self.activation_checkpointing = activation_checkpointing
        self.input_size, self.in_channels, self.patch_size = input_size, in_channels, patch_size
        self.hidden_size, self.text_dim = hidden_size, text_dim
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        grid = input_size // patch_size
        # Not persistent: it is a function of the architecture, not a learned weight.
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(hidden_size, grid)[None], persistent=False
        )
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = Mlp(text_dim, hidden_size, hidden_size)
        self.y_null = nn.Parameter(torch.randn(1, 1, text_dim) / text_dim**0.5)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        #: U-ViT's 3x3 convolution after unpatchify (smooths seams between patches); None = DiT
        self.final_conv = (nn.Conv2d(in_channels, in_channels, 3, padding=1) if final_conv
                           else None)
        self._init_weights()

    def _init_weights(self) -> None:
        # PixArt-alpha's initialize_weights.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.normal_(self.y_embedder.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.fc2.weight, std=0.02)
        # Zero cross-attention outputs: at init the text path is an exact no-op (as PixArt).
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        # Zero output layer: an untrained model predicts 0 (as DiT).
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.final_conv is not None:  # the identity at init: the model starts as a plain DiT
            nn.init.dirac_(self.final_conv.weight)
            nn.init.zeros_(self.final_conv.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, N, p*p*C] -> [B, C, H, W]."""
        p, c = self.patch_size, self.in_channels
        h = w = self.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def embed_caption(self, cond: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Project caption tokens to hidden size, swapping in ``y_null`` where ``drop``."""
        tokens, mask = cond["tokens"], cond["mask"].bool()
        drop = cond.get("drop")
        if drop is not None:
            drop = drop.bool()
            tokens = torch.where(drop[:, None, None], self.y_null.to(tokens.dtype), tokens)
            mask = mask | drop[:, None]
        return self.y_embedder(tokens), mask

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Predict [B, C, H, W] from ``x`` [B, C, H, W] at network time ``t`` [B] given ``cond``."""
        h = self.x_embedder(x).flatten(2).transpose(1, 2)
        h = h + self.pos_embed.to(h.dtype)  # the autocast dtype: a bf16 residual stream on GPUs
        temb = self.t_embedder(t)
        t0 = self.t_block(temb)
        y, mask = self.embed_caption(cond)
        h = run_blocks(self.blocks, h, y, t0, mask, checkpointed=self.activation_checkpointing)
        out = self.unpatchify(self.final_layer(h, temb))
        return out if self.final_conv is None else self.final_conv(out)


def build_dit(size: str, input_size: int, in_channels: int, text_dim: int) -> DiT:
    """Build a registered DiT size, e.g. ``build_dit("DiT-XL/2", 32, 4, 4096)``."""
    if size not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {size!r}; expected one of {', '.join(DIT_SIZES)}")
    return DiT(input_size=input_size, in_channels=in_channels, text_dim=text_dim, **DIT_SIZES[size])
