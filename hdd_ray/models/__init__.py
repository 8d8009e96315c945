"""Networks: the text-conditioned DiT experts, the router and the text encoders."""

from __future__ import annotations

from hdd_ray.models.dit import DIT_SIZES, DiT, build_dit, count_parameters, timestep_embedding
from hdd_ray.models.router import ROUTER_SIZES, Router, build_router
from hdd_ray.models.text import (
    TEXT_ENCODER_KINDS,
    HashTokenizer,
    LearnedTextEncoder,
    OpenCLIPTextEncoder,
    build_text_encoder,
    register_tiny_open_clip_config,
)

__all__ = [
    "DIT_SIZES",
    "ROUTER_SIZES",
    "TEXT_ENCODER_KINDS",
    "DiT",
    "HashTokenizer",
    "LearnedTextEncoder",
    "OpenCLIPTextEncoder",
    "Router",
    "build_dit",
    "build_router",
    "build_text_encoder",
    "count_parameters",
    "register_tiny_open_clip_config",
    "timestep_embedding",
]
