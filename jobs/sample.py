"""Your prompts to images: sample a trained campaign's mixture and write a PNG grid.

A thin wrapper: the job is ``hdd_ray.commands.sample`` (``hdd-sample`` once the package is
installed), so ``python jobs/sample.py ...`` and ``hdd-sample ...`` run the same code.
"""

from hdd_ray.commands.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
