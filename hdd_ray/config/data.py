"""The data sections of a campaign: ``corpus``, ``latents`` and ``clustering``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional  # noqa: UP035 - OmegaConf needs typing generics

from hdd_ray.config.rules import check_choice, check_fraction, check_positive
from hdd_ray.errors import ConfigError

EMBEDDERS = ("pixels", "dinov2", "open_clip")
CORPUS_SOURCES = ("demo", "webdataset")
LATENT_DTYPES = ("float16", "bfloat16")


@dataclass
class CorpusConfig:
    """Where the image-caption pairs come from."""

    # demo (the built-in digits) | webdataset (your shards at ``uri``); unset: webdataset when
    # ``uri`` is given, else demo (:meth:`resolve`)
    source: Optional[str] = None
    uri: Optional[str] = None  # shards: dir, file, brace pattern or s3:// gs:// URI
    image_key: str = "png"
    caption_key: str = "txt"
    image_size: int = 8  # images are resized (square) to this many pixels
    channels: int = 1  # 1 = grayscale, 3 = RGB
    shard_size: int = 1000  # samples per written shard

    def resolve(self) -> None:
        """Set an unset ``source`` from ``uri``: shards given are shards used."""
        if self.source is None:
            self.source = "webdataset" if self.uri else "demo"

    def validate(self) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``corpus``."""
        check_choice("corpus.source", self.source, CORPUS_SOURCES)
        if self.source == "webdataset" and not self.uri:
            raise ConfigError("corpus.uri=None: required when corpus.source='webdataset'")
        if self.source == "demo" and self.uri:
            raise ConfigError(f"corpus.uri={self.uri!r}: corpus.source='demo' is the built-in "
                              "digits and reads no shards; for your own shards leave "
                              "corpus.source unset (or set it to webdataset)")
        check_positive("corpus.image_size", self.image_size)
        if self.channels not in (1, 3):
            raise ConfigError(f"corpus.channels={self.channels!r}: allowed: 1, 3")
        check_positive("corpus.shard_size", self.shard_size)


@dataclass
class LatentsConfig:
    """Latent space: experts and the router train on VAE latents (``vae=None``: pixel space).

    ``vae`` is a local folder of a diffusers ``AutoencoderKL`` (nothing is downloaded);
    ``scaling_factor`` / ``shift_factor`` None = read from the VAE's config (hdd_ray.latents).
    """

    vae: Optional[str] = None  # local AutoencoderKL folder; None = pixel space
    subfolder: Optional[str] = None  # e.g. "vae" inside a pipeline folder
    scaling_factor: Optional[float] = None  # None = the VAE config's (0.18215 if absent)
    shift_factor: Optional[float] = None  # None = the VAE config's (0 if absent)
    dtype: str = "float16"  # storage of the latents in the shards: float16 | bfloat16

    def validate(self) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``latents``."""
        check_choice("latents.dtype", self.dtype, LATENT_DTYPES)
        if self.vae is not None and not str(self.vae).strip():
            raise ConfigError("latents.vae='': a local AutoencoderKL folder, or null for pixels")
        if self.vae is None:
            for key in ("subfolder", "scaling_factor", "shift_factor"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"latents.{key}={getattr(self, key)!r}: only used with "
                                      "latents.vae (a local AutoencoderKL folder)")
        if self.scaling_factor is not None:
            check_positive("latents.scaling_factor", self.scaling_factor)
        if self.shift_factor is not None and self.shift_factor != self.shift_factor:
            raise ConfigError("latents.shift_factor=nan: must be a number")


@dataclass
class ClusteringConfig:
    """Embedding + hierarchical k-means into K clusters."""

    k: int = 8
    embedder: str = "pixels"  # pixels | dinov2 | open_clip
    embedder_arch: Optional[str] = None  # timm / open_clip architecture name
    embedder_weights: Optional[str] = None  # local weights file or open_clip pretrained tag
    embedder_image_size: Optional[int] = None  # feature embedders' input size (None = arch default)
    pixel_size: int = 8  # pixels embedder: downsample to this size
    fine_centroids: int = 32
    fit_sample_cap: int = 100_000
    kmeans_iters: int = 50
    balance_cap: Optional[int] = None  # max samples per cluster (None = no balancing)
    heldout_fraction: float = 0.1
    batch_size: int = 256
    num_actors: int = 1
    gpus_per_actor: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        """One-line :class:`ConfigError` on the first bad value of ``clustering``."""
        check_positive("clustering.k", self.k)
        check_choice("clustering.embedder", self.embedder, EMBEDDERS)
        if self.embedder != "pixels" and not self.embedder_arch:
            raise ConfigError(
                f"clustering.embedder_arch=None: required for clustering.embedder={self.embedder!r}"
            )
        for key in ("pixel_size", "fine_centroids", "fit_sample_cap", "kmeans_iters",
                    "batch_size", "num_actors"):
            check_positive(f"clustering.{key}", getattr(self, key))
        if self.fine_centroids < self.k:
            raise ConfigError(
                f"clustering.fine_centroids={self.fine_centroids}: must be >= clustering.k={self.k}"
            )
        if self.balance_cap is not None:
            check_positive("clustering.balance_cap", self.balance_cap)
        if self.embedder_image_size is not None:
            check_positive("clustering.embedder_image_size", self.embedder_image_size)
        check_fraction("clustering.heldout_fraction", self.heldout_fraction)
        check_positive("clustering.gpus_per_actor", self.gpus_per_actor, strict=False)
