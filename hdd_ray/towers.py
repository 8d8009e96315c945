"""Pretrained towers: the one place that loads open_clip and timm/DINOv2 weights.

Used by the clustering embedders, the frozen open_clip text encoder, the FID feature
extractors and the CLIP-score model, so all of them follow the same rules:

* **Weights are a local file or a named open_clip tag.** A value that looks like a path (a
  slash, a leading ``~`` or ``.``, a weights suffix such as ``.safetensors``) or names an
  existing file is a local file and must exist; anything else must be an open_clip pretrained
  tag of the architecture. A tag is the only thing ever downloaded (by open_clip, into its
  cache), and only because the user named it. timm towers take local files only.
* **An open_clip architecture is a name or a config ``.json``**, registered under the file's
  stem in each process that asks: a config file reaches every Ray worker, a config registered
  only in the driver would not. The project's own configs (a dict) are registered by
  :func:`register_open_clip_config`, also in each process that needs them.
* **OpenAI weights need QuickGELU.** They were trained with it; open_clip builds plain GELU
  unless told and only warns, and the tower then computes different features. The flag comes
  from the tag's pretrained config. A local copy of OpenAI weights says so with the
  ``-quickgelu`` architecture name (e.g. ``ViT-L-14-quickgelu``).

Errors are one line naming the config key the caller passes (``arch_key``/``weights_key``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "WEIGHT_SUFFIXES",
    "dinov2_model",
    "is_local_path",
    "local_file",
    "needs_quick_gelu",
    "open_clip_arch",
    "open_clip_image_transform",
    "open_clip_model",
    "open_clip_tokenizer",
    "register_open_clip_config",
    "resolve_dinov2",
    "resolve_open_clip",
]

WEIGHT_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt"})


def is_local_path(value: str) -> bool:
    """Whether a weights value names a file (not an open_clip tag): path-like or existing."""
    return (
        "/" in value
        or os.sep in value
        or value.startswith(("~", "."))
        or Path(value).suffix in WEIGHT_SUFFIXES
        or os.path.isfile(value)
    )


def local_file(path: str | None, key: str, required_for: str | None = None) -> str:
    """A local weights file that exists (``~`` expanded), or a one-line error naming ``key``.

    ``required_for`` says what needs the file when it is missing (e.g.
    ``"evaluation.fid_extractor='inception'"``).
    """
    if not path:
        needs = f" for {required_for}" if required_for else ""
        raise ValueError(
            f"{key}=None: required{needs} (a local weights file; nothing is downloaded at run time)"
        )
    expanded = os.path.expanduser(str(path))
    if not os.path.isfile(expanded):
        raise FileNotFoundError(f"{key}={path!r}: no such file")
    return expanded


# --------------------------------------------------------------------------- open_clip


def open_clip_arch(arch: str, key: str = "arch") -> str:
    """An open_clip architecture name; a ``.json`` config path is registered under its stem."""
    import open_clip

    if arch.endswith(".json"):
        if not os.path.isfile(arch):
            raise FileNotFoundError(f"{key}={arch!r}: no such open_clip model config file")
        name = Path(arch).stem
        if name not in open_clip.list_models():
            open_clip.add_model_config(arch)
        return name
    name = arch.replace("/", "-")
    if name not in open_clip.list_models():
        raise ValueError(
            f"{key}={arch!r}: unknown open_clip architecture (see open_clip.list_models(), or "
            "give a model config .json file)"
        )
    return name


def register_open_clip_config(name: str, config: dict[str, Any]) -> str:
    """Register the open_clip model config ``config`` (a dict) under ``name``; returns ``name``.

    open_clip reads model configs from files only: the JSON goes to a fresh temporary folder
    (open_clip rescans every registered path), is read at once and kept in memory (later rescans
    skip a missing path), and the folder is removed, so nothing stays behind (a job writes
    nothing outside its campaign root). Idempotent within a process; call it in each process
    (e.g. each Ray worker) that needs the architecture.
    """
    import open_clip

    if name in open_clip.list_models():
        return name
    path = Path(tempfile.mkdtemp(prefix="hdd_ray_open_clip_")) / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    shutil.rmtree(path.parent, ignore_errors=True)
    return name


def resolve_open_clip(
    arch: str, weights: str | None, arch_key: str = "arch", weights_key: str = "pretrained"
) -> tuple[str, str | None]:
    """Check an open_clip architecture and its weights -> ``(arch name, file path | tag | None)``.

    ``None`` weights mean random initialisation (tests, towers trained here).
    """
    import open_clip

    name = open_clip_arch(arch, arch_key)
    if weights is None:
        return name, None
    if is_local_path(weights):
        return name, local_file(weights, weights_key)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if weights not in tags:
        raise ValueError(
            f"{weights_key}={weights!r}: not a local file nor an open_clip tag of {name} "
            f"(pretrained tags: {', '.join(tags) or 'none'})"
        )
    return name, weights


def needs_quick_gelu(arch: str, weights: str | None) -> bool:
    """Whether open_clip tag ``weights`` of architecture ``arch`` was trained with QuickGELU.

    False for local files (the architecture name says it: ``-quickgelu`` configs), ``None``
    and anything that is not a tag of ``arch``.
    """
    import open_clip

    if weights is None or is_local_path(weights):
        return False
    return bool(open_clip.get_pretrained_cfg(arch.replace("/", "-"), weights).get("quick_gelu"))


def open_clip_model(
    arch: str,
    pretrained: str | None = None,
    arch_key: str = "arch",
    weights_key: str = "pretrained",
    **kwargs: Any,
) -> Any:
    """An open_clip CLIP model of ``arch`` with ``pretrained`` weights (file, tag or ``None``).

    QuickGELU is applied for tags that were trained with it; ``kwargs`` go to
    ``open_clip.create_model`` (e.g. ``force_image_size``). The model is returned as built
    (train mode, gradients on): callers freeze what they keep.
    """
    import open_clip

    name, weights = resolve_open_clip(arch, pretrained, arch_key, weights_key)
    return open_clip.create_model(
        name, pretrained=weights, force_quick_gelu=needs_quick_gelu(name, weights), **kwargs
    )


def open_clip_image_transform(model: Any) -> Any:
    """The eval-time image transform of an open_clip model (PIL image -> normalised tensor).

    The same transform ``open_clip.create_model_and_transforms`` returns for validation.
    """
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)


def open_clip_tokenizer(arch: str, key: str = "arch") -> Any:
    """open_clip's tokenizer for ``arch`` (a name or a config ``.json``)."""
    import open_clip

    return open_clip.get_tokenizer(open_clip_arch(arch, key))


