"""Share a mixture: write it to one self-contained folder, log it to MLflow as a model, and

A thin wrapper: the job is ``hdd_ray.commands.export_mixture`` (``hdd-export`` once the package is
installed), so ``python jobs/export_mixture.py ...`` and ``hdd-export ...`` run the same code.
"""

from hdd_ray.commands.export_mixture import main

if __name__ == "__main__":
    raise SystemExit(main())
