"""Embed and cluster the corpus into K per-cluster WebDataset shards: the first campaign stage.

A thin wrapper: the job is ``hdd_ray.commands.prepare_corpus`` (``hdd-prepare`` once the package is
installed), so ``python jobs/prepare_corpus.py ...`` and ``hdd-prepare ...`` run the same code.
"""

from hdd_ray.commands.prepare_corpus import main

if __name__ == "__main__":
    raise SystemExit(main())
