"""Campaign config: loading, overrides, the paper's one-line mix, and every one-line error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hdd_ray.config import (
    DEMO_CONFIG,
    CampaignConfig,
    ConfigError,
    load_config,
    resolve_experts,
    to_yaml,
)


def test_demo_config_loads_as_typed_dataclasses():
    cfg = load_config()
    assert isinstance(cfg, CampaignConfig)
    assert cfg.clustering.k == 8 and cfg.corpus.source == "demo"
    assert cfg.sampling.conversion.x0_clamp == 1.0


def test_corpus_uri_alone_selects_the_shards_and_the_demo_source_reads_none():
    cfg = load_config(overrides=["corpus.uri=/data/shards/{00000..00009}.tar"])
    assert cfg.corpus.source == "webdataset"
    with pytest.raises(ConfigError) as info:  # a uri the demo source would ignore: refused
        load_config(overrides=["corpus.source=demo", "corpus.uri=/data/shards"])
    assert str(info.value).startswith("corpus.uri='/data/shards': corpus.source='demo' is")
    with pytest.raises(ConfigError, match=r"corpus.uri=None: required"):
        load_config(overrides=["corpus.source=webdataset"])


def test_the_own_shards_template_marks_every_key_that_describes_the_data():
    """Keys whose demo values describe the digits (8 px grayscale png) are set in the template
    and marked SET, and the template loads as written."""
    path = DEMO_CONFIG.parent / "own-shards.yaml"
    lines = path.read_text().splitlines()
    marked = {line.split(":")[0].strip() for line in lines if "# SET" in line}
    assert {"uri", "image_key", "caption_key", "image_size", "channels", "k",
            "embedder"} <= marked
    cfg = load_config(path)
    demo = load_config()
    assert cfg.corpus.source == "webdataset"
    for key in ("image_key", "image_size", "channels"):
        assert getattr(cfg.corpus, key) != getattr(demo.corpus, key), key


def test_conversion_config_defaults_are_the_librarys_and_cover_every_safeguard():
    """A campaign gets as_velocity's defaults, and every Safeguards field is a config key."""
    import dataclasses

    from hdd_ray.config import ConversionConfig
    from hdd_ray.diffusion import Safeguards

    assert dataclasses.asdict(ConversionConfig()) == dataclasses.asdict(Safeguards())


def test_paper_mix_is_one_override():
    cfg = load_config(overrides=["experts.ddpm_clusters=[1,5]", "experts.schedule=cosine"])
    experts = resolve_experts(cfg)
    assert [e.objective for e in experts] == [
        "fm_velocity", "ddpm_eps", "fm_velocity", "fm_velocity",
        "fm_velocity", "ddpm_eps", "fm_velocity", "fm_velocity",
    ]
    assert experts[1].schedule == "cosine" and experts[0].schedule is None


def test_dotlist_overrides_and_per_expert_list():
    cfg = load_config(overrides=[
        "experts.train.steps=2000",
        "experts.list=[{cluster: 2, objective: ddpm_eps, steps: 50, resources: {custom: {gpu_80gb: 1}}}]",
    ])
    experts = resolve_experts(cfg)
    assert experts[0].train["steps"] == 2000
    assert experts[2].objective == "ddpm_eps" and experts[2].train["steps"] == 50
    assert experts[2].resources["custom"] == {"gpu_80gb": 1.0}
    assert experts[3].resources["custom"] == {}


def test_per_expert_resources_merge_over_the_default():
    cfg = load_config(overrides=[
        "experts.resources.cpus_per_worker=0.25", "experts.resources.max_failures=7",
        "experts.resources.custom={spot: 1}",
        "experts.list=[{cluster: 2, resources: {gpus_per_worker: 1, custom: {gpu_80gb: 1}}}]",
    ])
    experts = resolve_experts(cfg)
    listed, other = experts[2].resources, experts[1].resources
    assert listed["gpus_per_worker"] == 1.0 and other["gpus_per_worker"] == 0.0
    # the keys the entry does not give keep the default's values, maps merge key by key
    assert listed["cpus_per_worker"] == other["cpus_per_worker"] == 0.25
    assert listed["max_failures"] == other["max_failures"] == 7
    assert listed["custom"] == {"spot": 1.0, "gpu_80gb": 1.0} and other["custom"] == {"spot": 1.0}


