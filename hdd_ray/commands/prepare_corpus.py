r"""Embed and cluster the corpus into K per-cluster WebDataset shards: the first campaign stage.

Local demo (scikit-learn digits, a local Ray instance, outputs under runs/demo/clusters/):

    python jobs/prepare_corpus.py
    python jobs/prepare_corpus.py clustering.k=4 --force

Any Ray cluster (here a local one; outputs go where `root` points, so give an absolute path or
an s3:// / gs:// URI, not a path inside the uploaded working directory):

    ray start --head --num-cpus 2
    RAY_AUTH_MODE=token ray job submit --working-dir . -- \
        python jobs/prepare_corpus.py root=$PWD/runs/demo
    ray stop

A real corpus on a cluster with GPUs (DINOv2 features, weights from a local file on every node):

    ray job submit --working-dir . -- python jobs/prepare_corpus.py \
        --config my_campaign.yaml root=s3://bucket/campaign \
        corpus.uri='s3://bucket/laion/{00000..00127}.tar' \
        corpus.image_key=jpg clustering.embedder=dinov2 \
        clustering.embedder_arch=vit_large_patch14_dinov2 \
        clustering.embedder_weights=/mnt/weights/dinov2_vitl14.safetensors \
        clustering.num_actors=8 clustering.gpus_per_actor=1

Re-running with the same settings and input files reuses the result; --force recomputes.
Exit status 2 with one line `error: ...` for bad options or bad input.
"""

from __future__ import annotations

import sys

from hdd_ray.cli import parse_job_args


def main(argv: list[str] | None = None) -> int:
    """Parse options, prepare the corpus, print a summary; returns the exit status."""
    # bad options: one line, exit 2, before Ray; logging configured (hdd_ray.progress)
    cfg, args = parse_job_args(__doc__, argv)
    from hdd_ray.errors import PrepareError
    from hdd_ray.prepare import format_summary, prepare_corpus

    try:
        # Checks the input first, then joins RAY_ADDRESS / ray.address or starts a local Ray
        # instance (hdd_ray.placement.init_ray); a result that is up to date needs no Ray at all.
        manifest = prepare_corpus(cfg, force=args.force)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(("reusing " if manifest["reused"] else "wrote ") + f"{cfg.root}/clusters/manifest.json")
    print(format_summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
