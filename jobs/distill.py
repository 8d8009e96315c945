"""Distil a mixture into one dense student (a flow-matching DiT that samples at guidance 1).

A thin wrapper: the job is ``hdd_ray.commands.distill`` (``hdd-distill`` once the package is
installed), so ``python jobs/distill.py ...`` and ``hdd-distill ...`` run the same code.
"""

from hdd_ray.commands.distill import main

if __name__ == "__main__":
    raise SystemExit(main())
