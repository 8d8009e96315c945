"""Ray Tune sweeps of objective assignments (real local Ray + MLflow, CPU, K = 3 tiny experts).

A copy of the session's prepared campaign (tests/conftest.py) is shared by the module; the first
sweep trains the 2K = 6 experts the search space needs, the others reuse them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hdd_ray.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.ray

BASE = [
    "clustering.k=3", "clustering.fine_centroids=12", "sampling.k=2",
    "experts.ddpm_clusters=[0]", "experts.train.steps=30", "experts.train.batch_size=32",
    "experts.train.checkpoint_every=30", "router.train.steps=30", "router.train.checkpoint_every=30",
    "experts.resources.cpus_per_worker=0.25", "router.resources.cpus_per_worker=0.25",
    # two at a time, as the demo: two Ray worker processes trained all 7 runs (reused, their
    # imports done), instead of 7 new ones importing torch at once on 2 cores
    "ray.max_concurrent_experts=2",
    "evaluation.num_samples=64", "sampling.steps=4", "sampling.sampler=euler",
    "sweep.cpus_per_trial=1", "sweep.max_concurrent_trials=2", "sweep.k=[2]",
    "ray.executor=task",  # Ray Tune is under test here, not Ray Train (tests/test_training.py)
]


#: the corpus and clustering settings of the session's prepared campaign (set by ``prepared``):
#: part of a sweep's identity, and what lets the sweep job reuse the prepared corpus
PREPARED: list[str] = []


def _overrides(root: Path, *extra: str) -> list[str]:
    return [f"root={root}", *PREPARED, *BASE, *extra]


def _cfg(root: Path, *extra: str):
    return load_config(overrides=_overrides(root, *extra))


@pytest.fixture(scope="module")
def prepared(prepared_campaign, tmp_path_factory):
    """The module's copy of the session's demo campaign with K = 3 clusters."""
    PREPARED[:] = prepared_campaign.overrides
    return prepared_campaign.copy(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def first_sweep(prepared):
    """Assignments with 0 or 1 DDPM expert (4 mixtures), ASHA rungs 32 -> 64 samples."""
    from hdd_ray.sweep import run_sweep

    cfg = _cfg(prepared, "sweep.name=first", "sweep.mode=n_ddpm", "sweep.n_ddpm=[0,1]",
               "sweep.asha.sample_counts=[32]")
    return cfg, run_sweep(cfg, verbose=0)


def _client(cfg):
    from mlflow.tracking import MlflowClient

    from hdd_ray import tracking

    return MlflowClient(tracking.tracking_uri(cfg)), tracking.connect(cfg).experiment_id


def _trial_runs(cfg, parent: str):
    client, exp_id = _client(cfg)
    return client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent}' "
                                        "and tags.stage = 'sweep_trial'")


def test_sweep_covers_assignments_and_trains_each_expert_once(first_sweep):
    cfg, result = first_sweep
    root = Path(cfg.root)
    assert {r["assignment"] for r in result.rows} == {"F F F", "D F F", "F D F", "F F D"}
    # the 2K experts the space needs, each trained once, in one attempt
    descs = [json.loads(p.read_text()) for p in root.glob("experts/*/expert.json")]
    assert sorted((d["cluster"], d["objective"]) for d in descs) == sorted(
        (c, o) for c in range(3) for o in ("ddpm_eps", "fm_velocity"))
    assert all(len(d["attempts"]) == 1 and d["attempts"][0]["start_step"] == 0 for d in descs)
    assert result.trainings == result.experts_needed == 6
    # one MLflow child run per trial under the sweep run, with the trial's params
    runs = _trial_runs(cfg, result.parent_run_id)
    assert sorted(r.data.params["assignment"] for r in runs) == sorted(
        r["assignment"] for r in result.rows)
    assert len({r.data.tags["trial_id"] for r in runs}) == len(runs) == 4
    assert all(r.data.params["num_ddpm"] == str(r.data.params["assignment"].count("D"))
               for r in runs)
    # every trial's run ended, those ASHA stopped at the first rung too (the driver ends them),
    # with intervals, the diversity measure and the experts of the mixture
    assert {r.info.status for r in runs} == {"FINISHED"}
    early = [r for r in runs if r.data.tags["num_samples"] == "32"]
    assert all(r.data.tags.get("stopped_early") == "true" for r in early)
    assert not any("stopped_early" in r.data.tags for r in runs if r not in early)
    print(f"{len(early)} of {len(runs)} trials stopped at 32 samples")
    for r in runs:
        assert r.data.metrics["fid_low"] <= r.data.metrics["fid"] <= r.data.metrics["fid_high"]
        assert r.data.tags["diversity_metric"].endswith("_diversity")
        assert len(r.data.tags["experts"].split(",")) == 3
    # outputs: ranking, plot, best mixture (readable back as a spec)
    d = Path(result.directory)
    for name in ("ranking.csv", "ranking.md", "fid_clip_vs_num_ddpm.png", "best_mixture.json"):
        assert (d / name).is_file(), name
    from hdd_ray.sweep import load_mixture_spec

    variant, spec = load_mixture_spec(cfg, "first")
    assert spec.assignment(3) == result.best["assignment"]
    assert spec.num_samples == 64 and variant.experts.ddpm_clusters == list(spec.ddpm_clusters)
    client, _ = _client(cfg)
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"ranking.md", "ranking.csv", "fid_clip_vs_num_ddpm.png"} <= artifacts


def test_trial_runs_left_running_are_ended_stopped_early_or_failed(tmp_path):
    """A trial ASHA stops at an earlier rung (its actor ended mid-report) leaves its MLflow run
    RUNNING; the driver ends it FINISHED with ``stopped_early``, a failed one FAILED with its
    error, and leaves a run the trial ended itself as it is (real sqlite store, Tune's
    ``Result`` as ``tuner.fit()`` returns it)."""
    from ray.tune import Result

    from hdd_ray.sweep.trial import _trial_run, close_trial_runs

    cfg = load_config(overrides=[f"root={tmp_path / 'root'}", "sweep.name=closing"])
    runs = {t: _trial_run(cfg, None, t, f"trial {t}", {"assignment": "F F"})
            for t in ("stopped", "failed", "done")}
    runs["done"].finish()
    results = [Result(metrics={"trial_id": t, "num_samples": 32}, checkpoint=None, path="",
                      error=RuntimeError("boom\nCUDA out of memory") if t == "failed" else None)
               for t in runs]
    assert close_trial_runs(cfg, results) == 2
    client, _ = _client(cfg)
    got = {t: client.get_run(r.run_id) for t, r in runs.items()}
    assert got["stopped"].info.status == "FINISHED"
    assert got["stopped"].data.tags["stopped_early"] == "true"
    assert got["failed"].info.status == "FAILED"
    assert got["failed"].data.tags["error"] == "CUDA out of memory"
    assert got["done"].info.status == "FINISHED" and "stopped_early" not in got["done"].data.tags
    assert close_trial_runs(cfg, results) == 0  # nothing left running


def test_a_sweep_can_search_which_experts_to_keep(tmp_path):
    """``sweep.retire`` is a Tune dimension (left-out sets), read back by each trial; a sweep
    without it keeps the description (and so the restorability) it had before."""
    from hdd_ray.sweep.space import describe, param_space, trial_retired

    cfg = _cfg(tmp_path / "root", "sweep.retire=[[],[2],[0,1]]")
    space = param_space(cfg)
    assert space["retired"] == {"grid_search": ["", "2", "0,1"]}
    assert [trial_retired({"retired": v}) for v in space["retired"]["grid_search"]] == [
        [], [2], [0, 1]]
    assert describe(cfg)["sweep"]["retire"] == [[], [2], [0, 1]]
    assert "retire" not in describe(_cfg(tmp_path / "root"))["sweep"]
    assert "retired" not in param_space(_cfg(tmp_path / "root"))
    with pytest.raises(ConfigError, match=r"sweep.retire\[1\]=\[0, 1, 2\]: clusters to leave"):
        _cfg(tmp_path / "root", "sweep.retire=[[],[0,1,2]]").sweep.validate(3)


def test_bad_search_space_fails_with_one_line_before_any_trial(tmp_path, capsys, monkeypatch):
    """The job in process (its refusal before Ray as a process: test_hardening's sweep.name)."""
    import importlib

    sweep_objectives = importlib.import_module("jobs.sweep_objectives")
    monkeypatch.chdir(tmp_path)
    for bad, words in ((["sweep.n_ddpm=[4]"], "sweep.n_ddpm[0]=4"),
                       (["sweep.mode=list", "sweep.assignments=[DFX]"], "unknown objective 'X'"),
                       (["sweep.mode=everything"], "sweep.mode='everything'")):
        with pytest.raises(SystemExit) as exit_:
            sweep_objectives.main(_overrides(tmp_path / "nothing", *bad))
        assert exit_.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
        assert not (tmp_path / "nothing").exists()


def test_interrupted_sweep_restores_without_redoing_finished_trials(first_sweep, ray_local):
    import ray

    from hdd_ray.sweep import run_sweep

    cfg, _ = first_sweep
    root = Path(cfg.root)
    # two trials at a time (BASE): two are done when the job is killed, the third is left
    extra = ["sweep.name=resume", "sweep.mode=list",
             "sweep.assignments=[FFF,DFF,DDF]", "sweep.guidance=[1.0]"]
    before = set(root.glob("mixtures/*/metrics.json"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "sweep_objectives.py"),
                             *_overrides(root, *extra), f"ray.address={address}"],
                            cwd=root.parent, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 150
        while time.time() < deadline:
            new = set(root.glob("mixtures/*/metrics.json")) - before
            if len(new) >= 2:  # two trials evaluated (the first two, side by side)
                time.sleep(2)  # let Tune save its experiment state
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.3)
        else:
            raise AssertionError("no trial finished")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = {p: p.stat().st_mtime for p in set(root.glob("mixtures/*/metrics.json")) - before}
    assert len(done) < 3, "every trial finished before the kill: nothing left to restore"
    result = run_sweep(_cfg(root, *extra), verbose=0)
    assert result.restored
    assert {r["assignment"] for r in result.rows} == {"F F F", "D F F", "D D F"}
    assert all(p.stat().st_mtime == t for p, t in done.items())  # finished ones not redone
    assert len(set(root.glob("mixtures/*/metrics.json")) - before) == 3
    runs = _trial_runs(cfg, result.parent_run_id)
    assert len(runs) == len({r.data.tags["trial_id"] for r in runs}) == 3


