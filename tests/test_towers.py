"""Pretrained towers: OpenAI-tagged CLIP weights get QuickGELU on every path that loads them.

The paths are the clustering embedder, the frozen text encoder, the CLIP FID extractor and the
Judge's CLIP-score model (``hdd_ray.towers.open_clip_model``). Nothing is downloaded: a tiny
architecture gets a fake OpenAI-style tag in open_clip's pretrained registry, and open_clip's
download step is replaced by a local file holding that architecture's weights, so open_clip's
own code builds the model and loads those weights.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hdd_ray import towers
from hdd_ray.errors import PrepareError
from hdd_ray.evaluation import build_extractor
from hdd_ray.models import build_text_encoder
from hdd_ray.models.text import register_tiny_open_clip_config
from hdd_ray.prepare import build_embedder

TAG = "openai"  # open_clip's tag name for OpenAI's weights


def _activations(module: nn.Module) -> list[nn.Module]:
    from open_clip.transformer import QuickGELU

    return [m for m in module.modules() if isinstance(m, (nn.GELU, QuickGELU))]


def _assert_quick_gelu(module: nn.Module) -> None:
    from open_clip.transformer import QuickGELU

    acts = _activations(module)
    assert acts, "no activation found in the tower"
    assert all(isinstance(a, QuickGELU) for a in acts), {type(a).__name__ for a in acts}


@pytest.fixture
def openai_tag(tmp_path, monkeypatch):
    """A tiny CLIP with a fake ``openai`` tag (QuickGELU, like OpenAI's) served from a file.

    Returns ``(arch, state dict of the served weights)``.
    """
    import open_clip
    import open_clip.factory
    import open_clip.pretrained

    arch = register_tiny_open_clip_config()
    torch.manual_seed(0)
    state = open_clip.create_model(arch, force_quick_gelu=True).state_dict()
    path = tmp_path / "tiny-openai.pt"
    torch.save(state, path)
    tags = {TAG: {"url": "https://invalid.example/tiny-openai.pt", "quick_gelu": True},
            "plain": {"url": "https://invalid.example/tiny-plain.pt"}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, arch, tags)
    fetched = []

    def download_pretrained(cfg, *args, **kwargs):  # the only step that would use the network
        fetched.append(cfg["url"])
        return str(path)

    monkeypatch.setattr(open_clip.factory, "download_pretrained", download_pretrained)
    yield arch, state
    assert fetched, "the fake tag's weights were never requested"


def test_openai_tags_are_known_to_need_quick_gelu():
    assert towers.needs_quick_gelu("ViT-L-14", "openai")
    assert towers.needs_quick_gelu("ViT-B-32", "openai")
    assert not towers.needs_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")
    assert not towers.needs_quick_gelu("ViT-L-14", "/weights/vit_l14_openai.pt")  # a file
    assert not towers.needs_quick_gelu("ViT-L-14", None)


def test_open_clip_model_applies_quick_gelu_for_an_openai_tag(openai_tag):
    # the function the Judge builds its CLIP-score model with
    arch, state = openai_tag
    model = towers.open_clip_model(arch, TAG)
    _assert_quick_gelu(model.visual)
    _assert_quick_gelu(model.transformer)
    torch.testing.assert_close(model.state_dict()["visual.proj"], state["visual.proj"])
    # control: a tag trained with plain GELU keeps it, so the check above can fail
    plain = towers.open_clip_model(arch, "plain")
    assert all(type(a) is nn.GELU for a in _activations(plain))


def test_clustering_embedder_uses_quick_gelu_for_an_openai_tag(openai_tag):
    arch, _ = openai_tag
    emb = build_embedder("open_clip", 3, arch=arch, weights=TAG)
    _assert_quick_gelu(emb.model)


def test_text_encoder_uses_quick_gelu_for_an_openai_tag(openai_tag):
    arch, _ = openai_tag
    enc = build_text_encoder("open_clip", arch=arch, pretrained=TAG)
    _assert_quick_gelu(enc.transformer)


def test_fid_clip_extractor_uses_quick_gelu_for_an_openai_tag(openai_tag):
    arch, _ = openai_tag
    extractor = build_extractor("clip", weights=TAG, arch=arch)
    _assert_quick_gelu(extractor.visual)
    assert extractor.name == f"clip:{arch}:{TAG}"


def test_weights_errors_name_the_config_key(tmp_path):
    arch = register_tiny_open_clip_config()
    missing = str(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match=r"^evaluation\.clip_weights='.*': no such file"):
        towers.open_clip_model(arch, missing, weights_key="evaluation.clip_weights")
    with pytest.raises(ValueError, match=r"^experts\.text\.arch='nope': unknown open_clip"):
        towers.open_clip_model("nope", None, arch_key="experts.text.arch")
    with pytest.raises(PrepareError) as err:
        build_embedder("open_clip", 3, arch=arch, weights="no-such-tag")
    assert str(err.value).startswith("clustering.embedder_weights='no-such-tag': not a local file")
    assert "\n" not in str(err.value)


def test_only_towers_builds_pretrained_models():
    """Every pretrained tower goes through ``hdd_ray.towers`` (the Judge's CLIP included)."""
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "hdd_ray"
    # reference_clip builds a fresh, untrained CLIP: no weights to load
    allowed = {package / "towers.py", package / "evaluation" / "reference_clip.py"}
    calls = ("open_clip.create_model", "timm.create_model", "create_model_and_transforms")
    offenders = [
        f"{path.relative_to(package)}: {call}"
        for path in sorted(package.rglob("*.py")) if path not in allowed
        for call in calls if call in path.read_text()
    ]
    assert not offenders, offenders


def test_prepare_does_not_reuse_embeddings_made_without_quick_gelu(tmp_path):
    from hdd_ray.config import load_config
    from hdd_ray.prepare.stage import _embed_settings

    def settings(weights):
        return _embed_settings(load_config(None, [
            f"root={tmp_path}", "clustering.embedder=open_clip", "clustering.embedder_arch=ViT-L-14",
            f"clustering.embedder_weights={weights}",
        ]))

    assert settings("openai")["quick_gelu"] is True  # a new key: the old fingerprint misses
    assert "quick_gelu" not in settings("laion2b_s32b_b82k")  # other fingerprints unchanged
