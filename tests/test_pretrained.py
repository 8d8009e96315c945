"""Pretrained starts: every checkpoint format loads from a small file written here with the public
key layout (nothing is downloaded), a DiT start reproduces the original network (a reference
forward written below from the DiT architecture), an eps -> velocity start is exactly the
converted teacher, and each bad file gets its one line before Ray.

The fake checkpoints are tiny (DiT-T/2's width 96, 4 blocks, 4x4 patches of 2 on 8x8x4
"latents") but have the real key names and shape rules: 12 + 10 x depth keys for a DiT
(292 at DiT-XL/2's 28 blocks), 17 + 15 x depth for PixArt-alpha (437 at 28).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_corpus import write_digit_shard

from hdd_ray.diffusion import Safeguards, as_velocity, get_objective, get_schedule
from hdd_ray.diffusion.networks import NetworkSpec
from hdd_ray.errors import WeightsMismatch
from hdd_ray.models.expert import ExpertModel, save_weights
from hdd_ray.models.pretrained import (
    DDPM_CHECKPOINT,
    adaln_zero_to_single,
    fit_state,
    read_checkpoint,
    start_expert,
)

D, DEPTH, HEADS, P, C, SIZE = 96, 4, 4, 2, 4, 8  # DiT-T/2 on 8x8x4
TEXT = {"encoder": "learned", "vocab_size": 64, "max_len": 8, "dim": 16, "depth": 1}


# ------------------------------------------------------------------ the public layouts, written here


def dit_pos_embed(dim: int, grid: int) -> np.ndarray:
    """facebookresearch/DiT's ``get_2d_sincos_pos_embed`` (numpy, as published)."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)))
    g = g.reshape(2, 1, grid, grid)
    return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)


