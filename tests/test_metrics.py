"""Metrics: FID (checked against scipy; cached reference statistics, floor), CLIP score judged by
the demo's reference CLIP, intra-prompt diversity, and extractors loading real weights from local
files.

Everything runs offline on sklearn's digits (the demo corpus) with weights the tests make.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hdd_ray.campaign import CampaignPaths
from hdd_ray.corpus import demo_caption
from hdd_ray.evaluation import (
    ReferenceStats,
    build_extractor,
    clip_score,
    digit_of_caption,
    diversity,
    extract_features,
    fid,
    fid_floor,
    get_reference_clip,
    images_hash,
    lpips_backbone_path,
    reference_stats,
    train_reference_clip,
)

NOISE_LADDER = (1.0, 0.5, 0.25, 0.1)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: these models are tiny, and on two cores shared with other test
    processes a second thread made small matmuls several times slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> dict:
    """The demo corpus in memory: images in [-1, 1], captions as the corpus writes them, and a
    seeded train / held-out split (the prepare stage's split is per cluster; any split will do)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0 * 2.0 - 1.0
    labels = [int(v) for v in data.target]
    keys = [f"digit-{i:06d}" for i in range(len(labels))]
    captions = [demo_caption(lab, key) for lab, key in zip(labels, keys, strict=True)]
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)).tolist()
    train, heldout = perm[:1597], perm[1597:]
    return {
        "train": images[train],
        "train_captions": [captions[i] for i in train],
        "heldout": images[heldout],
        "heldout_captions": [captions[i] for i in heldout],
        "heldout_labels": [labels[i] for i in heldout],
        "heldout_keys": [keys[i] for i in heldout],
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits) -> dict:
    """The demo's reference CLIP, trained once for this module into a campaign root."""
    root = str(tmp_path_factory.mktemp("campaign"))
    model, tokenizer, info = get_reference_clip(
        root,
        digits["train"],
        digits["train_captions"],
        digits["heldout"],
        digits["heldout_captions"],
        data_hash=images_hash(digits["train"]),
    )
    print(
        f"\nreference CLIP: {info['train_seconds']:.1f} s for {info['steps']} steps, held-out "
        f"retrieval {info['retrieval_top1']:.3f} (chance {info['retrieval_chance']:.3f}, "
        f"{int(info['num_candidates'])} captions)"
    )
    return {"root": root, "model": model, "tokenizer": tokenizer, "info": info}


@pytest.fixture(scope="module")
def clip_extractor(reference):
    return build_extractor("clip", clip_model=reference["model"])


def _noised(images: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + sigma * noise).clamp(-1.0, 1.0)


def _frechet_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's sqrtm, as an independent check of the torchmetrics path."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


# ------------------------------------------------------------------------------------------ FID


def test_fid_is_zero_against_itself_and_large_against_noise(digits, clip_extractor):
    real = digits["train"]
    self_fid = fid(real, real, clip_extractor)
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(2)) * 2 - 1
    noise_fid = fid(noise, real, clip_extractor)
    feats_real = extract_features(clip_extractor, real).double().numpy()
    feats_noise = extract_features(clip_extractor, noise).double().numpy()
    expected = _frechet_numpy(feats_noise, feats_real)
    print(f"\nCLIP-FID self {self_fid:.2e}, uniform noise {noise_fid:.2f} (scipy {expected:.2f})")
    assert clip_extractor.name.startswith("clip:reference-")
    assert abs(self_fid) < 1e-6 * noise_fid
    assert noise_fid > 1.0
    assert noise_fid == pytest.approx(expected, rel=1e-4)


def test_fid_falls_monotonically_as_samples_approach_the_reference(digits, clip_extractor):
    real = digits["train"]
    stats = reference_stats(real, clip_extractor, data_hash=images_hash(real))
    ladder = [fid(_noised(real, sigma), stats, clip_extractor) for sigma in NOISE_LADDER]
    floor = fid_floor(digits["heldout"], stats, clip_extractor)
    print(
        "\nCLIP-FID at noise sigma "
        + ", ".join(f"{s}: {v:.3f}" for s, v in zip(NOISE_LADDER, ladder, strict=True))
        + f"; floor (held-out vs train, N={digits['heldout'].shape[0]}): {floor:.3f}"
    )
    assert all(a > b for a, b in zip(ladder, ladder[1:], strict=False)), ladder
    assert 0 < floor < ladder[0]


