"""The main job: prepare the corpus, then every expert and the router as independent Ray Train runs.

A thin wrapper: the job is ``hdd_ray.commands.train_all_experts`` (``hdd-train`` once the package is
installed), so ``python jobs/train_all_experts.py ...`` and ``hdd-train ...`` run the same code.
"""

from hdd_ray.commands.train_all_experts import main

if __name__ == "__main__":
    raise SystemExit(main())
