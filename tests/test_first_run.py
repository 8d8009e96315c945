"""A new user's first run: progress lines, --help with effective values, MLflow records kept
with the campaign, per-expert sample grids, jobs/sample.py, optuna checked early, Ray's noise
filtered (real local Ray, sqlite MLflow, real shards; one tiny campaign for the module)."""

from __future__ import annotations

import importlib.util
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from hdd_ray.config import ConfigError, load_config
from hdd_ray.progress import CampaignProgress, Progress
from hdd_ray.ray_noise import NoiseFilter

ROOT = Path(__file__).resolve().parent.parent


def _job(name: str):
    """``jobs/<name>.py`` as a module: its ``main(argv)`` runs the job in this process."""
    return importlib.import_module(f"jobs.{name}")

TINY = [
    "clustering.k=2", "clustering.fine_centroids=8", "experts.ddpm_clusters=[0]",
    "experts.train.steps=4", "experts.train.checkpoint_every=2", "experts.train.batch_size=16",
    "router.train.steps=4", "router.train.checkpoint_every=2", "router.train.batch_size=16",
    "ray.max_concurrent_experts=2",  # the demo's: two Ray workers, reused, train the 3 runs
    "evaluation.enabled=false", "sampling.steps=4",
    "tracking.experiment=first-run",
]


# ------------------------------------------------------------------------------ no Ray needed


