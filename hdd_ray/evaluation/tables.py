"""The comparison tables of evaluated mixtures and the one-line summary of one, as a person
reads them: each metric as estimate ± half its 95 % interval, and paired differences
(:func:`hdd_ray.evaluation.mixture.paired_difference`) with whether they are significant.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from hdd_ray import storage
from hdd_ray.evaluation import statistics
from hdd_ray.evaluation.mixture import paired_difference

__all__ = ["COMPARISON_COLUMNS", "comparison_table", "difference_line", "summary"]

COMPARISON_COLUMNS = ("assignment", "num_ddpm", "routing", "k", "guidance", "steps",
                      "num_samples", "fid_n", "fid", "fid_floor", "clip_score", "diversity")
_NAMES = {"fid": "FID", "clip_score": "CLIP score", "diversity": "diversity"}


def difference_line(a: dict[str, Any], b: dict[str, Any], mixtures_dir: str) -> str:
    """One line: ``a - b`` per metric with its interval and whether it is significant."""
    head = f"paired difference {a['assignment']} minus {b['assignment']}"
    diff = paired_difference(a, b, mixtures_dir)
    if diff is None:
        return f"{head}: not paired (different prompts, N or bootstrap plan, or no per-sample data)"
    noise = "same prompts and noise" if a.get("seed") == b.get("seed") else "same prompts"
    parts = [f"{_NAMES[k]} {iv.text(3, signed=True)} "
             f"({'significant' if iv.significant else 'not significant'})"
             for k, iv in diff.items()]
    return f"{head} ({noise}, FID at n={a.get('fid_n')}): " + ", ".join(parts)


def comparison_table(results: list[dict[str, Any]], directory: str) -> str:
    """The mixtures side by side, each metric as estimate ± half its 95 % interval, then a
    paired difference of each mixture minus the baseline (the all-FM mixture, else the last);
    writes ``comparison.csv`` (with the interval bounds) and ``comparison.md``; returns the
    markdown (the job prints it). ``directory`` holds the mixtures (``mixtures/``)."""
    columns = statistics.interval_columns(COMPARISON_COLUMNS)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for r in results:
        writer.writerow([r.get(c) for c in columns])
    storage.write_bytes(storage.join(directory, "comparison.csv"), buf.getvalue().encode())

    lines = ["| " + " | ".join(COMPARISON_COLUMNS) + " |",
             "|" + "---|" * len(COMPARISON_COLUMNS)]
    lines += ["| " + " | ".join(statistics.cell(r, c) for c in COMPARISON_COLUMNS) + " |"
              for r in results]
    lines.append("")
    lines.append("± = half the 95 % bootstrap interval; FID and its floor at n = fid_n "
                 "(evaluation/README.md, Statistics).")
    if len(results) > 1:
        base = next((r for r in results if r.get("num_ddpm") == 0), results[-1])
        lines += ["", *(difference_line(r, base, directory) for r in results if r is not base)]
    md = "\n".join(lines)
    storage.write_bytes(storage.join(directory, "comparison.md"), (md + "\n").encode())
    return md


def summary(result: dict[str, Any]) -> str:
    """One line of a mixture's metrics with their intervals (what the evaluation job prints)."""
    return (f"FID {statistics.cell(result, 'fid')} (floor {statistics.cell(result, 'fid_floor')}"
            f", both at n = {result.get('fid_n')}; all N = {result.get('num_samples')}: "
            f"{statistics.cell(result, 'fid_full_n')}), CLIP score "
            f"{statistics.cell(result, 'clip_score')}, {result.get('diversity_metric')} "
            f"{statistics.cell(result, 'diversity')} (± = half the 95 % interval)")
