"""Latent space: a tiny random AutoencoderKL saved with ``save_pretrained`` and loaded through
the real path; encode once in prepare (real local Ray, real tar shards), VAE identities in ids,
refusals in one line, decoding mixtures.

The end-to-end test (``test_end_to_end_latent_space``) trains through Ray Train and needs the
training data reader to read ``latent.npy`` members (issue 15's reader).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch

from hdd_ray.config import load_config
from hdd_ray.corpus import decode_image, encode_png, iter_samples, prepare_image, write_tar
from hdd_ray.errors import CampaignError, ConfigError, ExpertRejected, MixtureError, PrepareError
from hdd_ray.latents import (
    LATENT_MEMBER,
    check_same_vae,
    decode_member,
    encode_member,
    load_vae,
    to_pixels,
    vae_info,
)

SIZE = 16  # pixels; the tiny VAE halves it: latents are 4 x 8 x 8
COLORS = [(220, 40, 40), (40, 60, 220)]


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> str:
    """A random 2-block AutoencoderKL (168k parameters) saved as a diffusers folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def rgb_corpus(tmp_path_factory) -> str:
    """64 small RGB images in two colours (two clusters), captions naming the colour."""
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("rgb")
    samples = []
    for i in range(64):
        c = i % 2
        img = np.clip(np.array(COLORS[c])[None, None, :] + rng.normal(0, 20, (SIZE, SIZE, 3)),
                      0, 255).astype(np.uint8)
        samples.append({"__key__": f"img-{i:04d}", "png": encode_png(img),
                        "txt": f"a {'red' if c == 0 else 'blue'} square",
                        "json": json.dumps({"label": c})})
    write_tar(str(d / "shard-000000.tar"), samples[:32])
    write_tar(str(d / "shard-000001.tar"), samples[32:])
    return str(d)


#: the demo config cut to two clusters
K2 = ["clustering.k=2", "clustering.fine_centroids=4", "experts.ddpm_clusters=[0]",
      "evaluation.baseline_ddpm_clusters=null"]


def _cfg(root, corpus, vae, *overrides):
    lat = [f"latents.vae={vae}"] if vae else []
    return load_config(None, [
        *K2, f"root={root}", "corpus.source=webdataset", f"corpus.uri={corpus}",
        f"corpus.image_size={SIZE}", "corpus.channels=3", "corpus.shard_size=16",
        "clustering.pixel_size=4",
        "clustering.heldout_fraction=0.25", "clustering.batch_size=16",
        "tracking.enabled=false", *lat, *overrides])


# --------------------------------------------------------------------------- no Ray


def test_config_latents_section():
    assert load_config(None, []).latents.vae is None  # pixel space by default
    with pytest.raises(ConfigError, match=r"latents.dtype='int8'"):
        load_config(None, ["latents.dtype=int8"])
    with pytest.raises(ConfigError, match=r"latents.scaling_factor=0.18: only used with"):
        load_config(None, ["latents.scaling_factor=0.18"])
    with pytest.raises(ConfigError, match=r"latents.scaling_factor=-1.0: must be > 0"):
        load_config(None, ["latents.vae=/x", "latents.scaling_factor=-1"])


def test_bad_vae_fails_in_one_line_before_ray(tmp_path, tiny_vae, rgb_corpus):
    import ray

    ray_was_up = ray.is_initialized()
    from hdd_ray.prepare import prepare_corpus

    cases = []
    missing = tmp_path / "nowhere"
    cases.append((str(missing), [], r"latents.vae=.*nowhere.*no such folder"))
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    cases.append((str(other), [], r"describes 'UNet2DModel', not a diffusers AutoencoderKL"))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((str(empty), [], r"no readable config.json"))
    cases.append((tiny_vae, ["corpus.image_size=15"],
                  r"corpus.image_size=15: not divisible by the VAE's downsampling factor 2"))
    cases.append((tiny_vae, ["corpus.channels=1"], r"corpus.channels=1: the VAE .* takes 3"))
    for vae, extra, pattern in cases:
        cfg = _cfg(tmp_path / "root", rgb_corpus, vae, *extra)
        with pytest.raises(PrepareError, match=pattern) as info:
            prepare_corpus(cfg)
        assert "\n" not in str(info.value)
    assert ray.is_initialized() == ray_was_up  # all refused before Ray was started


