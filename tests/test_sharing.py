"""Sharing a mixture without a campaign or Ray: the folder's towers (open_clip text-tower files,
referenced by content or copied), the ``champion`` alias of a real MLflow (sqlite) registry, and
``sweep.register_as``. The export of a trained campaign, its MLflow model and a damaged folder
are tested on tests/test_training.py's trained campaign."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from hdd_ray.config import load_config
from hdd_ray.errors import ConfigError, MixtureError


def _campaign(tmp_path: Path, text: dict, *overrides: str, size: int = 8, channels: int = 1,
              latents: dict | None = None) -> tuple[list[str], str, object, list]:
    """Two untrained experts with ``text`` and a router (inputs ``channels`` x ``size``²; in the
    latent space of ``latents``), saved as finished runs: ``(expert run directories, router run
    directory, config, [experts as (model, card), router])``."""
    from hdd_ray.campaign import file_sha256
    from hdd_ray.models.expert import ExpertModel, RouterModel, save_weights

    cfg = load_config(overrides=["clustering.k=2", "clustering.fine_centroids=4",
                                 "experts.ddpm_clusters=[0]", "sampling.steps=1",
                                 "sampling.sampler=euler", "sampling.k=1",
                                 f"root={tmp_path / 'root'}", *overrides])
    shape = {"image_size": size, "channels": channels, **({"latents": latents} if latents else {})}
    torch.manual_seed(0)
    dirs, experts = [], []
    for c, objective in enumerate(("ddpm_eps", "fm_velocity")):
        model = ExpertModel("DiT-T/4", text, size, channels).eval()
        model.set_data_mean(torch.zeros(1, channels, size, size))  # as training records it
        d = tmp_path / "runs" / f"c{c}"
        d.mkdir(parents=True)
        save_weights(str(d / "weights.safetensors"), model.exported_state())
        desc = {"cluster": c, "expert_id": f"c{c}-test", "objective": objective,
                "schedule": "cosine" if c == 0 else None, "architecture": "DiT-T/4",
                "text": text, **shape,
                "weights_sha256": file_sha256(str(d / "weights.safetensors"))}
        (d / "expert.json").write_text(json.dumps(desc))
        dirs.append(str(d))
        experts.append((model, desc))
    router = RouterModel("router-T", size, channels, 2).eval()
    r = tmp_path / "runs" / "router"
    r.mkdir()
    save_weights(str(r / "weights.safetensors"), router.exported_state())
    (r / "router.json").write_text(json.dumps({
        "router_id": "router-test", "architecture": "router-T", "k": 2, **shape,
        "weights_sha256": file_sha256(str(r / "weights.safetensors"))}))
    return dirs, str(r), cfg, [experts, router]


def _described(cfg) -> dict:
    import dataclasses

    from hdd_ray.ensemble import MixtureSpec

    spec = MixtureSpec.from_config(cfg)
    return {"name": "towers", "assignment": "D F", "k": 2,
            "spec": {**dataclasses.asdict(spec), "ddpm_clusters": list(spec.ddpm_clusters)},
            "sampling": dataclasses.asdict(cfg.sampling),
            "image": {"size": cfg.corpus.image_size, "channels": cfg.corpus.channels},
            "metrics": None, "source": {"campaign": "towers", "root": cfg.root, "sweep": None}}


def test_text_tower_files_are_referenced_by_content_or_carried_in_the_folder(tmp_path):
    """An open_clip text tower given by local files (a config .json and its weights): the
    folder references them by path and content, or copies them (``--copy-towers``); a changed
    or missing tower is refused in one line; a tag cannot be copied."""
    import open_clip

    from hdd_ray.ensemble import Mixture
    from hdd_ray.mixture_folder import read_folder, write_folder
    from hdd_ray.models.text import TINY_OPEN_CLIP_CONFIG

    towers = tmp_path / "towers"
    towers.mkdir()
    arch = towers / "share-tiny-clip.json"
    arch.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(str(arch))
    torch.manual_seed(1)
    weights = towers / "share-tiny-clip.pt"
    torch.save(open_clip.create_model("share-tiny-clip").state_dict(), weights)
    text = {"encoder": "open_clip", "arch": str(arch), "pretrained": str(weights)}
    dirs, router_dir, cfg, (experts, router) = _campaign(tmp_path, text)
    card = lambda m: f"# {m['name']}\n"  # noqa: E731 - the card is not under test here
    referenced, copied = tmp_path / "referenced", tmp_path / "copied"
    write_folder(str(referenced), _described(cfg), dirs, router_dir, False, card)
    described = write_folder(str(copied), _described(cfg), dirs, router_dir, True, card)
    assert sorted(t["value"] for t in described["text_towers"]) == [str(arch), str(weights)]
    assert all(t["copy"] and (copied / t["copy"]).is_file() for t in described["text_towers"])
    prompts = ["a red square"]
    expected = Mixture(experts, router, cfg).sample(prompts, seed=2)
    for folder in (referenced, copied):
        assert torch.equal(Mixture.from_folder(str(folder)).sample(prompts, seed=2), expected)

    # the referenced tower replaced by another file: refused; gone: refused; the copy loads
    weights.rename(towers / "kept.pt")
    torch.save({k: v + 1 for k, v in torch.load(towers / "kept.pt").items()}, weights)
    with pytest.raises(MixtureError, match="is not the text tower it was exported with") as info:
        read_folder(str(referenced))
    assert str(weights) in str(info.value) and "\n" not in str(info.value)
    shutil.rmtree(towers)
    with pytest.raises(MixtureError, match="not at its recorded path") as info:
        read_folder(str(referenced))
    assert str(weights) in str(info.value) or str(arch) in str(info.value)
    assert read_folder(str(copied))[2].name == "towers"  # nothing outside the folder needed

    # an open_clip tag is not a file: it cannot be copied, and nothing is left behind
    tagged = {"encoder": "open_clip", "arch": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}
    for d in dirs:
        desc = json.loads(Path(d, "expert.json").read_text())
        Path(d, "expert.json").write_text(json.dumps({**desc, "text": tagged}))
    with pytest.raises(MixtureError, match="open_clip tag, not a file"):
        write_folder(str(tmp_path / "tagged"), _described(cfg), dirs, router_dir, True, card)
    assert not (tmp_path / "tagged").exists()
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_the_vae_is_referenced_by_content_or_carried_in_the_folder(tmp_path):
    """Latent space: the folder samples through the experts' VAE, at its recorded path (checked
    by content) or as its copy (``--copy-towers``), which needs nothing outside the folder."""
    from diffusers import AutoencoderKL

    from hdd_ray.ensemble import Mixture
    from hdd_ray.latents import latent_record, vae_info
    from hdd_ray.mixture_folder import write_folder

    torch.manual_seed(0)
    vae = tmp_path / "vae"  # one block: 16 px RGB <-> 4 x 16 x 16 latents
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                  norm_num_groups=4, layers_per_block=1).save_pretrained(str(vae))
    text = {"encoder": "learned", "vocab_size": 64, "max_len": 8, "dim": 32, "depth": 1}
    pixels = (f"latents.vae={vae}", "corpus.image_size=16", "corpus.channels=3")
    record = latent_record(vae_info(load_config(overrides=list(pixels)).latents), 16)
    dirs, router_dir, cfg, (experts, router) = _campaign(tmp_path, text, *pixels, size=16,
                                                         channels=4, latents=record)
    card = lambda m: f"# {m['name']}\n"  # noqa: E731 - the card is not under test here
    referenced, copied = tmp_path / "referenced", tmp_path / "copied"
    write_folder(str(referenced), _described(cfg), dirs, router_dir, False, card)
    described = write_folder(str(copied), _described(cfg), dirs, router_dir, True, card)
    assert described["latents"]["copy"] == "towers/vae"
    assert (copied / "towers" / "vae" / "config.json").is_file()
    expected = Mixture(experts, router, cfg).sample(["a red square"], seed=2)
    assert expected.shape == (1, 3, 16, 16)  # decoded to pixels
    vae.rename(tmp_path / "vae-moved")
    with pytest.raises(MixtureError, match="the VAE at its recorded path is unusable") as info:
        Mixture.from_folder(str(referenced))
    assert "\n" not in str(info.value) and "--copy-towers" in str(info.value)
    assert torch.equal(Mixture.from_folder(str(copied)).sample(["a red square"], seed=2),
                       expected)


def test_champion_moves_only_to_a_lower_fid_under_the_same_evaluation_settings(tmp_path):
    from mlflow.tracking import MlflowClient

    from hdd_ray.registry import CHAMPION, promote

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # a real registry
    client.create_registered_model("digits")
    source = tmp_path / "model"
    source.mkdir()

    def register(**tags: str) -> str:
        return str(client.create_model_version("digits", str(source), tags=tags).version)

    def champion() -> str:
        return str(client.get_model_version_by_alias("digits", CHAMPION).version)

    assert promote(client, "digits", register()) == (
        False, "not evaluated (no FID): the champion is left as it is")
    first = register(fid="5.0", evaluation_key="a")
    assert promote(client, "digits", first)[0] and champion() == first
    assert promote(client, "digits", first) == (False, f"version {first} is the champion already")
    worse = register(fid="6.0", evaluation_key="a")
    assert promote(client, "digits", worse) == (False, "FID 6 is not below the champion's 5")
    other = register(fid="1.0", evaluation_key="b")  # another extractor, N or corpus
    moved, why = promote(client, "digits", other)
    assert not moved and "other settings" in why and champion() == first
    better = register(fid="4.5", evaluation_key="a")
    assert promote(client, "digits", better) == (True, "FID 4.5 < the champion's 5")
    assert champion() == better


def test_sweep_register_as_is_a_safe_name_and_not_part_of_the_sweeps_identity(tmp_path):
    from hdd_ray.sweep import describe

    with pytest.raises(ConfigError) as info:
        load_config(overrides=["sweep.register_as=my model/v2"])
    assert str(info.value).startswith("sweep.register_as='my model/v2'")
    plain = load_config(overrides=[f"root={tmp_path}"])
    named = load_config(overrides=[f"root={tmp_path}", "sweep.register_as=digits"])
    assert named.sweep.register_as == "digits"
    assert describe(plain) == describe(named)  # a finished sweep restores with it set