def test_the_sweeps_best_is_registered_as_the_champion_and_exported(first_sweep, tmp_path):
    """``sweep.register_as`` on the finished sweep (restored: the name is no part of what
    defines it) exports the best to one folder, registers it and makes it the champion; the
    same best again keeps its version; ``jobs/export_mixture.py --best`` exports it too."""
    import importlib

    from hdd_ray.sharing import register_best
    from hdd_ray.sweep import run_sweep

    cfg, result = first_sweep
    root = Path(cfg.root)
    named = _cfg(root, "sweep.name=first", "sweep.mode=n_ddpm", "sweep.n_ddpm=[0,1]",
                 "sweep.asha.sample_counts=[32]", "sweep.register_as=digits")
    again = run_sweep(named, verbose=0)
    assert again.restored and again.best["mixture_id"] == result.best["mixture_id"]
    registered = again.registered
    assert (registered.name, registered.version, registered.champion) == ("digits", "1", True)
    client, _ = _client(cfg)
    version = client.get_model_version_by_alias("digits", "champion")
    assert version.tags["mixture_id"] == result.best["mixture_id"]
    assert float(version.tags["fid"]) == result.best["fid"] and version.tags["evaluation_key"]
    described = json.loads((root / "sweeps" / "first" / "mixture" / "mixture.json").read_text())
    assert described["assignment"] == result.best["assignment"]
    assert described["source"]["sweep"] == "first"
    assert described["metrics"]["fid"] == result.best["fid"]
    repeat = register_best(named, result.parent_run_id)
    assert repeat.version == "1" and "champion already" in repeat.reason
    assert len(client.search_model_versions("name = 'digits'")) == 1
    export = importlib.import_module("jobs.export_mixture")
    out = tmp_path / "best"
    assert export.main(["--best", "first", "--out", str(out), *_overrides(root),
                        "tracking.enabled=false"]) == 0
    exported = json.loads((out / "mixture.json").read_text())
    assert exported["metrics"] == described["metrics"] and exported["spec"] == described["spec"]


def test_a_sweep_described_before_later_settings_still_restores(tmp_path):
    """Settings added since a sweep was described (``train.compile``'s default, a grown
    router's ``router.grow``, ``sampling.router`` at ``learned``) do not make its restore
    refused; a setting that changes a number still does."""
    import copy

    from hdd_ray.sweep.space import comparable, describe

    now = describe(_cfg(tmp_path / "root"))
    older = copy.deepcopy(now)
    older["experts"]["train"]["compile"] = older["router"]["train"]["compile"] = False
    older["experts"]["train"]["async_checkpoint"] = False  # (`now` holds no such key)
    older["router"]["train"]["async_checkpoint"] = True
    older["router"]["grow"] = {"mode": "incremental", "steps": 200, "replay_samples": 1024}
    assert comparable(older) == now
    assert comparable({**older, "sampling": {**older["sampling"], "router": "learned"}}) == now
    changed = copy.deepcopy(older)
    changed["experts"]["train"]["steps"] += 1
    assert comparable(changed) != now
    centroid = copy.deepcopy(older)
    centroid["sampling"]["router"] = "centroid"
    assert comparable(centroid) != now
