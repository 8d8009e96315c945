"""Evaluation: feature extractors, FID (with cached reference statistics and its floor), CLIP
score, intra-prompt diversity, their bootstrap intervals and paired differences
(:mod:`hdd_ray.evaluation.statistics`), and the demo's reference CLIP. Protocols:
``evaluation/README.md``. A mixture's evaluation: the :mod:`~hdd_ray.evaluation.judge` that
scores it, :mod:`~hdd_ray.evaluation.mixture` (sample, score, record; its id and files),
:mod:`~hdd_ray.evaluation.remote` (as Ray tasks), :mod:`~hdd_ray.evaluation.tables` (comparison
tables) and :mod:`~hdd_ray.evaluation.grids` (sample grids).

Importing this package loads neither open_clip, timm nor torchmetrics' image metrics; each is
imported by the function that needs it.
"""

from hdd_ray.evaluation.features import (
    DEFAULT_CLIP_ARCH,
    DEFAULT_DINOV2_ARCH,
    EXTRACTOR_KINDS,
    DINOv2Extractor,
    FeatureExtractor,
    InceptionExtractor,
    OpenCLIPImageExtractor,
    build_extractor,
    clip_pixels,
    extract_features,
    to_rgb,
)
from hdd_ray.evaluation.metrics import (
    DIVERSITY_NAMES,
    ReferenceStats,
    clip_score,
    clip_scores,
    diversity,
    fid,
    fid_floor,
    group_diversities,
    images_hash,
    lpips_backbone_path,
    reference_stats,
)
from hdd_ray.evaluation.reference_clip import (
    REFERENCE_CLIP_ARCH,
    REFERENCE_CLIP_CONFIG,
    digit_of_caption,
    get_reference_clip,
    register_reference_clip_config,
    retrieval_accuracy,
    train_reference_clip,
)

__all__ = [
    "DEFAULT_CLIP_ARCH",
    "DEFAULT_DINOV2_ARCH",
    "DIVERSITY_NAMES",
    "DINOv2Extractor",
    "EXTRACTOR_KINDS",
    "FeatureExtractor",
    "InceptionExtractor",
    "OpenCLIPImageExtractor",
    "REFERENCE_CLIP_ARCH",
    "REFERENCE_CLIP_CONFIG",
    "ReferenceStats",
    "build_extractor",
    "clip_pixels",
    "clip_score",
    "clip_scores",
    "digit_of_caption",
    "diversity",
    "extract_features",
    "fid",
    "fid_floor",
    "get_reference_clip",
    "group_diversities",
    "images_hash",
    "lpips_backbone_path",
    "reference_stats",
    "register_reference_clip_config",
    "retrieval_accuracy",
    "to_rgb",
    "train_reference_clip",
]