def open_clip_text_config(arch: str, key: str = "arch") -> dict[str, Any]:
    """The text tower's settings of open_clip architecture ``arch`` (a name or a config
    ``.json``): ``width``, ``layers``, ``heads``, ``context_length``, ``vocab_size``,
    ``mlp_ratio``, with open_clip's defaults filled in; nothing is built or downloaded."""
    import open_clip
    from open_clip.model import CLIPTextCfg

    cfg = open_clip.get_model_config(open_clip_arch(arch, key)) or {}
    text = CLIPTextCfg(**cfg.get("text_cfg", {}))
    return {"width": text.width, "layers": text.layers, "heads": text.heads,
            "context_length": text.context_length, "vocab_size": text.vocab_size,
            "mlp_ratio": text.mlp_ratio}


# --------------------------------------------------------------------------- timm / DINOv2


def resolve_dinov2(
    arch: str, weights: str | None, arch_key: str = "arch", weights_key: str = "weights",
    required_for: str | None = None,
) -> str:
    """Check a timm architecture and its local weights file -> the file's path."""
    import timm

    path = local_file(weights, weights_key, required_for)
    if not timm.is_model(arch):
        raise ValueError(f"{arch_key}={arch!r}: unknown timm architecture (see timm.list_models)")
    return path


def dinov2_model(
    arch: str,
    weights: str | None,
    img_size: int | None = None,
    num_classes: int = 0,
    arch_key: str = "arch",
    weights_key: str = "weights",
    required_for: str | None = None,
) -> Any:
    """A timm DINOv2 ViT of ``arch`` with weights from the local file ``weights``.

    timm's own local-file path (``pretrained_cfg_overlay``): it converts official DINOv2
    checkpoints and resamples the position embedding when ``img_size`` differs from the
    pretraining grid. ``num_classes=0`` drops the head (features out).
    """
    import timm

    path = resolve_dinov2(arch, weights, arch_key, weights_key, required_for)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if img_size:
        kwargs["img_size"] = img_size
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": path},
                             **kwargs)
