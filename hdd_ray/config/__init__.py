"""Typed campaign configuration: OmegaConf structured dataclasses, YAML + dotlist, validation.

A campaign is described by one :class:`CampaignConfig`. It is loaded from a YAML file (the
demo campaign ``hdd_ray/configs/demo.yaml`` when none is given), overridden from the command line
with ``key=value`` items (``experts.train.steps=2000``, ``experts.ddpm_clusters=[0,3]``) and
validated before anything else runs. Every problem raises :class:`ConfigError` with one line
that names the key path, the bad value and what is allowed.

Each section's dataclass carries its own ``validate`` method, so an option, its default and its
rule are read in one place:

* :mod:`hdd_ray.config.data` -- ``corpus``, ``latents``, ``clustering``;
* :mod:`hdd_ray.config.training` -- ``experts`` (``text``, ``list``), ``router`` and ``distill``, with the
  ``train``, ``resources`` and ``data`` sections they share;
* :mod:`hdd_ray.config.inference` -- ``sampling`` (``conversion``) and ``evaluation``;
* :mod:`hdd_ray.config.orchestration` -- ``tracking``, ``ray``, ``sweep``;
* :mod:`hdd_ray.config.schema` -- :class:`CampaignConfig` and :func:`resolve_experts`;
* :mod:`hdd_ray.config.validation` -- the checks that span sections (:func:`validate`);
* :mod:`hdd_ray.config.loading` -- :func:`load_config`, :func:`to_yaml`, :func:`to_dict`;
* :mod:`hdd_ray.config.rules` -- the one-line rules the sections check values by.

The choice lists shared with the implementing modules live in :mod:`hdd_ray.choices`; this
package loads without torch (it imports only :mod:`hdd_ray.errors` and :mod:`hdd_ray.choices`).
"""

from hdd_ray.config.data import (
    CORPUS_SOURCES,
    EMBEDDERS,
    LATENT_DTYPES,
    ClusteringConfig,
    CorpusConfig,
    LatentsConfig,
)
from hdd_ray.config.inference import (
    ConversionConfig,
    EvaluationConfig,
    EvaluationResources,
    SamplingConfig,
)
from hdd_ray.config.loading import (
    CONFIG_DIR,
    DEMO_CONFIG,
    config_path,
    load_config,
    to_dict,
    to_yaml,
)
from hdd_ray.config.orchestration import (
    EXECUTORS,
    SWEEP_MODES,
    AshaConfig,
    RayConfig,
    SweepConfig,
    TrackingConfig,
)
from hdd_ray.config.rules import SAFE_NAME, check_safe_name
from hdd_ray.config.schema import CampaignConfig, ResolvedExpert, resolve_experts
from hdd_ray.config.training import (
    DATA_MODES,
    LR_SCHEDULES,
    MICRO_BATCH_AUTO,
    MIXED_PRECISION,
    DataConfig,
    DistillConfig,
    ExpertsConfig,
    ExpertSpec,
    ResourcesConfig,
    RouterConfig,
    TextConfig,
    TrainConfig,
    merge_resources,
)
from hdd_ray.config.validation import (
    check_global_batch,
    check_micro_batch_size,
    check_swept_routing,
    validate,
    validate_sweep,
)
from hdd_ray.errors import ConfigError

__all__ = [
    "CONFIG_DIR",
    "CORPUS_SOURCES",
    "DATA_MODES",
    "DEMO_CONFIG",
    "EMBEDDERS",
    "EXECUTORS",
    "LATENT_DTYPES",
    "LR_SCHEDULES",
    "MICRO_BATCH_AUTO",
    "MIXED_PRECISION",
    "config_path",
    "SAFE_NAME",
    "SWEEP_MODES",
    "AshaConfig",
    "CampaignConfig",
    "ClusteringConfig",
    "ConfigError",  # what every check here raises (defined in hdd_ray.errors)
    "ConversionConfig",
    "CorpusConfig",
    "DataConfig",
    "DistillConfig",
    "EvaluationConfig",
    "EvaluationResources",
    "ExpertSpec",
    "ExpertsConfig",
    "LatentsConfig",
    "RayConfig",
    "ResolvedExpert",
    "ResourcesConfig",
    "RouterConfig",
    "SamplingConfig",
    "SweepConfig",
    "TextConfig",
    "TrackingConfig",
    "TrainConfig",
    "check_global_batch",
    "check_micro_batch_size",
    "check_safe_name",
    "check_swept_routing",
    "load_config",
    "merge_resources",
    "resolve_experts",
    "to_dict",
    "to_yaml",
    "validate",
    "validate_sweep",
]
