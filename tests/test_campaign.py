"""The campaign layer: its paths, ids that never drift, and objective assignments."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hdd_ray.campaign import (
    CampaignPaths,
    expert_id,
    short_hash,
    with_assignment,
)
from hdd_ray.choices import format_assignment, parse_assignment
from hdd_ray.config import ConfigError, ResolvedExpert, load_config


def test_ids_are_those_of_earlier_releases():
    # golden values: a changed hash would orphan every expert already trained
    assert short_hash({"b": [1, 2], "a": "x"}) == "5125d018f8"
    expert = ResolvedExpert(
        index=3, cluster=3, objective="ddpm_eps", schedule="cosine", model="DiT-T/2",
        text={"encoder": "learned", "dim": 64},
        train={"steps": 100, "lr": 0.001, "checkpoint_every": 50, "compile": False},
        resources={"cpus_per_worker": 1.0})
    cfg = SimpleNamespace(corpus=SimpleNamespace(image_size=8, channels=1))
    manifest = {"clusters": [{"cluster": 3, "count": 1, "hash": "datahash", "shards": []}]}
    assert expert_id(cfg, expert, manifest) == "c3-ddpm-e9a868e387"


def test_format_assignment_is_the_inverse_of_parse_assignment():
    assert format_assignment([3, 0], 4) == "D F F D"
    for text in ("D F F D", "DFFD", "D,F,F,D", "ddpm_eps fm_velocity fm_velocity ddpm_eps"):
        assert parse_assignment(text, 4) == [0, 3]
    assert format_assignment(parse_assignment("F D F F", 4), 4) == "F D F F"
    with pytest.raises(ConfigError, match="unknown objective 'X' for cluster 1"):
        parse_assignment("D X F F", 4)
    with pytest.raises(ConfigError, match="3 objectives, expected one per cluster"):
        parse_assignment("D F F", 4)


def test_with_assignment_changes_the_assignment_and_only_a_given_schedule():
    cfg = load_config(overrides=["experts.schedule=linear"])
    other = with_assignment(cfg, (5, 1))
    assert other.experts.ddpm_clusters == [1, 5] and other.experts.schedule == "linear"
    assert with_assignment(cfg, [2], "cosine").experts.schedule == "cosine"
    assert other.clustering == cfg.clustering and other.root == cfg.root


def test_type_checkers_see_every_layout_path():
    """CampaignPaths' ``TYPE_CHECKING`` annotations name exactly the paths LAYOUT builds."""
    import ast
    import inspect

    from hdd_ray.campaign import directory

    cls = next(n for n in ast.parse(inspect.getsource(directory)).body
               if isinstance(n, ast.ClassDef) and n.name == "CampaignPaths")
    guard = next(n for n in cls.body if isinstance(n, ast.If))
    declared = [a.target.id for a in guard.body if isinstance(a, ast.AnnAssign)]
    assert declared == list(directory.LAYOUT)


def test_every_campaign_path_lives_under_the_root():
    paths = CampaignPaths("s3://bucket/camp")
    assert paths.sweep_dir("first") == "s3://bucket/camp/sweeps/first"
    assert paths.reference_stats == "s3://bucket/camp/evaluation/reference_stats"
    assert paths.reference_clip == "s3://bucket/camp/evaluation/reference_clip"
    assert paths.expert_dir("c0-fm-x") == "s3://bucket/camp/experts/c0-fm-x"
    assert paths.router_dir("router-x") == "s3://bucket/camp/router/router-x"
    assert paths.mixture_dir("d2-topk-x") == "s3://bucket/camp/mixtures/d2-topk-x"
