"""Add ONE expert to a finished campaign (new shards become a cluster; the router grows).

A thin wrapper: the job is ``hdd_ray.commands.add_expert`` (``hdd-add-expert`` once the package is
installed), so ``python jobs/add_expert.py ...`` and ``hdd-add-expert ...`` run the same code.
"""

from hdd_ray.commands.add_expert import main

if __name__ == "__main__":
    raise SystemExit(main())