def test_expert_id_depends_on_what_determines_the_weights_only():
    from hdd_ray.campaign import expert_id

    def id_of(overrides: list[str], data_hash: str = "h") -> str:
        cfg = load_config(overrides=["corpus.image_size=8", "corpus.channels=1", *overrides])
        manifest = {"clusters": [{"cluster": 1, "count": 1, "hash": data_hash, "shards": []}]}
        return expert_id(cfg, resolve_experts(cfg)[1], manifest)

    ident = id_of([])
    more_cpu = id_of(["experts.resources.cpus_per_worker=2"])
    ckpt = id_of(["experts.train.checkpoint_every=7"])
    sync_ckpt = id_of(["experts.train.async_checkpoint=false"])  # the same weights, written later
    assert ident == more_cpu == ckpt == sync_ckpt
    assert ident != id_of(["experts.train.steps=9"])
    assert ident != id_of([], "other-data")
    assert ident.startswith("c1-fm-")
    # a learning-rate schedule determines the weights; at the defaults (constant, no warm-up)
    # the keys are left out, so runs trained before they existed keep their ids
    assert ident != id_of(["experts.train.lr_schedule=cosine"])
    assert ident != id_of(["experts.train.warmup_steps=5"])
    from hdd_ray.campaign.identity import _identity_train

    train = resolve_experts(load_config())[1].train
    older = {k: v for k, v in train.items() if k not in ("lr_schedule", "warmup_steps")}
    assert _identity_train({**older, "lr_schedule": "constant", "warmup_steps": 0}) == \
        _identity_train(older)


def test_yaml_roundtrip(tmp_path):
    cfg = load_config(overrides=["experts.ddpm_clusters=[0]"])
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


