"""Training objectives. The training loop never knows which one it trains: it calls
``objective.loss(net, x0, cond)``, and the objective owns the path, the time sampling,
the target and the mapping to the network's time input.

* ``ddpm_eps``: ``x = sqrt(abar(tau)) x0 + sqrt(1 - abar(tau)) eps``, tau ~ U(0, T) (continuous),
  the network sees ``tau`` and predicts ``eps``.
* ``fm_velocity``: ``x_t = (1 - t) x0 + t eps``, t ~ U(0, 1) or logit-normal, the network sees
  ``1000 t`` (the same numeric range as ``tau``) and predicts ``v = eps - x0``.

An objective names the loss; the network it trains may predict something else
(:class:`~hdd_ray.diffusion.networks.NetworkSpec`: a pretrained DDPM checkpoint's ``eps`` on its
own schedule and time convention). A ``fm_velocity`` objective with a VP network reads the
network through the conversion (:func:`~hdd_ray.diffusion.convert.as_velocity`) inside its loss,
with the sampling conversion's settings and the expert's data mean, so its velocity at step 0
is exactly the converted network's and sampling reads it the same way.

Caption dropout (for classifier-free guidance) sets ``cond["drop"]`` on a random fraction of the
batch; models replace those captions with their learned null caption.

``loss`` is :meth:`Objective.draw` (every random draw of a batch: times, noise, dropout) then
:meth:`NoisedBatch.loss`; the training loop draws a worker's batch once and runs it in
micro-batches (:meth:`NoisedBatch.split`), so how a step is split changes no draw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hdd_ray import devices
from hdd_ray.choices import TIMESTEP_SAMPLING
from hdd_ray.diffusion.convert import Predictor, Safeguards, VelocityField, as_velocity
from hdd_ray.diffusion.networks import FM_TIME_SCALE, NetworkSpec  # noqa: F401 - re-exported
from hdd_ray.diffusion.schedules import VPSchedule, get_schedule, per_sample

Network = Callable[[Tensor, Tensor, Any], Tensor]


def sample_unit_time(
    n: int, method: str, device: torch.device | str, generator: torch.Generator | None = None
) -> Tensor:
    """``n`` times in (0, 1): ``uniform`` or ``logit_normal`` (SD3's, mean 0, std 1)."""
    if method == "uniform":
        return devices.rand(n, generator, device)
    if method == "logit_normal":
        return torch.sigmoid(devices.randn(n, generator, device))
    raise ValueError(
        f"unknown timestep sampling {method!r}, allowed: {', '.join(TIMESTEP_SAMPLING)}")


def drop_captions(cond: dict[str, Tensor] | None, p: float, generator=None) -> dict | None:
    """Mark a random fraction ``p`` of the batch as unconditional (``cond["drop"]``)."""
    if cond is None or p <= 0:
        return cond
    ref = next(iter(cond.values()))
    drop = devices.rand(ref.shape[0], generator, ref.device) < p
    if "drop" in cond:
        drop = drop | cond["drop"]
    return {**cond, "drop": drop}


def _rows(cond: dict[str, Tensor] | None, start: int, stop: int) -> dict[str, Tensor] | None:
    return None if cond is None else {k: v[start:stop] for k, v in cond.items()}


@dataclass(frozen=True)
class NoisedBatch:
    """A drawn batch: the network's input ``x`` at network ``time`` with ``cond``, and the
    ``target`` it should predict (:meth:`Objective.draw`)."""

    x: Tensor
    time: Tensor  # the objective's native time (the network reads its own convention of it)
    cond: dict[str, Tensor] | None
    target: Tensor
    objective: Objective
    #: the expert's data mean: the conversion's prior, where the loss reads a VP network as a
    #: velocity (an fm_velocity expert started from an eps checkpoint)
    prior_mean: Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def split(self, size: int) -> list[NoisedBatch]:
        """Consecutive micro-batches of at most ``size`` samples (the batch itself if it fits)."""
        n = len(self)
        if size >= n:
            return [self]
        return [NoisedBatch(self.x[i:i + size], self.time[i:i + size],
                            _rows(self.cond, i, i + size), self.target[i:i + size],
                            self.objective, self.prior_mean)
                for i in range(0, n, size)]

    def loss(self, net: Network) -> Tensor:
        """Mean squared error of ``net``'s prediction over this batch (in float32), the
        prediction as the objective reads its network (:meth:`Objective.prediction`)."""
        pred = self.objective.prediction(net, self.x, self.time, self.cond, self.prior_mean)
        return torch.mean((pred.float() - self.target.float()) ** 2)


class Objective:
    """A training objective and the way its network is read as a velocity field."""

    name: str = ""
    parameterization: str = ""

    def __init__(self, timestep_sampling: str = "uniform", network: NetworkSpec | None = None,
                 safeguards: Safeguards | None = None) -> None:
        self.timestep_sampling = timestep_sampling
        #: what the trained network predicts and how it reads time (default: the objective's own)
        self.network = network or NetworkSpec.native(self.name, None)
        #: the conversion's settings where the loss reads a VP network as a velocity
        self.safeguards = safeguards

    def sample_time(self, n: int, device, generator=None) -> Tensor:
        """Native training times for a batch of ``n``."""
        raise NotImplementedError

    def noise(self, x0: Tensor, eps: Tensor, time: Tensor) -> Tensor:
        """The noisy input at native ``time``."""
        raise NotImplementedError

    def target(self, x0: Tensor, eps: Tensor, time: Tensor) -> Tensor:
        """What the network should predict."""
        raise NotImplementedError

    def network_time(self, time: Tensor) -> Tensor:
        """The value fed to the network's timestep embedding (its time convention)."""
        return self.network.network_time(time)

    def prediction(self, net: Network, x: Tensor, time: Tensor, cond: Any,
                   prior_mean: Tensor | None = None) -> Tensor:
        """What the loss compares with :meth:`target`: the network's output at ``time``."""
        return net(x, self.network_time(time), cond)

    def loss(
        self,
        net: Network,
        x0: Tensor,
        cond: dict[str, Tensor] | None = None,
        caption_dropout: float = 0.0,
        generator: torch.Generator | None = None,
        prior_mean: Tensor | None = None,
    ) -> Tensor:
        """Mean squared error of the network's prediction on a freshly noised batch;
        ``prior_mean`` (the expert's data mean) is the conversion's, for a VP network trained
        with the flow-matching loss."""
        return self.draw(x0, cond, caption_dropout, generator, prior_mean).loss(net)

    def draw(
        self,
        x0: Tensor,
        cond: dict[str, Tensor] | None = None,
        caption_dropout: float = 0.0,
        generator: torch.Generator | None = None,
        prior_mean: Tensor | None = None,
    ) -> NoisedBatch:
        """Every draw of a training batch, in this order: times, noise, caption dropout."""
        time = self.sample_time(x0.shape[0], x0.device, generator)
        eps = devices.randn(x0.shape, generator, x0.device, x0.dtype)
        x = self.noise(x0, eps, time)
        cond = drop_captions(cond, caption_dropout, generator)
        return NoisedBatch(x, time, cond, self.target(x0, eps, time), self, prior_mean)

    def predictor(self, net: Network) -> Predictor:
        """``net`` as a native predictor ``predict(x_in, native_time, cond)``."""
        return lambda x, time, cond: net(x, self.network_time(time), cond)

    def velocity_field(self, net: Network, safeguards: Safeguards | None = None,
                       prior_mean: Tensor | None = None) -> VelocityField:
        """``net`` read in flow-matching coordinates (the conversion: ARCHITECTURE.md,
        "Conversion"); ``prior_mean`` is the expert's ``E[x0]`` (its training data's mean),
        used by VP objectives near t = 1 and ignored by flow matching."""
        return as_velocity(self.predictor(net), self.parameterization, None, safeguards)


class DDPMEps(Objective):
    """DDPM epsilon-prediction on a VP schedule, continuous ``tau`` in [0, T]."""

    name = "ddpm_eps"
    parameterization = "eps"

    def __init__(self, schedule: VPSchedule | str = "linear", timestep_sampling: str = "uniform",
                 network: NetworkSpec | None = None) -> None:
        self.schedule = get_schedule(schedule) if isinstance(schedule, str) else schedule
        # an eps network on this schedule; a pretrained one keeps its time convention
        time = network.time if network is not None else "native"
        super().__init__(timestep_sampling, NetworkSpec("eps", self.schedule.name, time))

    def sample_time(self, n: int, device, generator=None) -> Tensor:
        return sample_unit_time(n, self.timestep_sampling, device, generator) * self.schedule.T

    def noise(self, x0: Tensor, eps: Tensor, time: Tensor) -> Tensor:
        a = per_sample(self.schedule.alpha_bar(time), x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def target(self, x0: Tensor, eps: Tensor, time: Tensor) -> Tensor:
        return eps

    def velocity_field(self, net: Network, safeguards: Safeguards | None = None,
                       prior_mean: Tensor | None = None) -> VelocityField:
        return as_velocity(self.predictor(net), "eps", self.schedule, safeguards, prior_mean)


class FMVelocity(Objective):
    """Rectified-flow velocity prediction: ``x_t = (1 - t) x0 + t eps``, target ``eps - x0``."""

    name = "fm_velocity"
    parameterization = "velocity"

    def __init__(self, timestep_sampling: str = "uniform", network: NetworkSpec | None = None,
                 safeguards: Safeguards | None = None) -> None:
        super().__init__(timestep_sampling, network, safeguards)
        self._schedule = get_schedule(self.network.schedule) if self.network.is_vp else None

    def prediction(self, net: Network, x: Tensor, time: Tensor, cond: Any,
                   prior_mean: Tensor | None = None) -> Tensor:
        if not self.network.is_vp:
            return net(x, self.network_time(time), cond)
        # the network read as a velocity exactly as sampling reads it (the conversion)
        return self.velocity_field(net, self.safeguards, prior_mean)(x, time, cond)

    def velocity_field(self, net: Network, safeguards: Safeguards | None = None,
                       prior_mean: Tensor | None = None) -> VelocityField:
        if not self.network.is_vp:
            return as_velocity(self.predictor(net), "velocity", None, safeguards)
        return as_velocity(lambda x, tau, cond: net(x, self.network.network_time(tau), cond),
                           self.network.parameterization, self._schedule, safeguards, prior_mean)

    def sample_time(self, n: int, device, generator=None) -> Tensor:
        return sample_unit_time(n, self.timestep_sampling, device, generator)

    def noise(self, x0: Tensor, eps: Tensor, time: Tensor) -> Tensor:
        t = per_sample(time, x0)
        return (1 - t) * x0 + t * eps

    def target(self, x0: Tensor, eps: Tensor, time: Tensor) -> Tensor:
        return eps - x0



OBJECTIVES: dict[str, type[Objective]] = {"ddpm_eps": DDPMEps, "fm_velocity": FMVelocity}


def get_objective(
    name: str, schedule: str | None = "linear", timestep_sampling: str = "uniform",
    network: NetworkSpec | dict[str, Any] | None = None, safeguards: Safeguards | None = None,
) -> Objective:
    """The objective called ``name``; ``schedule`` is used by VP objectives only. ``network``
    (a spec or its dict, as ``expert.json`` records it; default: the objective's own) is what
    the network predicts; ``safeguards`` are the conversion's settings inside a flow-matching
    loss over a VP network (sampling's ``sampling.conversion``)."""
    spec = NetworkSpec.from_dict(network, name, schedule) if network is not None else None
    if name == "ddpm_eps":
        return DDPMEps(schedule or "linear", timestep_sampling, spec)
    if name == "fm_velocity":
        return FMVelocity(timestep_sampling, spec, safeguards)
    raise ValueError(f"unknown objective {name!r}, allowed: {', '.join(OBJECTIVES)}")
