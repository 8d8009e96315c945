"""Node-side spot watcher: the cloud's interruption notice becomes a Ray drain.

Started by the cluster YAMLs on every worker right after ``ray start`` (harmless on on-demand
nodes: no notice ever comes). Optional: without it a preempted node simply dies and its experts
resume from their last periodic checkpoint; with it Ray Train checkpoints first and the retry
counts as a preemption (``max_preemption_failures``), not a failure.

    python clusters/spot_watcher.py --cloud aws --address $RAY_HEAD_IP:6379
    python clusters/spot_watcher.py --cloud gcp --address $RAY_HEAD_IP:6379
    python clusters/spot_watcher.py --cloud gcp --node-id <hex> --metadata-url http://127.0.0.1:8080

The logic lives in ``hdd_ray/spot.py`` (unit-tested against a fake metadata server).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hdd_ray.spot import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