BAD = [
    ("experts.bogus=1", r"^experts\.bogus: unknown key"),
    ("experts.train.steps=abc", r"^experts\.train\.steps='abc': wrong type, expected int"),
    ("experts.objective=score_sde", r"^experts\.objective='score_sde': unknown value, allowed: ddpm_eps, fm_velocity"),
    ("experts.schedule=quadratic", r"^experts\.schedule='quadratic': unknown value, allowed: linear, cosine"),
    ("experts.model=DiT-Huge/2", r"^experts\.model='DiT-Huge/2': unknown value, allowed: DiT-T/2"),
    ("router.model=router-Z", r"^router\.model='router-Z': unknown value, allowed: router-T"),
    ("sampling.routing=best", r"^sampling\.routing='best': unknown value, allowed: full, top1, topk, threshold"),
    ("sampling.sampler=rk4", r"^sampling\.sampler='rk4': unknown value, allowed: euler, heun"),
    ("experts.ddpm_clusters=[0,8]", r"^experts\.ddpm_clusters\[1\]=8: cluster id outside 0\.\.7"),
    ("experts.list=[{cluster: -1}]", r"^experts\.list\[0\]\.cluster=-1: cluster id outside 0\.\.7"),
    ("experts.train.steps=0", r"^experts\.train\.steps=0: must be > 0"),
    ("experts.train.batch_size=-4", r"^experts\.train\.batch_size=-4: must be > 0"),
    ("router.train.steps=-1", r"^router\.train\.steps=-1: must be > 0"),
    ("sampling.k=9", r"^sampling\.k=9: top-k must be in 1\.\.8"),
    ("sampling.routing=threshold", r"^sampling\.threshold=None: required when sampling\.routing='threshold'"),
    ("clustering.embedder=resnet", r"^clustering\.embedder='resnet': unknown value, allowed: pixels, dinov2, open_clip"),
    ("experts.train.caption_dropout=1.5", r"^experts\.train\.caption_dropout=1\.5: must be in \[0, 1\)"),
    ("sampling.conversion.min_one_minus_t=0", r"^sampling\.conversion\.min_one_minus_t=0\.0: must be in \(0, 1\)"),
    ("sampling.conversion.beyond_edge=clip",
     r"^sampling\.conversion\.beyond_edge='clip': unknown value, allowed: shrink, divide"),
    ("corpus.channels=2", r"^corpus\.channels=2: allowed: 1, 3"),
    ("experts.list=[{cluster: 1, resources: {gpus: 1}}]",
     r"^experts\.list\[0\]\.resources\.gpus: unknown key, allowed: num_workers, cpus_per_worker"),
    ("experts.list=[{cluster: 1, resources: {cpus_per_worker: -2}}]",
     r"^experts\.list\[0\]\.resources\.cpus_per_worker=-2\.0: must be >= 0"),
    ("experts.list=[{cluster: 1, resources: {num_workers: many}}]",
     r"^experts\.list\[0\]\.resources\.num_workers='many': Value 'many' of type 'str' could not"),
    ("not-an-override", r"^override 'not-an-override' is not of the form key=value"),
    # resources: a run needs a worker; Ray Train's failure budgets are integers >= -1
    ("experts.resources.num_workers=0",
     r"^experts\.resources\.num_workers=0: must be an integer >= 1$"),
    ("router.resources.num_workers=0", r"^router\.resources\.num_workers=0: must be an integer >= 1$"),
    ("experts.list=[{cluster: 2, resources: {num_workers: 0}}]",
     r"^experts\.list\[0\]\.resources\.num_workers=0: must be an integer >= 1$"),
    ("experts.resources.max_preemption_failures=-2",
     r"^experts\.resources\.max_preemption_failures=-2: must be an integer >= -1 \(-1 = unlimited\)$"),
    ("experts.list=[{cluster: 2, resources: {max_preemption_failures: -7}}]",
     r"^experts\.list\[0\]\.resources\.max_preemption_failures=-7: must be an integer >= -1"),
    ("router.resources.max_preemption_failures=1.5",
     r"^router\.resources\.max_preemption_failures=1\.5: wrong type, expected int"),
    ("router.resources.max_failures=-3", r"^router\.resources\.max_failures=-3: must be an integer >= -1"),
    ("experts.train.lr_schedule=step",
     r"^experts\.train\.lr_schedule='step': unknown value, allowed: constant, cosine$"),
    ("router.train.warmup_steps=-1", r"^router\.train\.warmup_steps=-1: must be >= 0"),
    ("experts.train.warmup_steps=5000",
     r"^experts\.train\.warmup_steps=5000: must be below experts\.train\.steps="),
    ("ray.executor=fork", r"^ray\.executor='fork': unknown value, allowed: train, task$"),
    # the demo runs each run as a Ray task: one worker per run, DDP needs Ray Train
    ("experts.resources.num_workers=2",
     r"^experts\.resources\.num_workers=2: ray\.executor=task runs each run as one Ray task "
     r"\(one worker\); use ray\.executor=train for more$"),
    ("router.resources.num_workers=4", r"^router\.resources\.num_workers=4: ray\.executor=task"),
]


