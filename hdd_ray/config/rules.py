"""The rules every config section checks its values by, each failing in one line.

A rule raises :class:`~hdd_ray.errors.ConfigError` naming the key path, the bad value and what
is allowed. The sections (:mod:`hdd_ray.config.data`, :mod:`~hdd_ray.config.training`, ...) call
these from their ``validate`` methods.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict  # noqa: UP035 - OmegaConf needs typing generics

from omegaconf import DictConfig, ListConfig, OmegaConf

from hdd_ray.errors import ConfigError


def check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    """One-line :class:`ConfigError` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: unknown value, allowed: {', '.join(allowed)}")


#: a name that becomes one path segment (sweep, campaign, MLflow experiment): letters, digits,
#: ``.``, ``_``, ``-``, not starting with ``.`` (so never ``.``, ``..`` or a hidden file)
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def check_safe_name(key: str, value: Any) -> None:
    """One-line :class:`ConfigError` unless ``value`` is a single safe path segment.

    Names that become paths or MLflow filter values (``sweep.name``, ``name``,
    ``tracking.experiment``) may hold only letters, digits, ``.``, ``_`` and ``-``, must not
    start with ``.`` and must not be empty: no ``/``, ``\\``, ``..``, quotes or control
    characters, so ``<root>/sweeps/<name>`` can never point outside ``<root>/sweeps``.
    """
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or len(value) > 128:
        raise ConfigError(f"{key}={value!r}: must be a single safe name (letters, digits, '.', "
                          "'_', '-'; not starting with '.'; at most 128 characters)")


def is_int(value: Any) -> bool:
    """``value`` is an integer (``bool`` is not, though Python calls it one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive(key: str, value: Any, strict: bool = True) -> None:
    """One-line :class:`ConfigError` unless ``value`` is > 0 (``strict``) or >= 0."""
    if value is None or (value <= 0 if strict else value < 0):
        want = "> 0" if strict else ">= 0"
        raise ConfigError(f"{key}={value!r}: must be {want}")


def check_fraction(key: str, value: float, lo_open: bool = False, hi_open: bool = True) -> None:
    """One-line :class:`ConfigError` unless ``value`` is in [0, 1) (ends open as asked)."""
    lo_ok = value > 0 if lo_open else value >= 0
    hi_ok = value < 1 if hi_open else value <= 1
    if not (lo_ok and hi_ok):
        rng = ("(" if lo_open else "[") + "0, 1" + (")" if hi_open else "]")
        raise ConfigError(f"{key}={value!r}: must be in {rng}")


def plain(node: Any) -> Dict[str, Any]:
    """A section (dataclass, OmegaConf node or mapping) as a plain nested dict."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    if dataclasses.is_dataclass(node):
        return dataclasses.asdict(node)
    return dict(node)
