"""Per-t velocity-error curves (``evaluation/velocity_error.py``'s core) on tiny untrained experts."""

from __future__ import annotations

import csv
import io
import math

import torch

from hdd_ray.config import load_config, resolve_experts
from hdd_ray.evaluation.velocity_error import T_GRID, curves_csv, curves_png, expert_curves
from hdd_ray.models.expert import ExpertModel


def test_curves_cover_t_equal_1_and_the_new_conversion_is_finite_there():
    torch.manual_seed(0)
    text = resolve_experts(load_config())[0].text
    fm, ddpm = (ExpertModel("DiT-T/2", text, 8, 1).eval() for _ in range(2))
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    ddpm.set_data_mean(images)
    captions = [f"a scan of the digit {i}" for i in range(6)]
    rows = expert_curves((fm, {"objective": "fm_velocity"}),
                         (ddpm, {"objective": "ddpm_eps", "schedule": "linear"}),
                         images, captions, guidances=(1.0, 2.0), x0_clamp=1.0,
                         t_grid=(0.0, 0.5, 0.99, 1.0), draws=1)

    table = list(csv.DictReader(io.StringIO(curves_csv(rows))))
    assert list(table[0]) == ["guidance", "t", "fm", "ddpm", "ddpm_before", "ddpm_x0_clamp",
                              "ddpm_before_x0_clamp"]
    assert len(table) == 2 * 4
    assert T_GRID[-1] == 1.0 and sum(0.95 <= t < 1 for t in T_GRID) >= 4  # the jobs' grid
    at_1 = [r for r in table if float(r["t"]) == 1.0]
    for r in at_1:
        assert math.isfinite(float(r["ddpm"])) and float(r["ddpm"]) < 10
        # the earlier scheme divides the untrained network's eps error by 1e-3 there
        assert float(r["ddpm_before"]) > 100 * float(r["ddpm"])
    assert curves_png(rows, "tiny").startswith(b"\x89PNG")
