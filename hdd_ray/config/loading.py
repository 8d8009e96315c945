"""Loading a campaign: the schema, then a YAML file (the demo's when none), then ``key=value``
overrides, validated; and the config written back (:func:`to_yaml`, :func:`to_dict`)."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Dict, List  # noqa: UP035 - OmegaConf needs typing generics

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hdd_ray.config.rules import plain
from hdd_ray.config.schema import CampaignConfig
from hdd_ray.config.validation import validate
from hdd_ray.errors import ConfigError, first_line

#: the campaign configs shipped inside the package (``jobs/configs`` in a checkout links here)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"


def config_path(path: str | Path | None) -> Path:
    """The file of ``--config``: a path, or the name of a shipped config (``paper-8x-xl``,
    ``single-gpu-24gb``, ``own-shards``, ``demo``); None = the demo's."""
    if path is None:
        return DEMO_CONFIG
    given = Path(path)
    shipped = CONFIG_DIR / f"{given.name}.yaml"
    if not given.is_file() and given.suffix == "" and len(given.parts) == 1 and shipped.is_file():
        return shipped
    return given


def load_config(
    path: str | Path | None = None, overrides: List[str] | None = None
) -> CampaignConfig:
    """Load a campaign: schema <- YAML file (demo when None) <- ``key=value`` overrides.

    Returns a validated :class:`CampaignConfig` object (plain dataclasses, not a DictConfig).
    Raises :class:`ConfigError` with a one-line message on any problem.
    """
    path = config_path(path)
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"config file not found: {path} (shipped configs, by name: {shipped})")
    schema = OmegaConf.structured(CampaignConfig)
    try:
        file_cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml errors are multi-line; keep the first line
        raise ConfigError(f"config file {path} is not valid YAML: {first_line(exc)}") from None
    merged = _merge(schema, file_cfg, f"config file {path}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            dot = OmegaConf.from_dotlist([item])
        except Exception as exc:
            raise ConfigError(f"override {item!r} cannot be parsed: {first_line(exc)}") from None
        merged = _merge(merged, dot, f"override {item!r}")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _from_omegaconf(exc, "config") from None
    cfg.corpus.resolve()  # type: ignore[attr-defined]
    validate(cfg)  # type: ignore[arg-type]
    return cfg  # type: ignore[return-value]


def _merge(base: DictConfig, other: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _from_omegaconf(exc, where) from None


def _from_omegaconf(exc: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = first_line(exc)
    if type(exc).__name__ == "ConfigKeyError" or ("Key '" in msg and "not in" in msg):
        return ConfigError(f"{key}: unknown key (from {where})")
    expected = _expected_type(key)
    value = getattr(exc, "value", None)
    if expected and value is not None:
        return ConfigError(f"{key}={value!r}: wrong type, expected {expected} (from {where})")
    return ConfigError(f"{key}: {first_line(getattr(exc, 'msg', msg))} (from {where})")


def _expected_type(key: str) -> str | None:
    """The schema's type of a dotted key path, as a readable name (None if unknown)."""
    node: Any = CampaignConfig
    for part in re.sub(r"\[\d+\]", "", key).split("."):
        if not dataclasses.is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = hints[part]
        while typing.get_origin(node) in (typing.Union, list, List):
            args = [a for a in typing.get_args(node) if a is not type(None)]
            node = args[0] if args else None
            if "[" in key and typing.get_origin(node) is None:
                break
    return getattr(node, "__name__", None) or (str(node) if node else None)


def to_yaml(cfg: CampaignConfig) -> str:
    """The config as YAML (what a job logs and stores beside its outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(section: Any) -> Dict[str, Any]:
    """Plain nested dict of a config section (a dataclass, an OmegaConf node or a mapping)."""
    return plain(section)