def test_encode_decode_scaling_and_pixel_identity(tmp_path, tiny_vae):
    from diffusers import AutoencoderKL

    cfg = load_config(None, [f"latents.vae={tiny_vae}", "latents.shift_factor=0.1"])
    info = vae_info(cfg.latents, SIZE, 3)
    assert (info.factor, info.latent_channels, info.shape(SIZE)) == (2, 4, [4, 8, 8])
    assert info.scaling_factor == pytest.approx(0.18215)  # read from the VAE's config
    ref = AutoencoderKL.from_pretrained(tiny_vae).eval()
    x = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    z = load_vae(info).encode(x)
    with torch.no_grad():
        mean = ref.encode(x).latent_dist.mean
        assert torch.allclose(z, (mean - 0.1) * 0.18215, atol=1e-5)
        pixels = to_pixels(cfg, z)
        expected = ref.decode(z / 0.18215 + 0.1).sample.clamp(-1, 1)
    assert pixels.shape == (3, 3, SIZE, SIZE)
    assert torch.allclose(pixels, expected, atol=1e-5)
    pixel_cfg = load_config(None, [])
    assert to_pixels(pixel_cfg, x) is x  # pixel space: the identity
    # shard member: float16 [C, h, w], round trip within float16 precision
    arr = decode_member(encode_member(z[0].numpy()))
    assert arr.dtype == np.float16 and arr.shape == (4, 8, 8)
    assert np.allclose(arr, z[0].numpy(), atol=2e-3)
    bf = decode_member(encode_member(z[0].numpy() * 1e5, "bfloat16"))
    assert np.allclose(bf, z[0].numpy() * 1e5, rtol=1e-2)  # beyond float16's range


def _manifest(latents=None):
    clusters = [{"cluster": c, "count": 10, "hash": f"h{c}", "shards": []} for c in range(2)]
    m = {"k": 2, "clusters": clusters, "data_hash": "d"}
    if latents is not None:
        m["latents"] = latents
    return m


def _record(identity, vae="/v"):
    return {"vae": vae, "subfolder": None, "sha256": identity * 4, "identity": identity,
            "shape": [4, 8, 8], "factor": 2, "scaling_factor": 0.18215, "shift_factor": 0.0,
            "dtype": "float16", "image_size": 16, "member": LATENT_MEMBER}


def test_ids_include_the_vae_only_in_latent_space(tmp_path):
    from hdd_ray.campaign import (
        EXPERT_JSON,
        WEIGHTS,
        existing_state,
        expert_id,
        expert_identity,
        router_id,
    )
    from hdd_ray.config import resolve_experts

    cfg = load_config(None, K2)
    e = resolve_experts(cfg)[0]
    pixel = _manifest()
    assert "latents" not in expert_identity(cfg, e, pixel)  # pixel ids unchanged
    a, b = _manifest(_record("a" * 16)), _manifest(_record("b" * 16))
    ids = {expert_id(cfg, e, m) for m in (pixel, a, b)}
    assert len(ids) == 3
    assert len({router_id(cfg, m) for m in (pixel, a, b)}) == 3
    # where the VAE lies is not identity: the same weights elsewhere keep the id
    assert expert_id(cfg, e, a) == expert_id(cfg, e, _manifest(_record("a" * 16, "/elsewhere")))
    # a contributed expert trained against another VAE is rejected in one line
    d = tmp_path / expert_id(cfg, e, a)
    d.mkdir()
    (d / EXPERT_JSON).write_text(json.dumps({"identity": expert_identity(cfg, e, b),
                                             "steps": 1}))
    (d / WEIGHTS).write_bytes(b"x")
    with pytest.raises(ExpertRejected, match="trained against VAE b+, the campaign uses VAE a+") \
            as info:
        existing_state(str(d), expert_identity(cfg, e, a), EXPERT_JSON)
    assert "a" * 16 in str(info.value) and "b" * 16 in str(info.value)
    assert "\n" not in str(info.value)


def test_mixture_of_two_vaes_is_refused():
    ra, rb = _record("a" * 16, "/vae-a"), _record("b" * 16, "/vae-b")
    check_same_vae([("expert c0", ra), ("expert c1", dict(ra, vae="/copy"))])
    with pytest.raises(MixtureError) as info:
        check_same_vae([("expert c0", ra), ("expert c1", rb)])
    msg = str(info.value)
    assert "expert c0" in msg and "expert c1" in msg and "/vae-a" in msg and "/vae-b" in msg
    assert "\n" not in msg
    with pytest.raises(MixtureError, match="pixel space"):
        check_same_vae([("expert c0", ra), ("expert c1", None)])


