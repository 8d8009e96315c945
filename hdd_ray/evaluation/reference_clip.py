"""The demo's own evaluator: a tiny CLIP trained contrastively on the demo corpus, once per campaign.

No pretrained CLIP can be downloaded here, and a real CLIP knows nothing useful about 8x8 digit
scans anyway, so the demo campaign judges its samples (CLIP score, CLIP-FID, feature diversity)
with a reference CLIP of its own: the project's tiny open_clip config
(:data:`hdd_ray.models.text.TINY_OPEN_CLIP_CONFIG`) with an image tower for 8x8 scans
(:data:`REFERENCE_CLIP_CONFIG`), fed by :func:`hdd_ray.evaluation.features.clip_pixels` (the
preprocessing every metric uses), trained on the training split's images and captions. It is cached under
``<root>/evaluation/reference_clip/`` as ``weights.safetensors`` + ``reference_clip.json``
(architecture config, training settings, data hash, held-out retrieval accuracy), so every
mixture of a campaign is judged by the same evaluator, and anyone can read from the JSON whether
that evaluator is fit to judge.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from hdd_ray import devices, storage
from hdd_ray.campaign import CampaignPaths
from hdd_ray.evaluation.features import clip_pixels
from hdd_ray.models.text import TINY_OPEN_CLIP_CONFIG
from hdd_ray.optim import learning_rate
from hdd_ray.towers import register_open_clip_config

__all__ = [
    "REFERENCE_CLIP_ARCH",
    "REFERENCE_CLIP_CONFIG",
    "digit_of_caption",
    "get_reference_clip",
    "register_reference_clip_config",
    "retrieval_accuracy",
    "train_reference_clip",
]

REFERENCE_CLIP_ARCH = "hdd-reference-clip"
# The project's tiny CLIP (same text tower) with an image tower for 8x8 scans: four 4x4-pixel
# patches at the native size (no upsampling) and mean-pooled patch tokens. With the tiny config's
# CLS pooling on upsampled scans every image embedding starts at cosine ~0.998 to every other and
# training stalled for a hundred steps; averaged patch tokens carry the pixels from the first
# step, and 5 tokens instead of 17 make a step ~3x cheaper (300 steps: ~10 s on one core, 96%
# held-out digit retrieval, against ~60 s and 94% with 2x2 patches).
REFERENCE_CLIP_CONFIG = {
    **TINY_OPEN_CLIP_CONFIG,
    "vision_cfg": {
        **TINY_OPEN_CLIP_CONFIG["vision_cfg"],
        "image_size": 8,
        "patch_size": 4,
        "pool_type": "avg",
    },
}
#: the learning-rate schedule, in the cache key: a version bump retrains every cached reference CLIP
#: (v2: hdd_ray.optim.learning_rate, the experts' schedule; v1 had its own cosine after the warm-up)
LR_SCHEDULE = "cosine after a 5% linear warm-up (hdd_ray.optim.learning_rate), v2"
WEIGHTS_FILE = "weights.safetensors"
INFO_FILE = "reference_clip.json"
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT_RE = re.compile(r"\b(\d|" + "|".join(_DIGIT_WORDS) + r")\b")


def digit_of_caption(caption: str) -> str:
    """What a demo caption names: ``"a handwritten digit seven"`` and ``"... digit 7"`` -> ``"7"``.

    Captions that name no digit are their own meaning (the caption text, lowercased). Used to
    score retrieval: the demo's phrasing is drawn independently of the image, so no model can
    tell which of a digit's phrasings belongs to an image; only the digit is retrievable.
    """
    match = _DIGIT_RE.search(caption.lower())
    if match is None:
        return caption.strip().lower()
    token = match.group(1)
    return token if token.isdigit() else str(_DIGIT_WORDS.index(token))


def register_reference_clip_config() -> str:
    """Register :data:`REFERENCE_CLIP_CONFIG` with open_clip (idempotent) and return its name
    (:func:`hdd_ray.towers.register_open_clip_config`)."""
    return register_open_clip_config(REFERENCE_CLIP_ARCH, REFERENCE_CLIP_CONFIG)


def _build(seed: int) -> tuple[nn.Module, Any]:
    """A freshly initialised reference CLIP (init drawn from ``seed``) and its tokenizer."""
    import open_clip

    arch = register_reference_clip_config()
    # fork_rng: seed the init without changing the caller's global RNG stream.
    quiet = _NoPretrainedWarning()  # it is trained right here: open_clip's warning misleads
    logging.getLogger().addFilter(quiet)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(arch)
    finally:
        logging.getLogger().removeFilter(quiet)
    return model, open_clip.get_tokenizer(arch)


class _NoPretrainedWarning(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded" for an architecture built to be trained."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _contrastive_loss(img: Tensor, txt: Tensor, caption_ids: Tensor, scale: Tensor) -> Tensor:
    """Symmetric CLIP loss where identical captions are one positive, not false negatives.

    ``img`` [B, D] and ``txt`` [U, D] are normalized; ``txt`` holds the batch's U distinct
    captions, ``caption_ids`` [B] maps each image to its caption's row. Image -> text is plain
    cross-entropy over the distinct captions; text -> image spreads the target uniformly over the
    images that carry that caption. (The demo has ~50 distinct captions: with the usual diagonal
    targets most of a batch would be false negatives.)
    """
    logits = scale * img @ txt.t()  # [B, U]
    loss_i = F.cross_entropy(logits, caption_ids)
    positives = F.one_hot(caption_ids, txt.shape[0]).t().float()  # [U, B]
    targets = positives / positives.sum(dim=1, keepdim=True)
    loss_t = -(targets * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return (loss_i + loss_t) / 2


def train_reference_clip(
    images: Tensor,
    captions: Sequence[str],
    steps: int = 300,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any, list[float]]:
    """Train the reference CLIP on image/caption pairs -> ``(model, tokenizer, loss history)``.

    Trains on ``device``; the batches' indices are drawn on the CPU (:mod:`hdd_ray.devices`),
    so the batches of a seed are the same on every device (the weights differ in float noise).

    AdamW with :func:`hdd_ray.optim.learning_rate`'s cosine after a linear warm-up over the
    first 5% of steps (:data:`LR_SCHEDULE`); batches drawn with
    replacement from a generator seeded by ``seed``, so a seed gives the same weights (on the same
    torch build and thread count). Captions are tokenized once; each step encodes only the
    batch's distinct captions.
    """
    if images.shape[0] != len(captions) or images.shape[0] == 0:
        raise ValueError(
            f"reference CLIP needs matching images and captions, got {images.shape[0]} images "
            f"and {len(captions)} captions"
        )
    with _one_thread():
        return _train(images, captions, steps, batch_size, lr, seed, torch.device(device))


@contextlib.contextmanager
def _one_thread():
    """Run with one intra-op thread, restoring the caller's setting afterwards.

    The matrices are tiny (5 tokens x 64 wide), so a second thread buys nothing and, on cores
    shared with other work, costs several times the step time in spinning; one thread also keeps
    the float reductions, and so the weights for a seed, independent of the caller's setting.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(
    images: Tensor, captions: Sequence[str], steps: int, batch_size: int, lr: float, seed: int,
    device: torch.device,
) -> tuple[nn.Module, Any, list[float]]:
    model, tokenizer = _build(seed)
    model.to(device)
    # once: the tower's input never changes between steps
    pixels = clip_pixels(images.to(device), model)
    texts = sorted(set(captions))
    row = {t: i for i, t in enumerate(texts)}
    tokens = tokenizer(texts).to(device)
    caption_idx = torch.tensor([row[c] for c in captions], dtype=torch.long, device=device)
    generator = devices.generator(seed)
    # The token table has 49408 rows, of which the corpus uses a few dozen: a dense AdamW update of
    # it cost more than the forward and backward passes together, so it gets sparse gradients and
    # SparseAdam (which touches only the rows a batch used); everything else uses AdamW.
    model.token_embedding.sparse = True
    table = model.token_embedding.weight
    dense = [p for p in model.parameters() if p is not table]
    optimizers = [
        torch.optim.AdamW(dense, lr=lr, weight_decay=0.01),
        torch.optim.SparseAdam([table], lr=lr),
    ]
    warmup = max(1, steps // 20)  # LR_SCHEDULE
    model.train()
    history = []
    for step in range(steps):
        idx = devices.randint(pixels.shape[0], batch_size, generator, device)
        unique, caption_ids = torch.unique(caption_idx[idx], return_inverse=True)
        img = model.encode_image(pixels[idx], normalize=True)
        txt = model.encode_text(tokens[unique], normalize=True)
        loss = _contrastive_loss(img, txt, caption_ids, model.logit_scale.exp().clamp(max=100))
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        rate = learning_rate(step, lr, steps, warmup, "cosine")  # the project's one schedule
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = rate
            opt.step()
        history.append(loss.item())
    model.token_embedding.sparse = False
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer, history


@torch.no_grad()
def retrieval_accuracy(
    model: nn.Module,
    tokenizer: Any,
    images: Tensor,
    captions: Sequence[str],
    caption_meaning: Callable[[str], str] = digit_of_caption,
    batch_size: int = 512,
) -> dict[str, float]:
    """Held-out image -> caption retrieval, top-1 among the set's distinct caption texts.

    A retrieval is correct when the best-scoring caption means what the image's own caption means
    (``caption_meaning``; for the demo, the digit it names). ``chance`` is the accuracy of picking
    a candidate caption uniformly at random: ``mean_i |{c : meaning(c) = meaning_i}| / |C|``.
    """
    texts = sorted(set(captions))
    meanings = [caption_meaning(t) for t in texts]
    device = next(model.parameters()).device
    txt = model.encode_text(tokenizer(texts).to(device), normalize=True)
    img = torch.cat(
        [
            model.encode_image(clip_pixels(images[i : i + batch_size].to(device), model),
                               normalize=True)
            for i in range(0, images.shape[0], batch_size)
        ]
    )
    best = (img @ txt.t()).argmax(dim=1).tolist()
    own = [caption_meaning(c) for c in captions]
    correct = [meanings[b] == m for b, m in zip(best, own, strict=True)]
    chance = [sum(mm == m for mm in meanings) / len(texts) for m in own]
    return {
        "retrieval_top1": float(np.mean(correct)),
        "retrieval_chance": float(np.mean(chance)),
        "num_candidates": float(len(texts)),
        "num_images": float(len(own)),
    }


#: the reference CLIP trains on the first this many samples of the training split (the demo's
#: whole split; a bounded sample of a large one, read and held once)
MAX_TRAIN_SAMPLES = 16384


def _settings(steps: int, batch_size: int, lr: float, seed: int, data_hash: str) -> dict:
    """What determines the reference CLIP's weights: a cached one is reused only if all match."""
    return {
        "arch": REFERENCE_CLIP_ARCH,
        "arch_config": REFERENCE_CLIP_CONFIG,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "data_hash": data_hash,
        "lr_schedule": LR_SCHEDULE,
        "max_train_samples": MAX_TRAIN_SAMPLES,
    }


def get_reference_clip(
    root: str,
    train_images: Tensor | Callable[[], Tensor],
    train_captions: Sequence[str] | Callable[[], Sequence[str]],
    heldout_images: Tensor,
    heldout_captions: Sequence[str],
    data_hash: str,
    steps: int = 300,
    seed: int = 0,
    batch_size: int = 256,
    lr: float = 2e-3,
    caption_meaning: Callable[[str], str] = digit_of_caption,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load the campaign's reference CLIP, or train and cache it -> ``(model, tokenizer, info)``,
    the model on ``device`` (trained there when the cache misses).

    The cache under ``<root>/evaluation/reference_clip/`` is reused when its settings (architecture
    config, steps, batch size, lr, seed, ``data_hash`` of the training split) match; otherwise the
    model is retrained on ``train_*`` and the cache overwritten. ``info`` is the JSON: settings,
    ``train_seconds``, ``final_loss``, ``weights_sha256``, the held-out retrieval accuracy
    (:func:`retrieval_accuracy`) and ``loaded`` (True when it came from the cache).
    ``train_images`` / ``train_captions`` may be callables that load them, so a cached model
    never needs the training split in memory.
    The model is frozen, in eval mode, and carries ``eval_label = "reference"`` so CLIP-FID
    extractors built from it are named ``clip:reference-<fingerprint>``.
    """
    directory = CampaignPaths(root).reference_clip
    weights_path = storage.join(directory, WEIGHTS_FILE)
    info_path = storage.join(directory, INFO_FILE)
    settings = _settings(steps, batch_size, lr, seed, data_hash)
    if storage.exists(info_path) and storage.exists(weights_path):
        info = storage.read_json(info_path)
        if {k: info.get(k) for k in settings} == settings:
            model, tokenizer = _build(seed)
            model.load_state_dict(load_safetensors(storage.read_bytes(weights_path)))
            model.to(device)
            model.requires_grad_(False)
            model.eval()
            model.eval_label = "reference"
            return model, tokenizer, {**info, "loaded": True}

    if callable(train_images):
        train_images = train_images()
    if callable(train_captions):
        train_captions = train_captions()
    start = time.perf_counter()
    model, tokenizer, history = train_reference_clip(
        train_images, train_captions, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
        device=device)
    train_seconds = time.perf_counter() - start
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save_safetensors(state, metadata={"arch": REFERENCE_CLIP_ARCH, "data_hash": data_hash})
    info = {
        **settings,
        "train_seconds": round(train_seconds, 2),
        "final_loss": float(np.mean(history[-20:])),
        "num_train": int(train_images.shape[0]),
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        **retrieval_accuracy(model, tokenizer, heldout_images, heldout_captions, caption_meaning),
    }
    storage.write_bytes(weights_path, blob)
    storage.write_json(info_path, info)  # written last: its presence marks a complete cache
    model.eval_label = "reference"
    return model, tokenizer, {**info, "loaded": False}
