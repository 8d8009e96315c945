"""Train ONE expert of a campaign, anywhere: a contributor's own machine or any Ray cluster.

A thin wrapper: the job is ``hdd_ray.commands.train_expert`` (``hdd-train-expert`` once the package is
installed), so ``python jobs/train_expert.py ...`` and ``hdd-train-expert ...`` run the same code.
"""

from hdd_ray.commands.train_expert import main

if __name__ == "__main__":
    raise SystemExit(main())