def test_reference_stats_are_cached_and_keyed_by_data_hash(tmp_path, digits, clip_extractor):
    real = digits["train"]
    cache = CampaignPaths(str(tmp_path)).reference_stats
    first = reference_stats(real, clip_extractor, "hash-a", cache_dir=cache)
    assert not first.loaded and first.path is not None and os.path.isfile(first.path)
    mtime = os.stat(first.path).st_mtime_ns

    def must_not_load() -> torch.Tensor:
        raise AssertionError("cached reference statistics were recomputed")

    second = reference_stats(must_not_load, clip_extractor, "hash-a", cache_dir=cache)
    assert second.loaded and second.path == first.path
    assert os.stat(first.path).st_mtime_ns == mtime
    assert torch.equal(second.features_cov_sum, first.features_cov_sum)
    assert second.num_samples == real.shape[0]

    other = reference_stats(real[:500], clip_extractor, "hash-b", cache_dir=cache)
    assert not other.loaded and other.path != first.path
    assert len(os.listdir(cache)) == 2

    fake = _noised(real[:300], 0.3)
    assert fid(fake, second, clip_extractor) == pytest.approx(fid(fake, real, clip_extractor))
    with pytest.raises(ValueError, match="computed with"):
        fid(fake, ReferenceStats(**{**second.__dict__, "extractor": "inception"}), clip_extractor)


# ------------------------------------------------------------------------- reference CLIP


def test_clip_score_prefers_matching_captions(digits, reference):
    images, keys = digits["heldout"], digits["heldout_keys"]
    # The caption of a different digit, in the phrasing the corpus uses for that sample.
    shift = torch.randint(1, 10, (len(keys),), generator=torch.Generator().manual_seed(3)).tolist()
    wrong = [
        demo_caption((lab + s) % 10, key)
        for lab, s, key in zip(digits["heldout_labels"], shift, keys, strict=True)
    ]
    model, tokenizer, info = reference["model"], reference["tokenizer"], reference["info"]
    matched = clip_score(images, digits["heldout_captions"], model, tokenizer)
    mismatched = clip_score(images, wrong, model, tokenizer)
    print(
        f"\nCLIP score on held-out digits: matched {matched:.2f}, mismatched {mismatched:.2f}; "
        f"retrieval top-1 {info['retrieval_top1']:.3f} (chance {info['retrieval_chance']:.3f})"
    )
    assert matched > mismatched + 10.0
    assert info["retrieval_top1"] >= 0.8
    assert info["retrieval_top1"] > 5 * info["retrieval_chance"]


def test_reference_clip_is_cached_per_campaign(digits, reference):
    args = (digits["train"], digits["train_captions"], digits["heldout"], digits["heldout_captions"])
    model, _, info = get_reference_clip(
        reference["root"], *args, data_hash=images_hash(digits["train"])
    )
    assert info["loaded"] and not reference["info"]["loaded"]
    assert info["weights_sha256"] == reference["info"]["weights_sha256"]
    for (name, a), b in zip(model.state_dict().items(), reference["model"].state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    for name in ("weights.safetensors", "reference_clip.json"):
        assert os.path.isfile(os.path.join(reference["root"], "evaluation", "reference_clip", name))


def test_reference_clip_training_is_deterministic_for_a_seed(digits):
    images, captions = digits["train"][:256], digits["train_captions"][:256]
    a, _, loss_a = train_reference_clip(images, captions, steps=3, batch_size=32, seed=5)
    b, _, loss_b = train_reference_clip(images, captions, steps=3, batch_size=32, seed=5)
    c, _, _ = train_reference_clip(images, captions, steps=3, batch_size=32, seed=6)
    assert loss_a == loss_b
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.visual.proj, c.visual.proj)


def test_digit_of_caption_reads_every_demo_phrasing():
    for label in range(10):
        for i in range(20):
            assert digit_of_caption(demo_caption(label, f"digit-{i:06d}")) == str(label)
    assert digit_of_caption("A red Bicycle") == "a red bicycle"


# ------------------------------------------------------------------------------ diversity