def test_help_shows_effective_values_and_their_source(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # config files are shown relative to the start directory
    with pytest.raises(SystemExit) as exit_:
        _job("train_all_experts").main(["--help", "experts.train.steps=7"])
    out = capsys.readouterr()
    assert exit_.value.code == 0, out.err
    lines = {ln.split("=")[0].strip(): ln for ln in out.out.splitlines() if " = " in ln}
    # the demo config's values, not the schema's defaults, with the file they come from
    assert "[0, 3]" in lines["experts.ddpm_clusters"]
    assert "hdd_ray/configs/demo.yaml" in lines["experts.ddpm_clusters"]
    import yaml

    demo = yaml.safe_load((ROOT / "jobs/configs/demo.yaml").read_text())
    cap = demo["ray"]["max_concurrent_experts"]
    assert cap != 0 and f"= {cap} " in lines["ray.max_concurrent_experts"]  # schema default: 0
    assert "= 7 " in lines["experts.train.steps"] and "[command line]" in lines["experts.train.steps"]
    assert "[default]" in lines["sweep.mode"]


def test_help_with_another_config_file(tmp_path):
    from hdd_ray.cli import describe_effective

    cfg = tmp_path / "mine.yaml"
    cfg.write_text("experts:\n  train:\n    steps: 123\n")
    text = describe_effective(["--config", str(cfg)])
    line = next(ln for ln in text.splitlines() if "experts.train.steps =" in ln)
    assert "123" in line and "mine.yaml" in line
    bad = describe_effective(["nope.key=1"])
    assert "does not load" in bad and "nope" in bad


def test_noise_filter_drops_noise_keeps_errors():
    f = NoiseFilter()
    watcher = ("[2026-11-29 14:39:24,269 E 5427 5482] core_worker.cc:2465: Actor with class name: "
               "'PreemptionWatcher' and ID: '1c4f' has constructor arguments in the object store "
               "and max_restarts > 0. If the arguments ...")
    assert f.lines("a", [watcher, "training step 10"]) == ["training step 10"]
    # Ray's SIGTERM handler: a traceback ending in SystemExit, split over two batches
    assert f.lines("b", ["Exception ignored in: <function X.__del__ at 0x1>",
                         "Traceback (most recent call last):", '  File "x.py", line 1']) == []
    assert f.lines("b", ["SystemExit: 1", "next line"]) == ["next line"]
    # a real exception is printed whole
    real = ["Exception ignored in: <function Y.__del__ at 0x2>", "Traceback (most recent call last):",
            '  File "y.py", line 2', "ValueError: real problem", "after"]
    assert f.lines("c", real) == real
    other = "ERROR something else in core_worker.cc:100: real failure"
    assert f.lines("d", [other]) == [other]


def test_progress_lines_without_terminal(caplog):
    caplog.set_level(logging.INFO, logger="hdd_ray")
    with Progress(4, "sampling", unit="evals", interval_s=0.0, force_bar=False) as p:
        for _ in range(4):
            p.update()
    text = caplog.text
    assert "sampling: 1/4 evals (25 %)" in text and "ETA" in text
    assert "sampling: 4/4 evals (100 %)" in text and "done in" in text


def test_campaign_progress_lines(caplog):
    from hdd_ray.progress import RunStatus

    caplog.set_level(logging.INFO, logger="hdd_ray")
    cp = CampaignProgress(total=3, concurrency=1)
    cp.start("c0-fm-x", "fm_velocity, cluster 0", 800, None)
    cp.start("c1-fm-y", "fm_velocity, cluster 1", 800, 400)
    cp.end(RunStatus("c0-fm-x", "expert", 0, "fm_velocity", "trained", 800, 0.25, 99.0), 8.1)
    cp.end(RunStatus("c1-fm-y", "expert", 1, "fm_velocity", "failed", reason="boom"))
    text = caplog.text
    assert "c0-fm-x: starting, 800 steps" in text
    assert "c1-fm-y: resuming from step 400 of 800" in text
    assert "c0-fm-x: trained, 800 steps" in text and "8.1 steps/s" in text and "loss 0.2500" in text
    assert "campaign: 1/3 runs done" in text and "ETA" in text
    assert "c1-fm-y: failed: boom" in text and "1 failed" in text


def test_optuna_checked_before_training(monkeypatch):
    assert load_config(overrides=["sweep.mode=optuna"]).sweep.mode == "optuna"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "optuna" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install"):
        load_config(overrides=["sweep.mode=optuna"])


def test_sample_without_a_campaign_is_one_line(tmp_path, capsys):
    sample = _job("sample")

    assert sample.main(["--prompt", "a 7", f"root={tmp_path / 'none'}", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no clusters")
    assert sample.main([f"root={tmp_path / 'none'}", *TINY]) == 2
    assert "no prompt" in capsys.readouterr().err


# ------------------------------------------------------------------------- a tiny campaign


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, ray_local):
    """The main job run in-process from a directory outside the root (shared Ray instance)."""
    import os

    train_all_experts = _job("train_all_experts")
    cwd = tmp_path_factory.mktemp("elsewhere")
    root = tmp_path_factory.mktemp("campaign") / "root"
    logs: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logs.append(record.getMessage())

    keep = Keep(level=logging.INFO)
    logging.getLogger("hdd_ray").addHandler(keep)
    before = os.getcwd()
    os.chdir(cwd)
    try:
        assert train_all_experts.main([f"root={root}", *TINY]) == 0
    finally:
        os.chdir(before)
        logging.getLogger("hdd_ray").removeHandler(keep)
    return root, cwd, logs


@pytest.mark.ray
def test_progress_lines_of_the_main_job(campaign):
    _, _, logs = campaign
    text = "\n".join(logs)
    assert "starting, 4 steps (ddpm_eps" in text
    assert "trained, 4 steps" in text and "steps/s" in text and "loss" in text
    assert "campaign: 3/3 runs done" in text
    assert "campaign: 1/3 runs done" in text and "ETA" in text


@pytest.mark.ray
def test_mlflow_records_stay_with_the_campaign(campaign):
    root, cwd, _ = campaign
    assert not (cwd / "mlruns").exists() and not (cwd / "mlflow.db").exists()
    assert not (ROOT / "mlruns" / "first-run").exists()
    arts = root / "mlartifacts"
    names = {p.name for p in arts.rglob("*") if p.is_file()}
    assert {"config.yaml", "clusters_montage.png", "samples.png"} <= names
    assert len(list(root.glob("experts/*/samples.png"))) == 2  # one grid per expert
    with sqlite3.connect(root / "mlflow.db") as db:
        (location,) = db.execute("select artifact_location from experiments where name = ?",
                                 ("first-run",)).fetchone()
        params = dict(db.execute(
            "select p.key, p.value from params p join runs r on p.run_uuid = r.run_uuid "
            "where r.name = 'train_all_experts'").fetchall())
    assert location == arts.as_uri()
    assert params["experts.train.steps"] == "4" and params["clustering.k"] == "2"
    config = next(arts.rglob("config.yaml")).read_text()
    assert "ddpm_clusters:\n  - 0" in config or "ddpm_clusters: [0]" in config or "- 0" in config


@pytest.mark.ray
def test_a_launch_that_finds_everything_done_adds_no_run(campaign, monkeypatch):
    """The main job again on its finished campaign: prepare, experts and router are reused,
    nothing runs under the new campaign run, so it is not kept; the first one stays."""
    root, cwd, _ = campaign

    def campaign_runs() -> list[tuple[str, str]]:
        with sqlite3.connect(root / "mlflow.db") as db:
            return db.execute("select run_uuid, status from runs where name = "
                              "'train_all_experts' and lifecycle_stage = 'active'").fetchall()

    before = campaign_runs()
    assert [status for _, status in before] == ["FINISHED"]
    monkeypatch.chdir(cwd)
    assert _job("train_all_experts").main([f"root={root}", *TINY]) == 0
    assert campaign_runs() == before


@pytest.mark.ray
def test_sample_job_writes_png_and_prints_weights(campaign, tmp_path, capsys):
    from PIL import Image

    sample = _job("sample")

    root, _, _ = campaign
    out = tmp_path / "seven.png"
    # 4 images in batches of 3 and 1: each image's weights come from its own batch
    rc = sample.main(["--prompt", "a handwritten digit seven", "--prompt", "the number 3",
                      "--num", "2", "--steps", "3", "--out", str(out), f"root={root}", *TINY,
                      "sampling.batch_size=3"])
    captured = capsys.readouterr()
    text = captured.out
    assert rc == 0, captured.err + text
    assert Image.open(out).size[0] > 0 and f"wrote {out}" in text
    rows = [ln for ln in text.splitlines() if ln.strip().startswith("[")]
    assert len(rows) == 4
    for row in rows:  # each image: the experts it used, weights summing to 1 (top-2 of 2)
        weights = [float(part.rsplit(" ", 1)[1]) for part in row.split(": ", 1)[1].split(", ")]
        assert abs(sum(weights) - 1) < 0.02 and all(0 < w <= 1 for w in weights)
        assert "c0-ddpm-" in row or "c1-fm-" in row
    # a sweep that does not exist, an assignment of the wrong length: one line each
    assert sample.main(["--prompt", "x", "--mixture", "nope", f"root={root}", *TINY]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert sample.main(["--prompt", "x", "--assignment", "D F F", f"root={root}", *TINY]) == 2
    assert "--assignment" in capsys.readouterr().err
    # an assignment whose experts are not trained
    assert sample.main(["--prompt", "x", "--assignment", "F D", f"root={root}", *TINY]) == 2
    assert "not trained" in capsys.readouterr().err


@pytest.mark.ray
def test_checkpoint_lines_while_a_run_trains(campaign, tmp_path, monkeypatch, caplog):
    import shutil
    import time
    from types import SimpleNamespace

    from hdd_ray.training import launcher
    from hdd_ray.training.checkpoints import TASK_CHECKPOINT, TASK_METRICS

    root, _, _ = campaign
    # the demo's runs are Ray tasks (ray.executor: task): their checkpoint metrics file
    metrics = next(root.glob(f"experts/*/{TASK_CHECKPOINT}/{TASK_METRICS}"))
    run_dir = metrics.parent.parent
    assert launcher.latest_checkpoint_step(str(run_dir)) == 4
    assert launcher.latest_checkpoint_step(str(tmp_path)) is None
    caplog.set_level(logging.INFO, logger="hdd_ray")
    monkeypatch.setattr(launcher, "CHECKPOINT_LINE_EVERY_S", 0.02)
    job = SimpleNamespace(name="c9-fm-run", directory=str(tmp_path),
                          settings=SimpleNamespace(train=SimpleNamespace(steps=100)))
    with launcher._checkpoint_lines(job, CampaignProgress(1, 1)):
        time.sleep(1.0)  # the watcher first notes the checkpoint already there (none yet)
        (tmp_path / TASK_CHECKPOINT).mkdir()  # a checkpoint lands while it trains
        shutil.copy(metrics, tmp_path / TASK_CHECKPOINT / TASK_METRICS)
        deadline = time.time() + 20
        while "c9-fm-run: step" not in caplog.text and time.time() < deadline:
            time.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if "c9-fm-run" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("c9-fm-run: step 4/100"), caplog.text
    assert "steps/s" in lines[0] and "loss" in lines[0]


@pytest.mark.ray
def test_a_grid_that_cannot_be_placed_is_cancelled_not_waited_for(tmp_path, ray_local, caplog):
    """The sample grid is optional: a GPU task no node can place (or a hung one) is cancelled
    after its timeout with one warning line, and the launcher carries on."""
    import time

    from hdd_ray.corpus import write_tar
    from hdd_ray.preview import expert_grid

    shard = tmp_path / "shard-000000.tar"
    write_tar(str(shard), [{"__key__": "a", "txt": "a red square", "json": "{}"}])
    started = time.time()
    with caplog.at_level(logging.WARNING, logger="hdd_ray"):
        png = expert_grid(load_config(None, []), str(tmp_path / "expert"), [str(shard)],
                          {"gpus_per_worker": 1, "cpus_per_worker": 1}, timeout_s=2.0)
    assert png is None and time.time() - started < 20
    assert "sample grid: not done within 2 s" in caplog.text and "cancelled" in caplog.text


def test_each_progress_line_is_printed_once_even_when_a_library_logs_on_the_root_logger():
    """open_clip calls the module-level ``logging.info``, which runs ``basicConfig`` on an empty
    root logger: hdd_ray's lines must not then be printed a second time (``INFO:hdd_ray...``),
    and other loggers' warnings must still show."""
    code = (
        "import logging\n"
        "from hdd_ray.progress import configure_logging\n"
        "configure_logging()\n"
        "logging.info('a library speaks on the root logger')\n"
        "logging.getLogger('hdd_ray.progress').info('sampling: 5/10 evals')\n"
        "logging.getLogger('hdd_ray.launcher').warning('c1-fm: failed: why')\n"
        "logging.getLogger('some.library').warning('a real warning')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    both = out.stdout + out.stderr
    assert both.count("sampling: 5/10 evals") == 1, both
    assert both.count("c1-fm: failed: why") == 1, both
    assert "a real warning" in out.stderr
    assert "a library speaks" not in both  # INFO of other loggers stays quiet


@pytest.mark.ray
def test_mixtures_are_evaluated_in_parallel_tasks_with_the_metrics_of_one_task(campaign, tmp_path):
    """Two mixtures: a first task builds (or loads) the judge's caches, then one task per
    mixture; each mixture's metrics equal those of the same mixture evaluated alone (seeded per
    mixture; the second evaluation loads the caches the first one built)."""
    import shutil

    from hdd_ray.ensemble import MixtureSpec
    from hdd_ray.evaluation.remote import evaluate_on_ray

    root, _, _ = campaign
    keys = ("fid", "fid_floor", "clip_score", "diversity", "mixture_id", "routing")
    results = {}
    # the campaign trained the D F assignment's experts: two mixtures of them, by routing
    for label, routings in (("alone", ["topk"]), ("both", ["top1", "topk"])):
        copy = tmp_path / label
        shutil.copytree(root, copy, ignore=shutil.ignore_patterns("mixtures", "evaluation"))
        if label == "both":  # the judge's caches the first evaluation built: loaded, not rebuilt
            shutil.copytree(tmp_path / "alone" / "evaluation", copy / "evaluation")
        cfg = load_config(overrides=[f"root={copy}", *TINY, "evaluation.num_samples=32",
                                     "tracking.enabled=false"])
        specs = [MixtureSpec.from_config(cfg, [0], routing=r) for r in routings]
        out = evaluate_on_ray(cfg, specs)
        assert [r["routing"] for r in out] == routings  # in the order asked
        for r in out:
            assert (copy / "mixtures" / r["mixture_id"] / "metrics.json").exists()
        assert (copy / "evaluation" / "reference_clip").is_dir()  # built once, then loaded
        results[label] = {r["routing"]: {k: r[k] for k in keys} for r in out}
    assert results["both"]["topk"] == results["alone"]["topk"]
    assert results["both"]["top1"]["mixture_id"] != results["both"]["topk"]["mixture_id"]