@pytest.mark.parametrize("override,pattern", BAD, ids=[b[0] for b in BAD])
def test_each_config_error_is_one_line_naming_key_value_and_allowed(override, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(overrides=[override])
    assert "\n" not in str(info.value)


def test_resource_boundaries_are_accepted():
    cfg = load_config(overrides=[
        "experts.resources.num_workers=1", "experts.resources.max_failures=-1",
        "experts.resources.max_preemption_failures=0", "router.resources.max_preemption_failures=-1",
        "experts.list=[{cluster: 1, resources: {num_workers: 2, max_preemption_failures: 5}}]",
        "ray.executor=train"])  # two workers: DDP, Ray Train's
    assert cfg.experts.resources.max_failures == -1
    assert cfg.experts.resources.max_preemption_failures == 0
    assert cfg.experts.list[0].resources["max_preemption_failures"] == 5


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML") as info:
        load_config(bad)
    assert "\n" not in str(info.value)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("experts:\n  trian:\n    steps: 3\n")
    with pytest.raises(ConfigError, match=r"^experts\.trian: unknown key \(from config file"):
        load_config(unknown)


def test_import_has_no_side_effects():
    code = (
        "import sys, hdd_ray, hdd_ray.config, hdd_ray.diffusion, hdd_ray.ensemble, hdd_ray.models;"
        "assert 'ray' not in sys.modules, 'ray imported';"
        "assert 'mlflow' not in sys.modules, 'mlflow imported';"
        "import os; assert not os.path.exists('runs'), 'runs created'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(DEMO_CONFIG.parent))
    assert out.returncode == 0, out.stderr


def test_relative_root_is_resolved_from_the_start_directory_and_warned_inside_a_job_package(
        tmp_path, monkeypatch, capsys):
    from hdd_ray.cli import parse_job_args

    monkeypatch.chdir(tmp_path)
    cfg, _ = parse_job_args("", ["root=runs/x"])
    assert cfg.root == str(tmp_path / "runs" / "x")
    assert "warning" not in capsys.readouterr().err

    # the layout Ray unpacks a `ray job submit --working-dir` package into
    package = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab12"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)
    cfg, _ = parse_job_args("", ["root=runs/x"])
    err = capsys.readouterr().err.strip()
    assert cfg.root == str(package / "runs" / "x")
    assert err.startswith("warning: root=") and "absolute root" in err and "\n" not in err
    parse_job_args("", [f"root={tmp_path / 'abs'}"])  # an absolute root: the user chose it
    assert capsys.readouterr().err == ""
    cfg, _ = parse_job_args("", ["root=file:///data/campaign"])  # a file:// URI is absolute
    assert cfg.root == "file:///data/campaign" and capsys.readouterr().err == ""


def test_a_per_expert_step_count_is_checked_against_the_warm_up():
    with pytest.raises(ConfigError, match=r"^experts \(cluster 1\): train\.warmup_steps=100 must "
                                          r"be below its train\.steps=50$"):
        load_config(overrides=["experts.train.warmup_steps=100",
                               "experts.list=[{cluster: 1, steps: 50}]"])


def test_the_wheel_carries_the_configs_and_every_job_with_its_console_script(tmp_path):
    """A non-editable install has what the jobs need: the shipped configs inside the package,
    every module the console scripts name, LICENSE and the version (built offline, no deps)."""
    import zipfile

    import hdd_ray

    repo = DEMO_CONFIG.parents[2]
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(tmp_path), str(repo)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("hdd_ray-*.whl")
    assert wheel.name.startswith(f"hdd_ray-{hdd_ray.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in ("demo", "paper-8x-xl", "single-gpu-24gb", "own-shards"):
        assert f"hdd_ray/configs/{config}.yaml" in names, config
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    jobs = {line.split("=")[1].strip().split(":")[0] for line in scripts.splitlines()
            if line.startswith("hdd-")}
    assert {"hdd_ray.commands.train_all_experts", "hdd_ray.commands.sample",
            "hdd_ray.commands.export_mixture"} <= jobs
    for module in jobs:  # every module a console script runs, and what the jobs import
        assert module.replace(".", "/") + ".py" in names, module
    assert {"hdd_ray/cli.py", "hdd_ray/config/loading.py", "hdd_ray/training/launcher.py"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")
               for n in names)
    # by name, from any directory: what a console script does after `pip install .`
    assert load_config("paper-8x-xl").name == "paper-8x-xl"
    with pytest.raises(ConfigError, match="shipped configs, by name: demo, own-shards"):
        load_config("no-such-campaign")
