"""The diffusion math: VP schedules, objectives, the velocity conversion and ODE samplers.

Pure torch; nothing here knows about Ray.
"""

from hdd_ray.diffusion.convert import (
    BEYOND_EDGE,
    PARAMETERIZATIONS,
    Safeguards,
    as_velocity,
    edge_snr,
    vp_query,
)
from hdd_ray.diffusion.networks import NETWORK_OUTPUTS, NetworkSpec
from hdd_ray.diffusion.objectives import (
    FM_TIME_SCALE,
    OBJECTIVES,
    TIMESTEP_SAMPLING,
    DDPMEps,
    FMVelocity,
    NoisedBatch,
    Objective,
    drop_captions,
    get_objective,
    sample_unit_time,
)
from hdd_ray.diffusion.sampling import SAMPLERS, guided, null_condition, sample_ode, time_grid
from hdd_ray.diffusion.schedules import (
    SCHEDULES,
    CosineSchedule,
    LinearSchedule,
    VPSchedule,
    get_schedule,
    per_sample,
)

__all__ = [
    "BEYOND_EDGE",
    "FM_TIME_SCALE",
    "NETWORK_OUTPUTS",
    "OBJECTIVES",
    "PARAMETERIZATIONS",
    "SAMPLERS",
    "SCHEDULES",
    "TIMESTEP_SAMPLING",
    "CosineSchedule",
    "DDPMEps",
    "FMVelocity",
    "LinearSchedule",
    "NetworkSpec",
    "NoisedBatch",
    "Objective",
    "Safeguards",
    "VPSchedule",
    "as_velocity",
    "drop_captions",
    "edge_snr",
    "get_objective",
    "get_schedule",
    "guided",
    "null_condition",
    "per_sample",
    "sample_ode",
    "sample_unit_time",
    "time_grid",
    "vp_query",
]