def test_mixture_sample_returns_decoded_images(tiny_vae):
    from hdd_ray.ensemble import Mixture
    from hdd_ray.models.expert import ExpertModel, RouterModel

    cfg = load_config(None, [*K2, f"latents.vae={tiny_vae}", "corpus.image_size=16",
                             "corpus.channels=3", "sampling.steps=2", "sampling.k=1"])
    rec = _record("a" * 16, tiny_vae)
    text = {"encoder": "learned", "arch": None, "pretrained": None, "dim": 32, "depth": 1,
            "vocab_size": 64, "max_len": 8}
    torch.manual_seed(0)
    experts = []
    for c, objective in enumerate(("fm_velocity", "ddpm_eps")):
        model = ExpertModel("DiT-T/2", text, 8, 4).eval()
        experts.append((model, {"objective": objective,
                                "schedule": "cosine" if c else None,
                                "image_size": 8, "channels": 4, "latents": rec}))
    router = RouterModel("router-T", 8, 4, 2).eval()
    out = Mixture(experts, router, cfg).sample(["a red square", "a blue square", "x"], seed=1)
    assert out.shape == (3, 3, SIZE, SIZE)  # decoded: corpus size, RGB
    assert out.min() >= -1 and out.max() <= 1 and out.std() > 0


# --------------------------------------------------------------------------- real Ray


@pytest.fixture(scope="module")
def latent_campaign(tmp_path_factory, tiny_vae, rgb_corpus, ray_local):
    """The RGB corpus prepared once into latent space (real prepare stage, real Ray): ``(root,
    the manifest prepare returned)``. Read-only: tests copy the root (the corpus lies outside
    it, so a copy's prepare step reuses the result)."""
    from hdd_ray.prepare import prepare_corpus

    root = tmp_path_factory.mktemp("latents") / "root"
    return root, prepare_corpus(_cfg(root, rgb_corpus, tiny_vae))


@pytest.mark.ray
def test_prepare_encodes_once_into_latent_shards(tmp_path, tiny_vae, rgb_corpus,
                                                 latent_campaign):
    import shutil

    from hdd_ray.campaign import load_manifest
    from hdd_ray.prepare import prepare_corpus

    root = tmp_path / "root"
    shutil.copytree(latent_campaign[0], root)
    cfg = _cfg(root, rgb_corpus, tiny_vae)
    manifest = latent_campaign[1]  # what the prepare stage returned
    assert not manifest["reused"]
    rec = manifest["latents"]
    info = vae_info(cfg.latents)
    assert rec["identity"] == info.identity and rec["sha256"] == info.sha256
    assert rec["shape"] == [4, 8, 8] and rec["scaling_factor"] == pytest.approx(0.18215)
    assert manifest["counts"] and sum(manifest["counts"]) + manifest["num_heldout"] == 64
    # the source images, to re-encode one by one
    source = {s["__key__"]: s["png"] for s in iter_samples(
        [os.path.join(rgb_corpus, n) for n in sorted(os.listdir(rgb_corpus))])}
    vae = load_vae(info)
    shards = [os.path.join(root, "clusters", s) for c in manifest["clusters"] for s in c["shards"]]
    shards += [os.path.join(root, "clusters", s) for s in manifest["heldout"]["shards"]]
    n = 0
    for sample in iter_samples(shards):
        assert "png" not in sample and {"txt", "json"} <= set(sample)  # latents, no image
        z = decode_member(sample[LATENT_MEMBER])
        assert z.dtype == np.float16 and z.shape == (4, 8, 8)
        pixels = prepare_image(decode_image(source[sample["__key__"]]), 3, SIZE)
        x = torch.from_numpy(pixels.transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1)
        assert np.allclose(z, vae.encode(x)[0].numpy(), atol=5e-3)
        assert json.loads(sample["json"])["cluster"] in (0, 1)
        n += 1
    assert n == 64
    assert (root / "clusters" / "montage.png").is_file()  # decoded images
    assert load_manifest(cfg)["latents"] == rec
    # never mix: training in pixel space on this corpus is refused in one line
    with pytest.raises(CampaignError, match=r"latents.vae=None \(pixel space\) but .* VAE "):
        load_manifest(_cfg(root, rgb_corpus, None))
    # a changed latents setting under the prepared corpus: refused, before Ray work
    changed = _cfg(root, rgb_corpus, tiny_vae, "latents.scaling_factor=0.5")
    with pytest.raises(PrepareError, match="re-run with --force") as err:
        prepare_corpus(changed)
    assert "\n" not in str(err.value)
    with pytest.raises(PrepareError, match="pixel space"):
        prepare_corpus(_cfg(root, rgb_corpus, None))
    # --force prepares it again with the new scaling (the old latents are not kept)
    redone = prepare_corpus(changed, force=True)
    assert redone["latents"]["scaling_factor"] == 0.5 and not redone["reused"]
    assert redone["data_hash"] != manifest["data_hash"]
    first = next(iter_samples(shards[:1]))
    key, z = first["__key__"], decode_member(first[LATENT_MEMBER]).astype(np.float32)
    pixels = prepare_image(decode_image(source[key]), 3, SIZE)
    x = torch.from_numpy(pixels.transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1)
    mean = vae.encode(x)[0].numpy() / 0.18215
    assert np.allclose(z, mean * 0.5, atol=5e-3)


