"""The campaign layer: its directory, its manifest, the ids of its experts and router, its
objective assignments, its run directories' artifacts, and loading finished experts and the
router for inference.

Training, the ensemble, evaluation and sweeps all read the campaign through this package; none
of them needs the training launcher to find an expert (ARCHITECTURE.md describes the layers and
the campaign directory layout).

* :mod:`hdd_ray.campaign.directory` -- :class:`CampaignPaths` (every path) and the manifest;
* :mod:`hdd_ray.campaign.generations` -- the manifest's cluster sets (a campaign that grew);
* :mod:`hdd_ray.campaign.identity` -- identities and ids (:func:`short_hash`), assignments;
* :mod:`hdd_ray.campaign.artifacts` -- a run directory's state for reuse, its description and
  the checksum of its weights (verified once per file version);
* :mod:`hdd_ray.campaign.loading` -- :func:`load_expert`, :func:`load_router`.
"""

from hdd_ray.campaign.artifacts import (
    EXPERT_JSON,
    REQUIRED_KEYS,
    ROUTER_JSON,
    SETTLED_NS,
    STUDENT_JSON,
    VERIFIED_FILE,
    WEIGHTS,
    content_identity,
    existing_state,
    file_sha256,
    read_description,
    record_verified,
    safetensors_problem,
    verified_sha256,
    weights_problem,
)
from hdd_ray.campaign.directory import (
    CampaignPaths,
    cluster_info,
    cluster_shards,
    heldout_shards,
    load_manifest,
)
from hdd_ray.campaign.generations import (
    generation_view,
    generations,
    grown_data_hash,
    parent_view,
)
from hdd_ray.campaign.identity import (
    LATER_TRAIN_DEFAULTS,
    MEMORY_TRAIN_KEYS,
    NON_IDENTITY_TRAIN_KEYS,
    applied_precision,
    campaign_assignments,
    check_text_features,
    expert_id,
    expert_identity,
    grown_from,
    model_shape,
    router_id,
    router_identity,
    router_train,
    short_hash,
    student_id,
    student_identity,
    text_features_record,
    with_assignment,
    with_k,
    without_later_defaults,
)
from hdd_ray.campaign.loading import expert_objective, load_expert, load_router
from hdd_ray.campaign.starts import (
    ExpertStart,
    check_starts,
    describe_router_init,
    expert_start,
    start_identity,
)

__all__ = [
    "EXPERT_JSON",
    "LATER_TRAIN_DEFAULTS",
    "MEMORY_TRAIN_KEYS",
    "NON_IDENTITY_TRAIN_KEYS",
    "REQUIRED_KEYS",
    "ROUTER_JSON",
    "SETTLED_NS",
    "STUDENT_JSON",
    "VERIFIED_FILE",
    "WEIGHTS",
    "CampaignPaths",
    "ExpertStart",
    "applied_precision",
    "campaign_assignments",
    "check_starts",
    "cluster_info",
    "cluster_shards",
    "content_identity",
    "describe_router_init",
    "existing_state",
    "expert_id",
    "check_text_features",
    "expert_identity",
    "expert_objective",
    "expert_start",
    "file_sha256",
    "generation_view",
    "generations",
    "grown_data_hash",
    "grown_from",
    "heldout_shards",
    "load_expert",
    "load_manifest",
    "load_router",
    "model_shape",
    "parent_view",
    "read_description",
    "record_verified",
    "router_id",
    "router_identity",
    "router_train",
    "safetensors_problem",
    "short_hash",
    "start_identity",
    "student_id",
    "student_identity",
    "text_features_record",
    "verified_sha256",
    "weights_problem",
    "with_assignment",
    "with_k",
    "without_later_defaults",
]
