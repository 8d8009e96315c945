"""The prepare stage: embed the corpus, cluster it, write per-cluster shards and the manifest.

* :mod:`hdd_ray.prepare.stage` -- :func:`prepare_corpus`, the stage as named steps;
* :mod:`hdd_ray.prepare.embedders` -- what k-means compares samples by;
* :mod:`hdd_ray.prepare.passes` -- the Ray Data passes (embed, assign, write);
* :mod:`hdd_ray.prepare.manifest` -- centroids, assignments, montage and the manifest.

The clustering math itself (k-means, balancing, held-out split) is :mod:`hdd_ray.clustering`.
"""

from hdd_ray.prepare.embedders import build_embedder, check_embedder
from hdd_ray.prepare.manifest import MANIFEST_VERSION, format_summary
from hdd_ray.prepare.stage import prepare_corpus

__all__ = [
    "MANIFEST_VERSION",
    "build_embedder",
    "check_embedder",
    "format_summary",
    "prepare_corpus",
]
