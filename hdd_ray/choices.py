"""The named choices of the config, as torch-free registries (the bottom layer, beside errors).

The config validates every choice against these lists without importing the modules that
implement them (they import torch; the config must load in a job's first second, before Ray).
Each list has one home, here; the implementing module builds its registry from it or is held to
it by a test (``tests/test_layers.py``): objectives and schedules (:mod:`hdd_ray.diffusion`),
samplers, the conversion's beyond-the-edge schemes, timestep sampling, routing strategies
(:mod:`hdd_ray.ensemble`), text encoders, DiT and router sizes (:mod:`hdd_ray.models`), FID
extractors (:mod:`hdd_ray.evaluation.features`), and the objective-assignment notation
(``"D F F D"``) that configs, sweeps and the campaign share.
"""

from __future__ import annotations

from collections.abc import Iterable

from hdd_ray.errors import ConfigError

#: training objectives (``experts.objective``): DDPM epsilon-prediction, flow-matching velocity
OBJECTIVE_NAMES = ("ddpm_eps", "fm_velocity")
#: VP noise schedules of DDPM experts (``experts.schedule``)
SCHEDULE_NAMES = ("linear", "cosine")
#: how training draws times (``*.train.timestep_sampling``)
TIMESTEP_SAMPLING = ("uniform", "logit_normal")
#: ODE samplers (``sampling.sampler``)
SAMPLERS = ("euler", "heun")
#: the conversion near t = 1 (``sampling.conversion.beyond_edge``)
BEYOND_EDGE = ("shrink", "divide")
#: routing strategies (``sampling.routing``)
STRATEGIES = ("full", "top1", "topk", "threshold")
#: where a mixture's routing probabilities come from (``sampling.router``): the trained router
#: on ``(x_t, t)``, or the training-free centroid router on the prompt (``hdd_ray.routing``)
ROUTERS = ("learned", "centroid")
#: how a grown campaign's router is trained (``router.grow.mode``): fine-tuned from the
#: previous cluster set's router on the new cluster plus a replay sample, or from scratch
GROW_MODES = ("incremental", "scratch")
#: text encoders of the experts (``experts.text.encoder``)
TEXT_ENCODER_KINDS = ("learned", "open_clip")
#: FID feature extractors (``evaluation.fid_extractor``)
EXTRACTOR_KINDS = ("clip", "inception", "dinov2")
#: how an expert starts from ``experts.init`` (``experts.init_mode``): ``exact`` keeps the
#: checkpoint's network (its parameterisation and time) and converts it inside the loss; ``paper``
#: re-initialises the head and feeds time as round(999 t) (the HDD paper's way)
INIT_MODES = ("exact", "paper")
#: the DiT's timestep modulation (``experts.adaln``): PixArt's AdaLN-Single (one shared
#: ``t_block``) or the original DiT's per-block AdaLN-Zero
ADALN_VARIANTS = ("single", "zero")
#: what an expert's network predicts (``experts.network.parameterization``): ``auto`` = the
#: init's (exact mode), else the objective's own (``velocity`` for fm_velocity, ``eps`` for ddpm_eps)
NETWORK_PARAMETERIZATIONS = ("auto", "velocity", "eps", "x0", "v")
#: how a network reads time: ``native`` (tau, or 1000 t), ``ddpm_step`` (the integer step of
#: a 1,000-step DDPM checkpoint: tau - 1), ``paper`` (round(999 t), the HDD paper's)
TIME_CONVENTIONS = ("native", "ddpm_step", "paper")
#: named public checkpoints ``experts.init`` may give instead of a path: resolved to a file of
#: this name in ``$HDD_RAY_WEIGHTS`` (default ``~/weights``), never downloaded at run time;
#: the value is where to fetch it once
PRETRAINED_TAGS: dict[str, tuple[str, str]] = {
    "DiT-XL-2-256": ("DiT-XL-2-256x256.pt",
                     "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"),
    "DiT-XL-2-512": ("DiT-XL-2-512x512.pt",
                     "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt"),
    "PixArt-XL-2-256": ("PixArt-XL-2-256x256.pth",
                        "the PixArt-alpha/PixArt-alpha repository on the Hugging Face Hub"),
    "PixArt-XL-2-512": ("PixArt-XL-2-512x512.pth",
                        "the PixArt-alpha/PixArt-alpha repository on the Hugging Face Hub"),
}


def _dit_sizes() -> dict[str, dict]:
    sizes = {"DiT-T/2": dict(hidden_size=96, depth=4, num_heads=4, patch_size=2),
             # 4 tokens per 8x8 image: a 3x3 convolution after unpatchify, as U-ViT
             "DiT-T/4": dict(hidden_size=96, depth=4, num_heads=4, patch_size=4, final_conv=True)}
    shapes = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
    for name, (hidden, depth, heads) in shapes.items():
        for p in (2, 4, 8):
            sizes[f"DiT-{name}/{p}"] = dict(
                hidden_size=hidden, depth=depth, num_heads=heads, patch_size=p
            )
    return sizes


DIT_SIZES: dict[str, dict] = _dit_sizes()
"""Architecture registry named as in the DiT paper; ``DiT-T/2`` and ``DiT-T/4`` are the tiny
test/demo sizes (the demo's ``DiT-T/4``: 4x4 patches and U-ViT's final 3x3 convolution)."""

