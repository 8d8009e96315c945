"""Networks: DiT (AdaLN-Single + cross-attention), router, text encoders. CPU, a few seconds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hdd_ray.models import (
    DIT_SIZES,
    ROUTER_SIZES,
    DiT,
    HashTokenizer,
    LearnedTextEncoder,
    OpenCLIPTextEncoder,
    build_dit,
    build_router,
    build_text_encoder,
    count_parameters,
    register_tiny_open_clip_config,
)


def _cond(b: int, length: int, dim: int, n_valid: int | None = None, dtype=torch.float32):
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[:, : n_valid or length] = True
    return {"tokens": torch.randn(b, length, dim, dtype=dtype), "mask": mask}


def _perturb(model: nn.Module, std: float = 0.1) -> None:
    # Zero-initialised output and cross-attention layers would hide every dependency.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))


def _tiny(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    return build_dit("DiT-T/2", input_size=8, in_channels=1, text_dim=64)


# ---------------------------------------------------------------------------- DiT


@pytest.mark.parametrize("size", sorted(DIT_SIZES))
def test_every_dit_size_maps_input_shape_to_output_shape(size):
    if size == "DiT-T/2":
        model, x = _tiny(), torch.randn(3, 1, 8, 8)
        cond = _cond(3, 16, 64, n_valid=5)
    else:  # meta device: shapes and parameter counts without allocating memory
        with torch.device("meta"):
            model, x = build_dit(size, 32, 4, 768), torch.randn(2, 4, 32, 32)
            cond = _cond(2, 77, 768)
    out = model(x, torch.rand(x.shape[0], device=x.device) * 1000, cond)
    assert out.shape == x.shape


def test_small_real_model_with_two_channels_and_patch_4():
    torch.manual_seed(0)
    model = DiT(
        input_size=16,
        in_channels=2,
        patch_size=4,
        hidden_size=64,
        depth=2,
        num_heads=4,
        text_dim=32,
    )
    x = torch.randn(2, 2, 16, 16)
    out = model(x, torch.tensor([3.5, 999.25]), _cond(2, 7, 32, n_valid=3))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer, as DiT
    _perturb(model)
    out = model(x, torch.tensor([3.5, 999.25]), _cond(2, 7, 32, n_valid=3))
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_unpatchify_inverts_patch_layout():
    model = DiT(
        input_size=16, in_channels=2, patch_size=4, hidden_size=32, depth=1, num_heads=2, text_dim=8
    )
    x = torch.randn(2, 2, 16, 16)
    p = x.reshape(2, 2, 4, 4, 4, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 32)
    torch.testing.assert_close(model.unpatchify(p), x, rtol=0, atol=0)


def test_final_conv_starts_as_the_identity_and_learns_a_3x3_filter():
    """The demo's ``DiT-T/4``: U-ViT's 3x3 convolution after unpatchify, the identity at init
    (the model then computes exactly the plain DiT), a real filter once trained."""
    assert DIT_SIZES["DiT-T/4"]["final_conv"] and "final_conv" not in DIT_SIZES["DiT-T/2"]
    torch.manual_seed(0)
    plain = DiT(8, 1, 4, 96, 4, 4, 64)
    conv = build_dit("DiT-T/4", 8, 1, 64)
    _perturb(plain)
    missing = conv.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["final_conv.bias", "final_conv.weight"]
    x, t, cond = torch.randn(3, 1, 8, 8), torch.rand(3) * 1000, _cond(3, 8, 64)
    assert torch.allclose(conv(x, t, cond), plain(x, t, cond), atol=1e-6)
    with torch.no_grad():
        conv.final_conv.weight.add_(0.1 * torch.randn_like(conv.final_conv.weight))
    assert not torch.allclose(conv(x, t, cond), plain(x, t, cond), atol=1e-3)


def test_parameter_counts():
    tiny = _tiny()
    print(f"DiT-T/2 (8x8x1, text_dim 64): {count_parameters(tiny):,}")
    assert count_parameters(tiny) < 1_000_000
    with torch.device("meta"):
        xl_t5 = build_dit("DiT-XL/2", input_size=32, in_channels=4, text_dim=4096)
        xl_clip = build_dit("DiT-XL/2", input_size=32, in_channels=4, text_dim=768)
    n_t5, n_clip = count_parameters(xl_t5), count_parameters(xl_clip)
    print(f"DiT-XL/2 (32x32x4): text_dim 4096 {n_t5:,}; text_dim 768 {n_clip:,}")
    assert 500e6 < n_clip < n_t5 < 700e6  # PixArt-alpha reports ~0.6B


def test_adaln_single_has_one_shared_t_block_and_per_block_tables():
    model = _tiny()
    t_block_linears = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == 6 * model.hidden_size
    ]
    assert t_block_linears == ["t_block.1"]
    assert sum(1 for m in model.modules() if m.__class__.__name__ == "TimestepEmbedder") == 1
    for block in model.blocks:
        assert block.scale_shift_table.shape == (6, model.hidden_size)
        assert not any("adaLN" in name for name, _ in block.named_parameters())
    assert model.final_layer.scale_shift_table.shape == (2, model.hidden_size)


def test_timestep_embedding_accepts_non_integer_network_time():
    model = _tiny()
    _perturb(model)
    x, cond = torch.randn(2, 1, 8, 8), _cond(2, 16, 64)
    a = model(x, torch.tensor([500.0, 500.0]), cond)
    b = model(x, torch.tensor([500.25, 500.25]), cond)
    assert not torch.allclose(a, b)


def test_null_caption_ignores_tokens_and_real_caption_does_not():
    model = _tiny()
    _perturb(model)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 700.0])
    c1, c2 = _cond(2, 16, 64, n_valid=4), _cond(2, 16, 64, n_valid=9)
    drop = torch.ones(2, dtype=torch.bool)
    torch.testing.assert_close(
        model(x, t, {**c1, "drop": drop}), model(x, t, {**c2, "drop": drop}), rtol=0, atol=0
    )
    keep = torch.zeros(2, dtype=torch.bool)
    assert not torch.allclose(model(x, t, {**c1, "drop": keep}), model(x, t, {**c2, "drop": keep}))
    torch.testing.assert_close(model(x, t, {**c1, "drop": keep}), model(x, t, c1))
    # Dropping is per sample: sample 0 dropped, sample 1 still sees its caption.
    mixed = torch.tensor([True, False])
    out1, out2 = model(x, t, {**c1, "drop": mixed}), model(x, t, {**c2, "drop": mixed})
    torch.testing.assert_close(out1[0], out2[0], rtol=0, atol=0)
    assert not torch.allclose(out1[1], out2[1])


def test_padded_caption_positions_are_ignored():
    model = _tiny()
    _perturb(model)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 700.0])
    cond = _cond(2, 16, 64, n_valid=5)
    noisy = {**cond, "tokens": cond["tokens"].clone()}
    noisy["tokens"][:, 5:] = 1e3 * torch.randn(2, 11, 64)
    torch.testing.assert_close(model(x, t, cond), model(x, t, noisy))


def test_float64_forward():
    model = _tiny().double()
    _perturb(model)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    out = model(
        x, torch.tensor([0.5, 999.5], dtype=torch.float64), _cond(2, 16, 64, 3, torch.float64)
    )
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    router = build_router("router-T", 8, 1, 3).double()
    assert router(x, torch.tensor([1.0, 2.0], dtype=torch.float64)).dtype == torch.float64


def test_bf16_autocast_forward():
    model = _tiny()
    _perturb(model)
    x = torch.randn(2, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.tensor([0.5, 999.5]), _cond(2, 16, 64, 3))
        logits = build_router("router-T", 8, 1, 3)(x, torch.tensor([1.0, 2.0]))
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    assert logits.shape == (2, 3) and torch.isfinite(logits.float()).all()


def test_unknown_size_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"DiT-XL/2") as err:
        build_dit("DiT-XXL/2", 32, 4, 64)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"router-T"):
        build_router("router-Z", 8, 1, 2)


# ---------------------------------------------------------------------------- router


def test_router_logits_shape_and_dependence_on_x_t_and_t():
    torch.manual_seed(0)
    router = build_router("router-T", input_size=8, in_channels=1, num_experts=5)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 400.0, 999.0])
    logits = router(x, t)
    assert logits.shape == (3, 5)
    assert not torch.allclose(logits, router(torch.randn(3, 1, 8, 8), t))
    assert not torch.allclose(logits, router(x, t + 100.5))


def test_router_parameter_counts():
    n_tiny = count_parameters(build_router("router-T", 8, 1, 8))
    with torch.device("meta"):
        n_base = count_parameters(build_router("router-B", 32, 4, 8))
        out = build_router("router-B", 32, 4, 8)(torch.randn(2, 4, 32, 32), torch.rand(2))
    print(f"router-T (8x8x1, K=8): {n_tiny:,}; router-B (32x32x4, K=8): {n_base:,}")
    assert n_tiny < 300_000 and 80e6 < n_base < 100e6
    assert out.shape == (2, 8) and set(ROUTER_SIZES) >= {"router-T", "router-B"}


# ---------------------------------------------------------------------------- text


def test_hash_tokenizer_is_deterministic_with_pad_zero_and_nonempty_masks():
    tok = HashTokenizer(vocab_size=1024, max_len=4)
    ids, mask = tok(["A red Cat!", "a red cat", "", "one two three four five"])
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == (4, 4)
    assert torch.equal(ids[0], ids[1])  # case and punctuation do not matter
    assert mask.tolist()[:3] == [[True] * 3 + [False], [True] * 3 + [False], [True] + [False] * 3]
    assert mask[3].all()  # truncated to max_len
    assert torch.equal(mask, ids != 0) and int(ids.max()) < 1024
    # crc32, not Python's salted hash: fixed ids in every process.
    assert tok.word_id("cat") == 1 + 2656977832 % 1023


def test_learned_text_encoder_shapes_and_grad():
    enc = build_text_encoder("learned", vocab_size=128, max_len=8, dim=32, depth=2)
    assert isinstance(enc, LearnedTextEncoder) and enc.dim == 32
    out = enc.encode(["a photo of a dog", ""])
    assert out["tokens"].shape == (2, 8, 32) and out["mask"].sum(1).tolist() == [5, 1]
    out["tokens"].sum().backward()
    assert enc.token_embedding.weight.grad is not None
    with pytest.raises(ValueError, match="learned"):
        build_text_encoder("t5")


def test_open_clip_text_encoder_loads_local_checkpoint(tmp_path):
    import open_clip

    arch = register_tiny_open_clip_config()
    assert register_tiny_open_clip_config() == arch  # idempotent
    torch.manual_seed(0)
    reference = open_clip.create_model(arch, pretrained=None).eval()
    path = tmp_path / "tiny_clip.pt"
    torch.save(reference.state_dict(), path)

    enc = build_text_encoder("open_clip", arch=arch, pretrained=str(path))
    assert isinstance(enc, OpenCLIPTextEncoder) and enc.dim == 64
    assert not any(p.requires_grad for p in enc.parameters())
    assert not hasattr(enc, "visual")
    enc.train()
    assert not enc.training

    captions = ["a photo of a cat", ""]
    out = enc.encode(captions)
    ids = open_clip.get_tokenizer(arch)(captions)
    assert out["tokens"].shape == (2, 16, 64)
    assert torch.equal(out["mask"], ids != 0) and out["mask"].sum(1).tolist() == [7, 2]
    seen = []
    hook = reference.ln_final.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        reference.encode_text(ids)
    hook.remove()
    torch.testing.assert_close(out["tokens"], seen[0])

    # The encoder plugs straight into a DiT as its caption.
    dit = build_dit("DiT-T/2", 8, 1, enc.dim)
    assert dit(torch.randn(2, 1, 8, 8), torch.rand(2), out).shape == (2, 1, 8, 8)


def test_open_clip_missing_checkpoint_is_a_one_line_error(tmp_path):
    arch = register_tiny_open_clip_config()
    with pytest.raises(FileNotFoundError, match="no such file") as err:
        OpenCLIPTextEncoder(arch, pretrained=str(tmp_path / "missing.pt"))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="pretrained tag") as err:
        OpenCLIPTextEncoder(arch, pretrained="laion2b_nonexistent")
    assert "\n" not in str(err.value)


def test_registering_the_tiny_open_clip_configs_leaves_no_temporary_folder(tmp_path):
    """open_clip reads a config JSON from a folder; the folder is removed once it is read, so
    a job writes nothing outside its campaign root (a fresh process, TMPDIR = ``tmp_path``)."""
    import os
    import subprocess
    import sys

    code = ("import open_clip\n"
            "from hdd_ray.models.text import register_tiny_open_clip_config\n"
            "from hdd_ray.evaluation.reference_clip import register_reference_clip_config\n"
            "names = [register_tiny_open_clip_config(), register_reference_clip_config()]\n"
            "open_clip.add_model_config('/nonexistent')  # a later rescan keeps them\n"
            "assert all(n in open_clip.list_models() for n in names), names\n"
            "open_clip.create_model(names[1])\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   env={**os.environ, "TMPDIR": str(tmp_path)})
    assert not list(tmp_path.glob("hdd_ray_open_clip_*"))


def test_under_bf16_autocast_the_residual_stream_is_bf16_and_the_weights_stay_fp32():
    """On GPUs the loop trains under bf16 autocast: the fp32 position embedding and modulation
    tables are cast, not promoting the residual stream back to fp32 (twice the activation
    bytes); the parameters (the master weights the optimizer and EMA keep) stay fp32."""
    model = _tiny()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0])
    cond = {"tokens": torch.randn(2, 4, 64), "mask": torch.ones(2, 4, dtype=torch.bool)}
    streams: list[torch.dtype] = []
    for block in model.blocks:
        block.register_forward_hook(lambda _m, _i, out: streams.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, cond)
    assert streams and set(streams) == {torch.bfloat16}
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    streams.clear()
    assert model(x, t, cond).dtype == torch.float32 and set(streams) == {torch.float32}
