"""What an expert's network predicts and how it reads time, apart from the loss it trains with.

The objective (``ddpm_eps``, ``fm_velocity``) owns the loss; the network owns its
parameterisation. A network predicts

* ``velocity``: a flow-matching velocity at ``(x_t, t)``;
* ``eps`` / ``x0`` / ``v`` (VP v-prediction) at ``(x_in, tau)`` on a VP ``schedule``.

and reads time in one of three conventions (:data:`~hdd_ray.choices.TIME_CONVENTIONS`):

* ``native``: ``tau`` in [0, T] (VP networks), ``1000 t`` (velocity networks): hdd_ray's own;
* ``ddpm_step``: a 1,000-step DDPM checkpoint's integer step ``n`` (facebookresearch DiT,
  PixArt-alpha): its ``alpha_bar[n] = prod_{i<=n} (1 - beta_i)`` is our ``abar(tau = n + 1)``
  (our schedules have ``abar(0) = 1``), so the network is fed ``tau - 1`` (continuous, never
  rounded: the conversion needs the exact noise level);
* ``paper``: ``round(999 t)`` (velocity networks): the HDD paper's way of feeding flow-matching
  time to a network pretrained on DDPM steps; kept to measure against.

A ``fm_velocity`` expert with a VP network is trained through the conversion
(:func:`hdd_ray.diffusion.convert.as_velocity`) inside its loss, so it starts as exactly the
converted teacher and is sampled by the same conversion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from hdd_ray.choices import SCHEDULE_NAMES, TIME_CONVENTIONS

#: the flow-matching time is fed to native networks multiplied by this (same range as DDPM's tau)
FM_TIME_SCALE = 1000.0
#: what a network may predict (``auto`` is the config's, resolved before a network is built)
NETWORK_OUTPUTS = ("velocity", "eps", "x0", "v")


@dataclass(frozen=True)
class NetworkSpec:
    """A network's parameterisation, its VP schedule (``None`` for ``velocity``) and its time."""

    parameterization: str = "velocity"
    schedule: str | None = None
    time: str = "native"

    def __post_init__(self) -> None:
        if self.parameterization not in NETWORK_OUTPUTS:
            raise ValueError(f"unknown network parameterization {self.parameterization!r}, "
                             f"allowed: {', '.join(NETWORK_OUTPUTS)}")
        if self.time not in TIME_CONVENTIONS:
            raise ValueError(f"unknown time convention {self.time!r}, allowed: "
                             f"{', '.join(TIME_CONVENTIONS)}")
        if self.is_vp:
            if self.schedule not in SCHEDULE_NAMES:
                raise ValueError(f"a {self.parameterization} network needs a VP schedule "
                                 f"({', '.join(SCHEDULE_NAMES)}), got {self.schedule!r}")
            if self.time == "paper":
                raise ValueError("time convention 'paper' (round(999 t)) is for velocity networks")
        elif self.time == "ddpm_step":
            raise ValueError("time convention 'ddpm_step' is for VP (eps, x0, v) networks")

    @property
    def is_vp(self) -> bool:
        """Whether the network predicts on a VP schedule (``eps``, ``x0``, ``v``)."""
        return self.parameterization != "velocity"

    @classmethod
    def native(cls, objective: str, schedule: str | None = None) -> NetworkSpec:
        """The network an objective trains from scratch: ``eps`` on ``schedule`` for
        ``ddpm_eps``, ``velocity`` for ``fm_velocity``."""
        if objective == "ddpm_eps":
            return cls("eps", schedule or "linear")
        return cls()

    @classmethod
    def from_dict(cls, value: Mapping[str, Any] | NetworkSpec | None, objective: str,
                  schedule: str | None = None) -> NetworkSpec:
        """A spec from its dict (``expert.json``'s ``network``); ``None``: the objective's
        native network (experts exported before networks were recorded)."""
        if isinstance(value, NetworkSpec):
            return value
        if not value:
            return cls.native(objective, schedule)
        return cls(str(value["parameterization"]), value.get("schedule"),
                   str(value.get("time") or "native"))

    def as_dict(self) -> dict[str, Any]:
        """The spec as a plain dict (identities, ``expert.json``)."""
        return asdict(self)

    def network_time(self, time: Tensor) -> Tensor:
        """What the network's timestep embedding is fed for native ``time`` (``tau`` of a VP
        network, flow-matching ``t`` of a velocity network)."""
        if self.is_vp:
            return time - 1.0 if self.time == "ddpm_step" else time
        if self.time == "paper":
            return torch.round(time * 999.0)
        return time * FM_TIME_SCALE