@pytest.mark.ray
@pytest.mark.slow
def test_end_to_end_latent_space(tmp_path, tiny_vae, rgb_corpus, latent_campaign):
    """prepare -> a ddpm_eps and an fm_velocity expert -> router -> mixture sampling and
    evaluation (FID and CLIP score on decoded images), all in latent space.

    Needs the training data reader of issue 15 (``latent.npy`` members)."""
    import shutil

    from hdd_ray.ensemble import MixtureSpec
    from hdd_ray.evaluation.mixture import evaluate_mixture
    from hdd_ray.prepare import prepare_corpus
    from hdd_ray.training import train_campaign

    shutil.copytree(latent_campaign[0], tmp_path / "root")
    cfg = _cfg(tmp_path / "root", rgb_corpus, tiny_vae, "experts.train.steps=6", "experts.train.batch_size=8",
               "experts.train.checkpoint_every=6", "router.train.steps=6",
               "router.train.batch_size=8", "router.train.checkpoint_every=6",
               "experts.resources.cpus_per_worker=0.5", "router.resources.cpus_per_worker=0.5",
               "experts.text.dim=32", "evaluation.num_samples=8", "sampling.steps=2",
               "sampling.batch_size=8", "sampling.k=1",
               "ray.executor=task")  # the latent space is under test, not Ray Train
    assert prepare_corpus(cfg)["reused"]  # the module's latent corpus, prepared once
    statuses = train_campaign(cfg)
    assert [s.status for s in statuses] == ["trained"] * 3, [s.reason for s in statuses]
    expert_dirs = sorted((tmp_path / "root" / "experts").glob("c*/expert.json"))
    descs = [json.loads(p.read_text()) for p in expert_dirs]
    assert {d["objective"] for d in descs} == {"ddpm_eps", "fm_velocity"}
    assert all((d["image_size"], d["channels"]) == (8, 4) and d["latents"] for d in descs)
    result = evaluate_mixture(cfg, MixtureSpec.from_config(cfg))
    assert np.isfinite(result["fid"]) and np.isfinite(result["clip_score"])
    grid = (tmp_path / "root" / "mixtures" / result["mixture_id"] / "grid.png").read_bytes()
    from PIL import Image

    assert Image.open(io.BytesIO(grid)).size[1] >= SIZE * 4  # decoded 16 px tiles


def test_latents_check_follows_the_vae_content_not_its_path(tmp_path, tiny_vae, monkeypatch):
    """A moved VAE folder, or a relative ``latents.vae`` from another working directory, is the
    same latent space; weights replaced in place under the same path are not."""
    import shutil

    from hdd_ray.campaign import CampaignPaths, load_manifest
    from hdd_ray.latents import latent_record

    here = tmp_path / "vae-a"
    shutil.copytree(tiny_vae, here)
    root = tmp_path / "root"
    cfg = _cfg(root, "/unused", str(here))
    manifest = _manifest(latent_record(vae_info(cfg.latents), SIZE))
    os.makedirs(CampaignPaths(str(root)).clusters)
    with open(CampaignPaths(str(root)).manifest, "w") as f:
        json.dump(manifest, f)
    assert load_manifest(cfg)["latents"]["sha256"] == manifest["latents"]["sha256"]
    moved = tmp_path / "moved" / "vae-b"
    shutil.move(str(here), moved)
    assert load_manifest(_cfg(root, "/unused", str(moved)))["k"] == 2  # moved: reused
    monkeypatch.chdir(tmp_path / "moved")
    assert load_manifest(_cfg(root, "/unused", "vae-b"))["k"] == 2  # relative, other cwd
    weights = next(p for p in moved.iterdir() if p.name.startswith("diffusion_pytorch_model"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, same path, other weights
    weights.write_bytes(bytes(data))
    with pytest.raises(CampaignError, match="with other latents settings: re-run prepare_corpus"
                       ) as info:
        load_manifest(_cfg(root, "/unused", str(moved)))
    assert "\n" not in str(info.value)
    with pytest.raises(CampaignError, match=r"latents.vae=.*nowhere.*no such folder"):
        load_manifest(_cfg(root, "/unused", str(tmp_path / "nowhere")))