def dit_state(seed: int = 0, classes: int = 1000, width: int = D, channels: int = C
              ) -> dict[str, torch.Tensor]:
    """A facebookresearch/DiT state dict (learn_sigma, class-conditional) of random weights."""
    g = torch.Generator().manual_seed(seed)
    D, C = width, channels  # noqa: N806 - the architecture's own names

    def w(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    grid = SIZE // P
    sd = {"pos_embed": torch.from_numpy(dit_pos_embed(D, grid)).float()[None],
          "x_embedder.proj.weight": w(D, C, P, P, std=0.2), "x_embedder.proj.bias": w(D),
          "t_embedder.mlp.0.weight": w(D, 256), "t_embedder.mlp.0.bias": w(D),
          "t_embedder.mlp.2.weight": w(D, D), "t_embedder.mlp.2.bias": w(D),
          "y_embedder.embedding_table.weight": w(classes + 1, D, std=0.5)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({b + "attn.qkv.weight": w(3 * D, D), b + "attn.qkv.bias": w(3 * D),
                   b + "attn.proj.weight": w(D, D), b + "attn.proj.bias": w(D),
                   b + "mlp.fc1.weight": w(4 * D, D), b + "mlp.fc1.bias": w(4 * D),
                   b + "mlp.fc2.weight": w(D, 4 * D), b + "mlp.fc2.bias": w(D),
                   b + "adaLN_modulation.1.weight": w(6 * D, D),
                   b + "adaLN_modulation.1.bias": w(6 * D)})
    sd.update({"final_layer.adaLN_modulation.1.weight": w(2 * D, D),
               "final_layer.adaLN_modulation.1.bias": w(2 * D),
               "final_layer.linear.weight": w(P * P * 2 * C, D),
               "final_layer.linear.bias": w(P * P * 2 * C)})
    return sd


def pixart_state(seed: int = 1, caption_dim: int = 16) -> dict[str, torch.Tensor]:
    """A PixArt-alpha state dict (AdaLN-Single, cross-attention, 2C head) of random weights."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    sd = {"pos_embed": torch.from_numpy(dit_pos_embed(D, SIZE // P)).float()[None],
          "x_embedder.proj.weight": w(D, C, P, P, std=0.2), "x_embedder.proj.bias": w(D),
          "t_embedder.mlp.0.weight": w(D, 256), "t_embedder.mlp.0.bias": w(D),
          "t_embedder.mlp.2.weight": w(D, D), "t_embedder.mlp.2.bias": w(D),
          "t_block.1.weight": w(6 * D, D), "t_block.1.bias": w(6 * D),
          "y_embedder.y_proj.fc1.weight": w(D, caption_dim), "y_embedder.y_proj.fc1.bias": w(D),
          "y_embedder.y_proj.fc2.weight": w(D, D), "y_embedder.y_proj.fc2.bias": w(D),
          "y_embedder.y_embedding": w(120, caption_dim)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({b + "scale_shift_table": w(6, D),
                   b + "attn.qkv.weight": w(3 * D, D), b + "attn.qkv.bias": w(3 * D),
                   b + "attn.proj.weight": w(D, D), b + "attn.proj.bias": w(D),
                   b + "cross_attn.q_linear.weight": w(D, D), b + "cross_attn.q_linear.bias": w(D),
                   b + "cross_attn.kv_linear.weight": w(2 * D, D),
                   b + "cross_attn.kv_linear.bias": w(2 * D),
                   b + "cross_attn.proj.weight": w(D, D), b + "cross_attn.proj.bias": w(D),
                   b + "mlp.fc1.weight": w(4 * D, D), b + "mlp.fc1.bias": w(4 * D),
                   b + "mlp.fc2.weight": w(D, 4 * D), b + "mlp.fc2.bias": w(D)})
    sd.update({"final_layer.scale_shift_table": w(2, D),
               "final_layer.linear.weight": w(P * P * 2 * C, D),
               "final_layer.linear.bias": w(P * P * 2 * C)})
    return sd


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def _attention(x, qkv_w, qkv_b, proj_w, proj_b, heads):
    b, n, d = x.shape
    qkv = F.linear(x, qkv_w, qkv_b).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    att = (q @ k.transpose(-2, -1) * (d // heads) ** -0.5).softmax(-1)
    return F.linear((att @ v).transpose(1, 2).reshape(b, n, d), proj_w, proj_b)


def _t_embed(sd, t):
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1).to(sd["t_embedder.mlp.0.weight"].dtype)
    h = F.silu(F.linear(emb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"]))
    return F.linear(h, sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])


def _unpatchify(x, out_channels):
    g = SIZE // P
    x = x.reshape(x.shape[0], g, g, P, P, out_channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], out_channels, SIZE, SIZE)


def dit_reference(sd, x, t, y):
    """facebookresearch/DiT's forward (models.py), written from its architecture: [B, 2C, H, W]."""
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=P)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    c = _t_embed(sd, t) + sd["y_embedder.embedding_table.weight"][y]
    for i in range(DEPTH):
        b = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[b + "adaLN_modulation.1.weight"],
                       sd[b + "adaLN_modulation.1.bias"]).chunk(6, dim=1)
        ln = F.layer_norm(h, (D,), eps=1e-6)
        h = h + mod[2][:, None] * _attention(_modulate(ln, mod[0], mod[1]), sd[b + "attn.qkv.weight"],
                                             sd[b + "attn.qkv.bias"], sd[b + "attn.proj.weight"],
                                             sd[b + "attn.proj.bias"], HEADS)
        ln = F.layer_norm(h, (D,), eps=1e-6)
        m = F.gelu(F.linear(_modulate(ln, mod[3], mod[4]), sd[b + "mlp.fc1.weight"],
                            sd[b + "mlp.fc1.bias"]), approximate="tanh")
        h = h + mod[5][:, None] * F.linear(m, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    out = F.linear(_modulate(F.layer_norm(h, (D,), eps=1e-6), shift, scale),
                   sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    return _unpatchify(out, 2 * C)


def expert(adaln: str = "zero", text: dict | None = None) -> ExpertModel:
    torch.manual_seed(0)
    return ExpertModel("DiT-T/2", text or TEXT, SIZE, C, adaln=adaln).eval()


def cond(model: ExpertModel, n: int) -> dict:
    return model.tokenize(["a digit", "two words"] * (n // 2))


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dit") / "DiT-T-2-8x8.pt"
    torch.save(dit_state(), path)
    return str(path)


# ------------------------------------------------------------------ exact starts


def test_dit_checkpoint_has_the_public_key_count():
    assert len(dit_state()) == 12 + 10 * DEPTH  # 292 at DiT-XL/2's 28 blocks
    assert len(pixart_state()) == 17 + 15 * DEPTH  # 437 at 28


def test_dit_start_reproduces_the_original_networks_eps_at_step_0(dit_file):
    """Loaded into the AdaLN-Zero variant, the expert's eps at tau = n + 1 is the DiT's eps
    (the first C of its 2C channels) at step n for the null class (float64: to 1e-10)."""
    model = expert("zero")
    ckpt = start_expert(model, dit_file, "zero")
    assert (ckpt.format, ckpt.network) == ("dit", DDPM_CHECKPOINT)
    sd = {k: v.double() for k, v in dit_state().items()}
    model = model.double()
    torch.manual_seed(1)
    x = torch.randn(4, C, SIZE, SIZE, dtype=torch.float64)
    steps = torch.tensor([0.0, 17.0, 500.0, 999.0], dtype=torch.float64)
    ref = dit_reference(sd, x, steps, torch.full((4,), 1000))[:, :C]
    objective = get_objective("ddpm_eps", "linear", network=DDPM_CHECKPOINT)
    with torch.no_grad():
        ours = objective.predictor(model)(x, steps + 1, cond(model, 4))
    assert torch.allclose(ours, ref, atol=1e-10), (ours - ref).abs().max()
    with torch.no_grad():  # float32, as trained: float tolerance
        ours32 = objective.predictor(model.float())(x.float(), steps.float() + 1, cond(model, 4))
    assert torch.allclose(ours32, ref.float(), atol=1e-4), (ours32 - ref).abs().max()
    assert model.net.pos_embed.shape == sd["pos_embed"].shape
    assert torch.allclose(model.net.pos_embed, sd["pos_embed"].float(), atol=1e-6)


def test_eps_to_velocity_start_equals_the_converted_teacher_at_step_0(dit_file):
    """An fm_velocity expert started exactly from an eps checkpoint: its velocity field, and
    its flow-matching loss, are the converted DiT's (same conversion, same prior mean)."""
    model = expert("zero")
    start_expert(model, dit_file, "zero")
    model = model.double()
    sd = {k: v.double() for k, v in dit_state().items()}
    safeguards = Safeguards(x0_clamp=1.0)
    prior = torch.randn(C, SIZE, SIZE, dtype=torch.float64) * 0.1
    student = get_objective("fm_velocity", network=DDPM_CHECKPOINT, safeguards=safeguards)

    def teacher(x, tau, _):
        return dit_reference(sd, x, tau - 1, torch.full((x.shape[0],), 1000))[:, :C]

    converted = as_velocity(teacher, "eps", get_schedule("linear"), safeguards, prior)
    t = torch.tensor([0.01, 0.02, 0.3, 0.7, 0.96, 0.999, 1.0, 0.5], dtype=torch.float64)
    torch.manual_seed(2)
    x_t = torch.randn(8, C, SIZE, SIZE, dtype=torch.float64)
    c = cond(model, 8)
    with torch.no_grad():
        ours = student.velocity_field(model, safeguards, prior)(x_t, t, c)
        ref = converted(x_t, t, None)
        assert torch.allclose(ours, ref, atol=1e-8), (ours - ref).abs().max()
        x0 = torch.rand(8, C, SIZE, SIZE, dtype=torch.float64) * 2 - 1
        loss = student.loss(model, x0, c, 0.0, torch.Generator().manual_seed(3), prior)
        g = torch.Generator().manual_seed(3)
        t_draw = torch.rand(8, generator=g).double()
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        tb = t_draw[:, None, None, None]
        want = ((converted((1 - tb) * x0 + tb * eps, t_draw, None) - (eps - x0)) ** 2).mean()
    assert torch.allclose(loss.double(), want, rtol=1e-6), (loss, want)


def test_paper_mode_reinitialises_the_head_and_feeds_round_999_t(dit_file):
    model = expert("zero")
    start_expert(model, dit_file, "zero", mode="paper")
    assert float(model.net.final_layer.linear.weight.abs().sum()) == 0.0
    sd = dit_state()
    assert torch.equal(model.net.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    spec = NetworkSpec("velocity", None, "paper")
    assert spec.network_time(torch.tensor([0.5004, 1.0])).tolist() == [500.0, 999.0]


def test_adaln_zero_to_single_is_exact_where_blocks_share_their_modulation():
    """The documented mapping: the conditioning (class folded into the timestep MLP) and every
    block whose AdaLN-Zero map equals the mean map come out exact."""
    sd = dit_state()
    for i in range(1, DEPTH):  # every block the same W (biases differ)
        sd[f"blocks.{i}.adaLN_modulation.1.weight"] = sd["blocks.0.adaLN_modulation.1.weight"]
    ckpt = read_checkpoint_from(sd)
    single = adaln_zero_to_single(ckpt.state)
    model = expert("single")
    model.net.load_state_dict({**model.net.state_dict(), **single})
    t = torch.tensor([3.0, 400.0])
    with torch.no_grad():
        c_zero = _t_embed(sd, t) + sd["y_embedder.embedding_table.weight"][1000]
        temb = model.net.t_embedder(t)
        assert torch.allclose(temb, c_zero, atol=1e-5)
        for i in range(DEPTH):
            zero = F.linear(F.silu(c_zero), sd[f"blocks.{i}.adaLN_modulation.1.weight"],
                            sd[f"blocks.{i}.adaLN_modulation.1.bias"]).reshape(2, 6, D)
            one = model.net.blocks[i].modulation(model.net.t_block(temb))
            assert torch.allclose(one, zero, atol=1e-5)


def read_checkpoint_from(sd: dict, tmp: str | None = None):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(tmp or d, "ckpt.pt")
        torch.save(sd, path)
        ckpt = read_checkpoint(path)
        ckpt.state = {k: v.clone() for k, v in ckpt.state.items()}
    return ckpt


def pixart_reference(sd, x, t, tokens, mask):
    """PixArt-alpha's forward (PixArtBlock, T2IFinalLayer), written from its architecture."""
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=P)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    temb = _t_embed(sd, t)
    t0 = F.linear(F.silu(temb), sd["t_block.1.weight"], sd["t_block.1.bias"])
    y = F.linear(F.gelu(F.linear(tokens, sd["y_embedder.y_proj.fc1.weight"],
                                 sd["y_embedder.y_proj.fc1.bias"]), approximate="tanh"),
                 sd["y_embedder.y_proj.fc2.weight"], sd["y_embedder.y_proj.fc2.bias"])
    b_, n, _ = h.shape
    for i in range(DEPTH):
        b = f"blocks.{i}."
        mod = (sd[b + "scale_shift_table"][None] + t0.reshape(b_, 6, D)).unbind(1)
        ln = F.layer_norm(h, (D,), eps=1e-6)
        h = h + mod[2][:, None] * _attention(_modulate(ln, mod[0], mod[1]), sd[b + "attn.qkv.weight"],
                                             sd[b + "attn.qkv.bias"], sd[b + "attn.proj.weight"],
                                             sd[b + "attn.proj.bias"], HEADS)
        q = F.linear(h, sd[b + "cross_attn.q_linear.weight"], sd[b + "cross_attn.q_linear.bias"])
        k, v = F.linear(y, sd[b + "cross_attn.kv_linear.weight"],
                        sd[b + "cross_attn.kv_linear.bias"]).chunk(2, -1)
        q, k, v = (z.reshape(b_, z.shape[1], HEADS, D // HEADS).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1) * (D // HEADS) ** -0.5)
        att = att.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
        cross = (att @ v).transpose(1, 2).reshape(b_, n, D)
        h = h + F.linear(cross, sd[b + "cross_attn.proj.weight"], sd[b + "cross_attn.proj.bias"])
        ln = F.layer_norm(h, (D,), eps=1e-6)
        m = F.gelu(F.linear(_modulate(ln, mod[3], mod[4]), sd[b + "mlp.fc1.weight"],
                            sd[b + "mlp.fc1.bias"]), approximate="tanh")
        h = h + mod[5][:, None] * F.linear(m, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    shift, scale = (sd["final_layer.scale_shift_table"][None] + temb[:, None]).unbind(1)
    out = F.linear(_modulate(F.layer_norm(h, (D,), eps=1e-6), shift, scale),
                   sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    return _unpatchify(out, 2 * C)


def _tokens(n: int = 2, length: int = 5, dim: int = 16):
    torch.manual_seed(4)
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[1, 3:] = False
    return torch.randn(n, length, dim), mask


EPS_STEP = get_objective("ddpm_eps", "linear", network=DDPM_CHECKPOINT)


def test_pixart_pth_start_reproduces_pixart_with_its_caption_path(tmp_path):
    """A PixArt-alpha .pth (weights under ``state_dict``) into an expert whose text width is
    the checkpoint's caption width: the whole network, cross-attention included, is PixArt's."""
    sd = pixart_state()
    torch.save({"state_dict": sd}, tmp_path / "PixArt-T-2.pth")
    model = expert("single")
    ckpt = start_expert(model, str(tmp_path / "PixArt-T-2.pth"), "single")
    assert ckpt.format == "pixart"
    x = torch.randn(2, C, SIZE, SIZE)
    tokens, mask = _tokens()
    t = torch.tensor([3.0, 640.0])
    with torch.no_grad():
        ref = pixart_reference(sd, x, t, tokens, mask)[:, :C]
        ours = EPS_STEP.predictor(model.net)(x, t + 1, {"tokens": tokens, "mask": mask})
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_pixart_of_another_text_width_starts_its_text_path_at_zero(tmp_path):
    torch.save({"state_dict": pixart_state(caption_dim=32)}, tmp_path / "p.pth")
    model = expert("single")
    start_expert(model, str(tmp_path / "p.pth"), "single")
    for block in model.net.blocks:
        assert float(block.cross_attn.proj.weight.abs().sum()) == 0.0
    assert torch.equal(model.net.t_block[1].weight, pixart_state(caption_dim=32)["t_block.1.weight"])


def _diffusers_dit(tmp_path):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(5)
    m = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=D // HEADS,
                              in_channels=C, out_channels=2 * C, num_layers=DEPTH,
                              sample_size=SIZE, patch_size=P, norm_eps=1e-6)
    with torch.no_grad():
        for param in m.parameters():
            param.normal_(0, 0.1)
        for block in m.transformer_blocks[1:]:  # the conversion copies the embedders per block
            block.norm1.emb.load_state_dict(m.transformer_blocks[0].norm1.emb.state_dict())
    m.save_pretrained(tmp_path / "dit-diffusers")
    return m.eval(), str(tmp_path / "dit-diffusers")


def test_diffusers_dit_folder_loads_as_the_original_dit(tmp_path):
    """A diffusers DiTTransformer2DModel folder holds the original DiT's weights, renamed (q, k,
    v split, embedders copied per block): it starts the expert as the original DiT, whose
    forward (above) reads them. (diffusers' own DiT shifts its timestep frequencies by one,
    ``downscale_freq_shift=1``, so it is not the reference.)"""
    from hdd_ray.models.pretrained import _from_diffusers, read_state

    _, folder = _diffusers_dit(tmp_path)
    model = expert("zero")
    assert start_expert(model, folder, "zero").format == "diffusers_dit"
    sd = _from_diffusers(read_state(folder)[0], pixart=False)
    sd["pos_embed"] = torch.from_numpy(dit_pos_embed(D, SIZE // P)).float()[None]
    x, t = torch.randn(2, C, SIZE, SIZE), torch.tensor([5.0, 700.0])
    with torch.no_grad():
        ref = dit_reference(sd, x, t, torch.full((2,), 1000))[:, :C]
        ours = EPS_STEP.predictor(model)(x, t + 1, cond(model, 2))
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_diffusers_pixart_folder_reproduces_diffusers_forward(tmp_path):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(6)
    m = PixArtTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=D // HEADS,
                                 in_channels=C, out_channels=2 * C, num_layers=DEPTH,
                                 sample_size=SIZE, patch_size=P, cross_attention_dim=D,
                                 caption_channels=16)
    with torch.no_grad():
        for param in m.parameters():
            param.normal_(0, 0.1)
    m.eval().save_pretrained(tmp_path / "pixart")
    model = expert("single")
    assert start_expert(model, str(tmp_path / "pixart"), "single").format == "diffusers_pixart"
    x, t = torch.randn(2, C, SIZE, SIZE), torch.tensor([5, 700])
    tokens, mask = _tokens()
    with torch.no_grad():
        ref = m(x, encoder_hidden_states=tokens, timestep=t, encoder_attention_mask=mask.long(),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :C]
        ours = EPS_STEP.predictor(model.net)(x, t.float() + 1, {"tokens": tokens, "mask": mask})
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def _exported_expert(directory, adaln="single", objective="ddpm_eps"):
    torch.manual_seed(7)
    model = expert(adaln)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.05)
    os.makedirs(directory, exist_ok=True)
    save_weights(os.path.join(directory, "weights.safetensors"), model.exported_state())
    desc = {"expert_id": "c0-ddpm-test", "objective": objective, "schedule": "linear",
            "architecture": "DiT-T/2", "adaln": adaln, "text": TEXT}
    with open(os.path.join(directory, "expert.json"), "w") as f:
        json.dump(desc, f)
    return model


def test_hdd_ray_expert_folder_and_file_start_its_fine_tuning_exactly(tmp_path):
    """Our own exported expert (folder, or its safetensors beside expert.json): the network
    and the learned text encoder carry over; the network's description comes from the JSON."""
    original = _exported_expert(tmp_path / "c0")
    for path in (tmp_path / "c0", tmp_path / "c0" / "weights.safetensors"):
        model = expert("single")
        ckpt = start_expert(model, str(path), "single")
        assert ckpt.format == "hdd_ray"
        assert ckpt.network == NetworkSpec("eps", "linear", "native")
        x, t = torch.randn(2, C, SIZE, SIZE), torch.tensor([10.0, 900.0])
        with torch.no_grad():
            c = cond(original, 2)
            assert torch.equal(model(x, t, c), original(x, t, c))


def test_adaln_single_checkpoint_cannot_start_an_adaln_zero_expert(tmp_path):
    _exported_expert(tmp_path / "c0", adaln="single")
    with pytest.raises(WeightsMismatch, match="experts.adaln=single"):
        start_expert(expert("zero"), str(tmp_path / "c0"), "zero")


def test_dit_into_adaln_single_uses_the_mapping(dit_file):
    model = expert("single")
    start_expert(model, dit_file, "single")  # the documented approximation, with a warning
    sd = dit_state()
    assert torch.equal(model.net.blocks[2].mlp.fc1.weight, sd["blocks.2.mlp.fc1.weight"])
    mean = torch.stack([sd[f"blocks.{i}.adaLN_modulation.1.weight"] for i in range(DEPTH)]).mean(0)
    assert torch.allclose(model.net.t_block[1].weight, mean)


def test_fit_names_the_first_mismatched_key_and_both_shapes(tmp_path):
    torch.save(dit_state(width=64), tmp_path / "wide.pt")
    ckpt = read_checkpoint(str(tmp_path / "wide.pt"), meta=True)
    model = expert("zero")
    with pytest.raises(WeightsMismatch) as err:
        fit_state(ckpt, model.net.state_dict(), "zero", model="DiT-T/2")
    assert str(err.value) == ("x_embedder.weight has shape [64, 4, 2, 2] in the dit checkpoint, "
                              "DiT-T/2 needs [96, 4, 2, 2]")


# ------------------------------------------------------------------ the campaign: ids, checks, config


def _cfg(tmp_path, *overrides: str):
    from hdd_ray.config import load_config

    return load_config(overrides=[f"root={tmp_path / 'root'}", "experts.model=DiT-T/2",
                                  "tracking.enabled=false", *overrides])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def _bad_files(tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (path, what its one line says)."""
    d = tmp_path / "bad"
    d.mkdir()
    (d / "notes.pt").write_text("not a checkpoint\n")
    torch.save(dit_state(channels=1), d / "whole.pt")
    data = (d / "whole.pt").read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"w": torch.zeros(2), "hook": _Evil()}, d / "pickled.pt")
    torch.save(dit_state(width=64, channels=1), d / "wide.pt")
    torch.save({"encoder.weight": torch.zeros(2, 2)}, d / "other.pt")
    return {
        "text": (str(d / "notes.pt"), "not a checkpoint"),
        "truncated": (str(d / "truncated.pt"), "truncated or damaged"),
        "pickled": (str(d / "pickled.pt"), "holds pickled objects other than tensors (posix.system)"),
        "shapes": (str(d / "wide.pt"), "x_embedder.weight has shape [64, 1, 2, 2] in the dit "
                                       "checkpoint, DiT-T/2 needs [96, 1, 2, 2]"),
        "layout": (str(d / "other.pt"), "not a known checkpoint"),
    }


def test_each_bad_file_gets_one_line_naming_the_key_before_ray(tmp_path):
    from hdd_ray.errors import ConfigError
    from hdd_ray.training.starts import check_campaign_starts

    for name, (path, says) in _bad_files(tmp_path).items():
        cfg = _cfg(tmp_path, f"experts.init={path}")
        with pytest.raises(ConfigError) as err:
            check_campaign_starts(cfg)
        line = str(err.value)
        assert line.startswith(f"experts.init='{path}'") and says in line, (name, line)
        assert "\n" not in line, name
    with pytest.raises(ConfigError, match=r"^experts.init='/nowhere/x.pt': no such file"):
        check_campaign_starts(_cfg(tmp_path, "experts.init=/nowhere/x.pt"))
    os.environ["HDD_RAY_WEIGHTS"] = str(tmp_path / "weights")
    try:
        with pytest.raises(ConfigError, match=r"^experts.init='DiT-XL-2-256': .*"
                                              r"DiT-XL-2-256x256.pt does not exist; nothing is "
                                              r"downloaded at run time: fetch it once from https"):
            check_campaign_starts(_cfg(tmp_path, "experts.init=DiT-XL-2-256"))
    finally:
        del os.environ["HDD_RAY_WEIGHTS"]
    good = str(tmp_path / "bad" / "whole.pt")
    check_campaign_starts(_cfg(tmp_path, f"experts.init={good}", "experts.adaln=zero"))


def test_the_job_refuses_a_bad_init_in_one_line_before_ray(tmp_path, capsys):
    import importlib
    import sys

    path, _ = _bad_files(tmp_path)["shapes"]
    job = importlib.import_module("jobs.train_all_experts")

    def ray_up() -> bool:  # the session's shared instance may already run (other tests)
        ray = sys.modules.get("ray")
        return ray is not None and ray.is_initialized()

    before = ray_up()
    code = job.main([f"root={tmp_path / 'root'}", "experts.model=DiT-T/2",
                     "tracking.enabled=false", f"experts.init={path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: experts.init=")
    assert ray_up() == before  # the job started no Ray instance
    assert not (tmp_path / "root").exists()  # nor prepared (or wrote) anything


def test_the_init_enters_the_identity_by_content_and_the_description(tmp_path):
    import shutil

    from hdd_ray.campaign import expert_id, expert_identity
    from hdd_ray.config import resolve_experts
    from hdd_ray.training.jobs import expert_job

    torch.save(dit_state(channels=1), tmp_path / "a.pt")
    torch.save(dit_state(seed=9, channels=1), tmp_path / "b.pt")
    (tmp_path / "moved").mkdir()
    shutil.copy(tmp_path / "a.pt", tmp_path / "moved" / "a.pt")
    manifest = {"clusters": [{"cluster": 1, "count": 1, "hash": "h", "shards": []}]}

    def ident(*overrides: str) -> str:
        cfg = _cfg(tmp_path, "experts.adaln=zero", *overrides)
        return expert_id(cfg, resolve_experts(cfg)[1], manifest)

    a = ident(f"experts.init={tmp_path / 'a.pt'}")
    assert a.startswith("c1-fm-") and a == ident(f"experts.init={tmp_path / 'moved' / 'a.pt'}")
    assert a == ident(f"experts.init=file://{tmp_path / 'a.pt'}")  # a URI: read, hashed alike
    assert a != ident(f"experts.init={tmp_path / 'b.pt'}") != ident()
    assert a != ident(f"experts.init={tmp_path / 'a.pt'}", "experts.init_mode=paper")
    assert a != ident(f"experts.init={tmp_path / 'a.pt'}", "sampling.conversion.x0_clamp=0.5")
    scratch = _cfg(tmp_path, "experts.list=[{cluster: 1, init: none}]",
                   f"experts.init={tmp_path / 'a.pt'}")
    assert expert_id(scratch, resolve_experts(scratch)[1], manifest) == \
        expert_id(_cfg(tmp_path), resolve_experts(_cfg(tmp_path))[1], manifest)
    cfg = _cfg(tmp_path, "experts.adaln=zero", f"experts.init={tmp_path / 'a.pt'}")
    e = resolve_experts(cfg)[1]
    identity = expert_identity(cfg, e, manifest)
    assert identity["init"]["format"] == "dit" and "path" not in identity["init"]
    assert identity["network"] == {"parameterization": "eps", "schedule": "linear",
                                   "time": "ddpm_step"}
    job = expert_job(cfg, e, manifest)
    import hashlib

    sha = hashlib.sha256((tmp_path / "a.pt").read_bytes()).hexdigest()
    assert job.describe["init"] == {"path": str(tmp_path / "a.pt"), "format": "dit",
                                    "sha256": sha, "mode": "exact"}
    assert job.describe["network"]["time"] == "ddpm_step" and job.describe["adaln"] == "zero"
    assert job.settings.start["conversion"] == job.describe["conversion"] is not None


def test_network_resolution_follows_the_objective_the_mode_and_the_config(tmp_path):
    from hdd_ray.campaign import expert_start
    from hdd_ray.config import resolve_experts

    torch.save(dit_state(channels=1), tmp_path / "a.pt")
    init = f"experts.init={tmp_path / 'a.pt'}"

    def network(*overrides: str, cluster: int = 1) -> NetworkSpec:
        cfg = _cfg(tmp_path, "experts.adaln=zero", "experts.ddpm_clusters=[0]", *overrides)
        return expert_start(cfg, resolve_experts(cfg)[cluster]).network

    assert network() == NetworkSpec()  # scratch: the objective's own
    assert network(init) == DDPM_CHECKPOINT  # exact: the checkpoint's, converted in the loss
    assert network(init, "experts.init_mode=paper") == NetworkSpec("velocity", None, "paper")
    assert network(init, "experts.network.parameterization=velocity") == NetworkSpec()
    # a DDPM expert on the cosine schedule keeps the DiT's time, not its schedule (a warning)
    assert network(init, "experts.schedule=cosine", cluster=0) == \
        NetworkSpec("eps", "cosine", "ddpm_step")
    assert network("experts.network.parameterization=x0",
                   "experts.network.schedule=cosine") == NetworkSpec("x0", "cosine")


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_digit_shard(str(tmp_path_factory.mktemp("shards") / "shard-000000.tar"),
                             3, 32, "a three")


def test_a_run_starts_from_its_init_and_resumes_without_reading_it_again(tmp_path, shard):
    """The loop loads the init into a new run only: a run resumed after the file is gone ends
    bit-identical to one trained straight; a file changed since the launch is refused."""
    from dataclasses import asdict

    from hdd_ray.campaign import expert_start
    from hdd_ray.config import resolve_experts
    from hdd_ray.training.loop import LocalHooks, run_loop
    from hdd_ray.training.settings import RunSettings

    path = tmp_path / "dit.pt"
    torch.save(dit_state(channels=1), path)
    cfg = _cfg(tmp_path, f"experts.init={path}", "experts.adaln=zero",
               "experts.ddpm_clusters=[]")
    e = resolve_experts(cfg)[0]
    start = expert_start(cfg, e)

    def settings(steps: int) -> RunSettings:
        train = dict(e.train, steps=steps, checkpoint_every=3, batch_size=8)
        return RunSettings.from_dict({
            "kind": "expert", "expert": asdict(e), "train": train, "image_size": 8,
            "channels": 1, "shards": [shard], "torch_threads": 1,
            "start": {"init": start.init, "mode": start.mode,
                      "network": start.network.as_dict(), "conversion": start.conversion}})

    straight, split = LocalHooks(str(tmp_path / "a")), LocalHooks(str(tmp_path / "b"))
    first = run_loop(settings(6), straight)
    assert math.isfinite(first["loss"])
    run_loop(settings(3), split)
    torch.save(dit_state(seed=5, channels=1), path)  # changed: a resume never reads it
    run_loop(settings(6), split)
    a, b = straight.load_state(), split.load_state()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    with pytest.raises(WeightsMismatch, match="changed since the launch"):
        run_loop(settings(6), LocalHooks(str(tmp_path / "c")))


def test_router_init_is_a_finished_router_checked_before_ray_and_in_its_id(tmp_path):
    from hdd_ray.campaign import router_id
    from hdd_ray.errors import ConfigError
    from hdd_ray.models.expert import RouterModel
    from hdd_ray.training.starts import check_campaign_starts

    folder = tmp_path / "router"
    folder.mkdir()
    save_weights(str(folder / "weights.safetensors"), RouterModel("router-T", 8, 1, 8).state_dict())
    (folder / "router.json").write_text("{}")
    check_campaign_starts(_cfg(tmp_path, f"router.init={folder}"))
    with pytest.raises(ConfigError, match=r"^router.init=.*net.head.weight has shape \[8, "):
        check_campaign_starts(_cfg(tmp_path, f"router.init={folder}", "clustering.k=4"))
    manifest = {"data_hash": "h", "clusters": []}
    assert router_id(_cfg(tmp_path, f"router.init={folder}"), manifest) != \
        router_id(_cfg(tmp_path), manifest)


def test_paper_campaign_starts_every_expert_from_the_dit_its_cluster_setup_fetches():
    from pathlib import Path

    from hdd_ray.config import load_config, resolve_experts

    repo = Path(__file__).resolve().parent.parent
    cfg = load_config(repo / "jobs" / "configs" / "paper-8x-xl.yaml")
    inits = {e.init for e in resolve_experts(cfg)}
    assert inits == {"/home/ray/weights/DiT-XL-2-256x256.pt"}
    assert cfg.experts.init_mode == "exact" and cfg.experts.adaln == "single"
    assert "start from scratch" not in (repo / "jobs" / "configs" / "paper-8x-xl.yaml").read_text()
    for cloud in ("aws", "gcp"):
        setup = (repo / "clusters" / f"{cloud}.yaml").read_text()
        assert "-P /home/ray/weights https://dl.fbaipublicfiles.com/DiT/models/" \
               "DiT-XL-2-256x256.pt" in setup
