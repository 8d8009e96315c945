"""Ray Tune sweep of DDPM-vs-FM objective assignments per cluster (and routing, CFG, steps).

A thin wrapper: the job is ``hdd_ray.commands.sweep_objectives`` (``hdd-sweep`` once the package is
installed), so ``python jobs/sweep_objectives.py ...`` and ``hdd-sweep ...`` run the same code.
"""

from hdd_ray.commands.sweep_objectives import main

if __name__ == "__main__":
    raise SystemExit(main())