ROUTER_SIZES: dict[str, dict] = {
    "router-T": dict(hidden_size=64, depth=4, num_heads=4, patch_size=2),
    "router-S": dict(hidden_size=384, depth=12, num_heads=6, patch_size=2),
    "router-B": dict(hidden_size=768, depth=12, num_heads=12, patch_size=2),
}
"""Router registry: ``router-T`` for tests and the CPU demo, ``router-B`` like DDM's DiT-B."""

#: the objective-assignment notation: one letter per cluster
ASSIGNMENT_LETTERS = {"D": "ddpm_eps", "F": "fm_velocity"}
#: in a mixture's assignment: the cluster's expert is left out (retired)
RETIRED_LETTER = "-"


def parse_mixture(text: str, k: int, key: str = "assignment") -> tuple[list[int], list[int]]:
    """``"D F - D"`` -> ``(ddpm clusters, retired clusters)``: one letter (or objective name)
    per cluster, ``D`` = ``ddpm_eps``, ``F`` = ``fm_velocity``, ``-`` = the expert is left
    out of the mixture (retired). Raises :class:`ConfigError` naming ``key`` on an unknown
    letter, a wrong length or every expert retired."""
    tokens = text.replace(",", " ").split()
    if len(tokens) == 1 and len(tokens[0]) > 1 and tokens[0] not in ASSIGNMENT_LETTERS.values():
        tokens = list(tokens[0])
    names = {**ASSIGNMENT_LETTERS, **{o: o for o in ASSIGNMENT_LETTERS.values()},
             RETIRED_LETTER: RETIRED_LETTER}
    for c, tok in enumerate(tokens):
        if tok not in names:
            raise ConfigError(f"{key}={text!r}: unknown objective {tok!r} for cluster {c}, "
                              "allowed: D (ddpm_eps), F (fm_velocity), - (left out)")
    if len(tokens) != k:
        raise ConfigError(f"{key}={text!r}: {len(tokens)} objectives, expected one per cluster "
                          f"(clustering.k={k})")
    retired = [c for c, tok in enumerate(tokens) if tok == RETIRED_LETTER]
    if len(retired) == k:
        raise ConfigError(f"{key}={text!r}: every expert left out; keep at least one")
    return [c for c, tok in enumerate(tokens) if names[tok] == "ddpm_eps"], retired


def parse_assignment(text: str, k: int, key: str = "assignment") -> list[int]:
    """``"D F F D"`` (or ``"DFFD"``, or objective names) -> the clusters using ``ddpm_eps``.

    One letter (or objective name) per cluster: ``D`` = ``ddpm_eps``, ``F`` = ``fm_velocity``.
    Raises :class:`ConfigError` naming ``key`` on an unknown objective or a wrong length (a
    ``-`` too: this assignment trains experts; mixtures take :func:`parse_mixture`).
    """
    ddpm, retired = parse_mixture(text, k, key)
    if retired:
        raise ConfigError(f"{key}={text!r}: '-' (an expert left out) is for mixtures, not "
                          "here: give every cluster D or F")
    return ddpm


def format_assignment(ddpm_clusters: Iterable[int], k: int,
                      retired: Iterable[int] = ()) -> str:
    """The readable objective per cluster, e.g. ``D F - D F F F F`` (inverse of
    :func:`parse_mixture`)."""
    ddpm, out = set(ddpm_clusters), set(retired)
    return " ".join(RETIRED_LETTER if c in out else "D" if c in ddpm else "F" for c in range(k))


def check_retired(retired: Iterable[int], k: int, routing: str, top_k: int,
                  where: str = "") -> None:
    """Retired clusters in ``0..k-1``, at least one expert kept, and top-``top_k`` routing
    over no more experts than are kept (one-line :class:`ConfigError`)."""
    out = sorted(set(retired))
    if any(not 0 <= c < k for c in out):
        raise ConfigError(f"{where}retired={out}: clusters are 0..{k - 1} (clustering.k={k})")
    kept = k - len(out)
    if kept < 1:
        raise ConfigError(f"{where}retired={out}: every expert left out; keep at least one")
    if routing == "topk" and top_k > kept:
        raise ConfigError(f"{where}k={top_k}: top-k routing over {kept} kept experts "
                          f"({len(out)} of {k} left out)")


def check_routing(routing: str, k: int, threshold: float | None, num_clusters: int,
                  where: str = "sampling.") -> None:
    """The one check of a routing setting (config, sweeps, ``MixtureSpec``, the jobs' flags).

    ``routing`` one of :data:`STRATEGIES`; top-``k`` in ``1..num_clusters``; a ``threshold`` in
    [0, 1], required when ``routing`` is ``threshold``. ``where`` prefixes the names in the
    one-line :class:`ConfigError` (``"sampling."`` gives ``sampling.threshold=None: ...``, ``"--"``
    gives ``--threshold=None: ...``).
    """
    if routing not in STRATEGIES:
        raise ConfigError(f"{where}routing={routing!r}: unknown value, allowed: "
                          f"{', '.join(STRATEGIES)}")
    if not 1 <= k <= num_clusters:
        raise ConfigError(f"{where}k={k}: top-k must be in 1..{num_clusters} "
                          f"(clustering.k={num_clusters})")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ConfigError(f"{where}threshold={threshold!r}: must be in [0, 1]")
    if routing == "threshold" and threshold is None:
        raise ConfigError(f"{where}threshold=None: required when {where}routing='threshold'")
