"""The jobs: each module's ``main(argv) -> int`` is one job, installed as a console script
(``hdd-train``, ``hdd-train-expert``, ``hdd-prepare``, ``hdd-sweep``, ``hdd-sample``,
``hdd-export``, ``hdd-sync-mlflow``; ``pyproject.toml``) and run from a checkout as
``python jobs/<name>.py``. The entry layer: arguments in, lines printed, library calls."""
