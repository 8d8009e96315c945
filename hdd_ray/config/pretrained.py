"""Where experts and the router start: ``experts.init`` (and per expert ``experts.list[i].init``),
``experts.init_mode``, ``experts.adaln``, ``experts.network`` and ``router.init``.

This part of the config only names things; reading a checkpoint (its format, its keys and shapes)
is :mod:`hdd_ray.models.pretrained`'s, and what an expert then *is* (its network, its identity)
is resolved by :mod:`hdd_ray.campaign.starts`. A value of ``experts.init`` is a local path, a
``s3://`` / ``gs://`` URI, or a tag of :data:`~hdd_ray.choices.PRETRAINED_TAGS` resolved to a
file in ``$HDD_RAY_WEIGHTS`` (default ``~/weights``): nothing is downloaded at run time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from hdd_ray.choices import (
    NETWORK_PARAMETERIZATIONS,
    PRETRAINED_TAGS,
    SCHEDULE_NAMES,
)
from hdd_ray.config.rules import check_choice
from hdd_ray.errors import ConfigError

#: ``experts.list[i].init`` value that starts that expert from scratch under a campaign-wide init
SCRATCH = "none"
#: where tags of :data:`~hdd_ray.choices.PRETRAINED_TAGS` are looked for
WEIGHTS_ENV = "HDD_RAY_WEIGHTS"


@dataclass
class NetworkConfig:
    """What an expert's network predicts, apart from the loss it is trained with.

    The objective (``ddpm_eps`` / ``fm_velocity``, the assignment's D / F) names the **loss**; the
    network may predict ``eps``, ``x0`` or VP ``v`` on a VP ``schedule`` and still be trained
    with the flow-matching loss: its output is converted into a velocity inside the loss, with
    the sampling conversion's settings (``sampling.conversion``) and the expert's data mean.
    ``auto``: the init's own parameterisation and schedule in ``exact`` mode, else
    ``velocity``. It applies to the ``fm_velocity`` experts: a ``ddpm_eps`` expert's loss is
    the eps loss on ``experts.schedule``, so its network predicts ``eps`` there.
    """

    parameterization: str = "auto"
    schedule: Optional[str] = None  # the network's VP schedule (None: the init's, else experts.schedule)

    def validate(self) -> None:
        """One-line :class:`ConfigError` on a bad ``experts.network`` value."""
        check_choice("experts.network.parameterization", self.parameterization,
                     NETWORK_PARAMETERIZATIONS)
        if self.schedule is not None:
            check_choice("experts.network.schedule", self.schedule, SCHEDULE_NAMES)
        if self.parameterization == "velocity" and self.schedule is not None:
            raise ConfigError(f"experts.network.schedule={self.schedule!r}: a velocity network "
                              "has no VP schedule; leave it unset")


def weights_dir() -> str:
    """The folder named tags resolve into: ``$HDD_RAY_WEIGHTS``, default ``~/weights``."""
    return os.path.expanduser(os.environ.get(WEIGHTS_ENV) or "~/weights")


def resolve_init(value: Optional[str]) -> Optional[str]:
    """The checkpoint ``value`` names: a path (``file://`` too) or URI as given, a tag as its file in
    :func:`weights_dir`, or ``None`` (from scratch: unset or ``"none"``). Nothing is read: a
    config names files of the machines that train (:func:`check_init_exists` checks them)."""
    if value is None or str(value).strip() in ("", SCRATCH):
        return None
    value = str(value).strip()
    if value in PRETRAINED_TAGS:
        return os.path.join(weights_dir(), PRETRAINED_TAGS[value][0])
    return value[len("file://"):] if value.startswith("file://") else value  # a local path


def check_init_exists(key: str, value: Optional[str]) -> None:
    """One-line :class:`ConfigError` naming ``key`` when ``value`` names a local file or folder
    that is not there (a tag: where to fetch its file once). URIs are read later."""
    path = resolve_init(value)
    if path is None or "://" in path or os.path.exists(os.path.expanduser(path)):
        return
    if str(value).strip() in PRETRAINED_TAGS:
        name, source = PRETRAINED_TAGS[str(value).strip()]
        raise ConfigError(f"{key}={value!r}: {path} does not exist; nothing is downloaded at "
                          f"run time: fetch it once from {source} into {weights_dir()} "
                          f"(or set ${WEIGHTS_ENV})")
    raise ConfigError(f"{key}={value!r}: no such file or folder (a DiT .pt, PixArt .pth, "
                      "hdd_ray expert or diffusers folder; nothing is downloaded)")
