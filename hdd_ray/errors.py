"""The errors a user sees: each one describes one problem in one line and names the fix.

Jobs catch these (and only these) and print ``error: <message>`` instead of a traceback. They
live together so that every layer can raise the right one without importing another layer
(``corpus`` raises :class:`PrepareError` without importing the prepare stage, for example).
"""

from __future__ import annotations

__all__ = [
    "CampaignError",
    "CheckpointWriteError",
    "ConfigError",
    "ExpertRejected",
    "HddRayError",
    "MixtureError",
    "NoUsableData",
    "PrepareError",
    "SweepError",
    "WeightsMismatch",
    "first_line",
]


class HddRayError(ValueError):
    """Base of every one-line error of hdd_ray."""


class ConfigError(HddRayError):
    """A configuration problem, described in one line (key path, bad value, what is allowed)."""


class PrepareError(HddRayError):
    """A problem with the corpus or the clustering settings, described in one line."""


class CampaignError(HddRayError):
    """A campaign that cannot be trained or evaluated as asked (one line)."""


class CheckpointWriteError(HddRayError):
    """A training checkpoint that could not be written (one line: its step, where, why)."""


class ExpertRejected(HddRayError):
    """An expert on storage that does not belong to this campaign (one line says what differs)."""


class NoUsableData(HddRayError):
    """A cluster with no decodable sample."""


class WeightsMismatch(HddRayError):
    """Weights that do not fit the architecture their description names."""


class MixtureError(HddRayError):
    """A mixture that cannot be assembled (e.g. a missing expert)."""


class SweepError(HddRayError):
    """A sweep that cannot run as asked (one line)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