def test_diversity_is_zero_for_identical_samples_and_positive_otherwise(
    digits, clip_extractor, tmp_path, monkeypatch
):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # a hub cache with no AlexNet
    assert lpips_backbone_path() is None
    same = [digits["train"][i : i + 1].repeat(6, 1, 1, 1) for i in range(4)]
    varied = [digits["train"][i : i + 6] for i in range(0, 24, 6)]
    name, value_same = diversity(same, extractor=clip_extractor)
    _, value_varied = diversity(varied, extractor=clip_extractor)
    print(f"\nfeature diversity: identical {value_same:.2e}, varied {value_varied:.3f}")
    assert name == "feature_diversity"
    assert value_same == pytest.approx(0.0, abs=1e-6)
    assert value_varied > 0.1
    assert diversity(same)[0] == "pixel_diversity" and diversity(same)[1] == 0.0
    assert diversity(varied)[1] > 0.0


def test_diversity_uses_lpips_with_a_local_backbone_file(digits, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    backbone = tmp_path / "alexnet-random.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), backbone)
    hub_before = torch.hub.get_dir()
    same = [digits["train"][:1].repeat(3, 1, 1, 1)]
    varied = [digits["train"][:3], digits["train"][3:6]]
    name, value_same = diversity(same, lpips_weights=str(backbone))
    _, value_varied = diversity(varied, lpips_weights=str(backbone))
    assert name == "lpips_diversity"
    assert value_same == pytest.approx(0.0, abs=1e-6) and value_varied > 0.0
    assert torch.hub.get_dir() == hub_before
    with pytest.raises(FileNotFoundError, match="lpips_weights"):
        diversity(same, lpips_weights=str(tmp_path / "missing.pth"))


class _Payload:
    """A pickled object whose unpickling creates a file: what a hostile .pth could run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_lpips_backbone_loads_weights_only_from_pth_or_safetensors(digits, tmp_path, monkeypatch):
    import torchvision
    import torchvision.models._api as tv_api

    from hdd_ray.errors import WeightsMismatch

    def no_hub(*args, **kwargs):
        raise AssertionError("torch hub (download, weights_only=False) must not be used")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_hub)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_hub)
    varied = [digits["train"][:3], digits["train"][3:6]]
    # one file with torchvision's whole layout (classifier included); the others hold only the
    # ``features.*`` LPIPS reads (the classifier is 95 % of AlexNet's 244 MB)
    torch.manual_seed(0)
    full = torchvision.models.alexnet(weights=None).state_dict()
    torch.manual_seed(1)
    other = {f"features.{k}": v for k, v in torchvision.models.alexnet(weights=None)
             .features.state_dict().items()}
    states = [{k: v for k, v in full.items() if k.startswith("features.")}, other]
    torch.save(full, tmp_path / "a.pth")
    save_file({k: v.contiguous() for k, v in states[0].items()}, tmp_path / "a.safetensors")
    torch.save(states[1], tmp_path / "b.pth")
    value_pth = diversity(varied, lpips_weights=str(tmp_path / "a.pth"))[1]
    value_st = diversity(varied, lpips_weights=str(tmp_path / "a.safetensors"))[1]
    value_other = diversity(varied, lpips_weights=str(tmp_path / "b.pth"))[1]
    assert value_pth == pytest.approx(value_st, rel=1e-6)  # the file's weights, either format
    assert abs(value_pth - value_other) > 1e-4  # ... and not a random initialisation

    marker = tmp_path / "payload-ran"
    hostile = tmp_path / "hostile.pth"
    torch.save({**states[0], "extra": _Payload(str(marker))}, hostile)
    with open(hostile, "rb") as f:  # the payload is real: a plain unpickle runs it
        torch.load(f, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(WeightsMismatch, match="not a plain tensor file, refused") as info:
        diversity(varied, lpips_weights=str(hostile))
    assert "\n" not in str(info.value) and not marker.exists()

    torch.save({"features.0.weight": torch.zeros(3, 3)}, tmp_path / "not-alexnet.pth")
    with pytest.raises(WeightsMismatch, match="not AlexNet weights"):
        diversity(varied, lpips_weights=str(tmp_path / "not-alexnet.pth"))


def test_grids_enlarge_only_small_images_and_draw_every_prompt_on_pages(tmp_path, caplog):
    import io

    from PIL import Image

    from hdd_ray.evaluation.grids import MIN_TILE, ROWS_PER_PAGE, page_path, save_grid

    def size(png: bytes) -> tuple[int, int]:
        return Image.open(io.BytesIO(png)).size

    (digits,) = save_grid(str(tmp_path / "d.png"), torch.zeros(2, 1, 8, 8), ["a", "a"],
                          per_row=2)
    (large,) = save_grid(str(tmp_path / "l.png"), torch.zeros(1, 3, 256, 256), ["a"], per_row=1)
    label = size(large)[0] - 258
    assert size(digits) == (label + 2 * (MIN_TILE + 2), MIN_TILE + 2)  # 8 px enlarged 4x
    assert size(large)[1] == 256 + 2  # 256 px at its size, not 1024
    prompts = [f"prompt {i}" for i in range(2 * ROWS_PER_PAGE + 1)]
    path = str(tmp_path / "g.png")
    pages = save_grid(path, torch.zeros(len(prompts), 1, 8, 8), prompts, per_row=1)
    assert len(pages) == 3 and size(pages[2])[1] == MIN_TILE + 2  # the last prompt, alone
    assert [Path(page_path(path, i)).read_bytes() for i in range(3)] == pages
    assert page_path(path, 2) == str(tmp_path / "g-p3.png")
    with caplog.at_level(logging.INFO, logger="hdd_ray"):
        assert len(save_grid(path, torch.zeros(len(prompts), 1, 8, 8), prompts, per_row=1,
                             max_pages=1)) == 1
    assert f"the first {ROWS_PER_PAGE} of {len(prompts)} prompts" in caplog.text


# ------------------------------------------------------------------------------ extractors


def test_inception_without_weights_names_the_config_key(tmp_path):
    for weights, error in ((None, ValueError), (str(tmp_path / "nope.pth"), FileNotFoundError)):
        with pytest.raises(error) as excinfo:
            build_extractor("inception", weights=weights)
        message = str(excinfo.value)
        assert "evaluation.extractor_weights" in message and "\n" not in message
    with pytest.raises(ValueError, match="evaluation.fid_extractor"):
        build_extractor("vgg")


def test_inception_loads_a_local_weights_file(tmp_path, monkeypatch, digits):
    pytest.importorskip("torch_fidelity")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torchmetrics.image.fid import NoTrainInceptionV3

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with monkeypatch.context() as patch:  # random init: skip loading the (empty) state dict
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        state = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(empty)).state_dict()
    weights = tmp_path / "pt_inception-random.pth"
    torch.save(state, weights)
    extractor = build_extractor("inception", weights=str(weights))
    loaded = extractor.inception.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    feats = extractor(digits["train"][:2])
    assert extractor.name == "inception" and feats.shape == (2, extractor.num_features) == (2, 2048)


def test_dinov2_extractor_loads_a_local_weights_file(tmp_path, digits):
    import timm

    arch = "vit_small_patch14_dinov2"
    torch.manual_seed(0)
    state = timm.create_model(arch, pretrained=False, num_classes=0).state_dict()
    weights = tmp_path / "dinov2-random.safetensors"
    save_file(state, str(weights))
    extractor = build_extractor("dinov2", weights=str(weights), arch=arch)
    loaded = extractor.model.state_dict()
    assert torch.equal(loaded["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    assert extractor.name == f"dinov2:{arch}:dinov2-random"
    feats = extractor(digits["train"][:2])
    assert feats.shape == (2, extractor.num_features) == (2, 384)
    with pytest.raises(ValueError, match="evaluation.extractor_weights"):
        build_extractor("dinov2", arch=arch)


def test_clip_extractor_loads_a_local_weights_file_and_takes_gray_or_rgb(tmp_path, digits):
    import open_clip

    from hdd_ray.models.text import register_tiny_open_clip_config

    arch = register_tiny_open_clip_config()
    torch.manual_seed(0)
    state = open_clip.create_model(arch).state_dict()
    weights = tmp_path / "tiny-clip-random.safetensors"
    save_file(state, str(weights))
    extractor = build_extractor("clip", weights=str(weights), arch=arch)
    assert extractor.name == f"clip:{arch}:tiny-clip-random"
    assert torch.equal(extractor.visual.proj, state["visual.proj"])
    gray = digits["train"][:3]
    feats = extractor(gray)
    assert feats.shape == (3, extractor.num_features) == (3, 32)
    torch.testing.assert_close(extractor(gray.repeat(1, 3, 1, 1)), feats)
    with pytest.raises(ValueError, match="evaluation.extractor_weights"):
        build_extractor("clip", arch=arch)
    with pytest.raises(ValueError, match="not a local file nor an open_clip tag"):
        build_extractor("clip", weights="no-such-tag", arch="ViT-B-32")
