"""Distilling a mixture into one dense student (hdd_ray/training/distill.py, jobs/distill.py).

* the distillation target at a fixed ``x_t`` is the mixture's velocity exactly as sampling
  computes it (same routing, guidance, conversion), with tiny random experts, no Ray;
* a student distilled from a tiny mixture with real Ray (``ray.executor=task``), its worker
  killed once: the run resumes from its last checkpoint and finishes, its card records the
  teacher; it then samples as a one-expert mixture.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hdd_ray.config import CampaignConfig, load_config

K = 3


def _tiny_mixture(guidance: float = 2.5, routing: str = "topk"):
    """Three tiny random experts (cluster 0 DDPM eps on the cosine schedule, 1 and 2 flow
    matching) and a random router, as a :class:`Mixture` (no campaign)."""
    from hdd_ray.ensemble import Mixture
    from hdd_ray.models.expert import ExpertModel, RouterModel

    torch.manual_seed(0)
    cfg = CampaignConfig()
    cfg = replace(cfg, clustering=replace(cfg.clustering, k=K),
                  corpus=replace(cfg.corpus, image_size=8, channels=1),
                  experts=replace(cfg.experts, ddpm_clusters=[0]),
                  sampling=replace(cfg.sampling, guidance_scale=guidance, routing=routing, k=2,
                                   steps=4, batch_size=8))
    text = {"encoder": "learned", "dim": 32, "depth": 1, "vocab_size": 256, "max_len": 8}
    experts = []
    for c in range(K):
        model = ExpertModel("DiT-T/4", text, 8, 1)
        with torch.no_grad():  # away from the zero-initialised heads: a non-trivial field
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
        model.set_data_mean(0.1 * torch.randn(1, 1, 8, 8))
        ddpm = c == 0
        experts.append((model.eval(), {
            "expert_id": f"c{c}-{'ddpm' if ddpm else 'fm'}-test", "cluster": c,
            "objective": "ddpm_eps" if ddpm else "fm_velocity",
            "schedule": "cosine" if ddpm else None, "image_size": 8, "channels": 1}))
    router = RouterModel("router-T", 8, 1, K)
    with torch.no_grad():
        for p in router.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return Mixture(experts, router.eval(), cfg)


def test_distillation_target_is_the_mixtures_velocity_as_sampling_computes_it(monkeypatch):
    import hdd_ray.diffusion
    from hdd_ray.ensemble import MixtureSpec, route
    from hdd_ray.training.distill import Teacher

    mixture = _tiny_mixture()
    prompts = ["a handwritten 3", "the digit seven", "a 0", "number 5, handwritten"]
    x_t = torch.randn(4, 1, 8, 8)
    t = torch.tensor([1.0, 0.97, 0.5, 0.05])  # sampling starts at t = 1 exactly
    seen = {}

    def one_call(field, noise, cond=None, steps=50, sampler="euler", shift=1.0):
        seen["v"] = field(x_t, t, cond)  # the velocity the ODE would step along here
        return noise

    monkeypatch.setattr(hdd_ray.diffusion, "sample_ode", one_call)
    for routing in ("topk", "top1"):
        spec = MixtureSpec.from_config(mixture.cfg, routing=routing)
        mixture.sample(prompts, seed=0, strategy=routing)
        teacher = Teacher.from_mixture(mixture, spec)
        target = teacher.velocity(x_t, t, prompts)
        # bit for bit: the same routing, guidance and conversion as sampling
        assert torch.equal(target, seen["v"]), routing
        assert target.abs().mean() > 1e-3
        # only the experts the router selects are evaluated (a lazy teacher loads only those)
        chosen = route(mixture.router_probs(x_t, t), spec.routing, spec.k).gt(0).any(0)
        assert teacher.loaded == [c for c in range(K) if chosen[c]]
        assert sum(teacher.evaluations) == len(prompts) * (2 if routing == "topk" else 1)
    # guidance matters (the target is the guided velocity), and a dropped caption's target is
    # the mixture's unconditional velocity
    unguided = Teacher.from_mixture(mixture, replace(spec, guidance=1.0))
    assert not torch.allclose(unguided.velocity(x_t, t, prompts), target)
    dropped = teacher.velocity(x_t, t, prompts, drop=torch.ones(4, dtype=torch.bool))
    null = unguided.velocity(x_t, t, prompts, drop=torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(dropped, null)


def test_bad_distill_settings_fail_in_one_line(capsys):
    from hdd_ray.commands import distill
    from hdd_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"distill.data_weight=1.5: must be in \[0, 1\]"):
        load_config(overrides=["distill.data_weight=1.5"])
    with pytest.raises(ConfigError, match="distill.teacher='D F': 2 objectives"):
        load_config(overrides=["distill.teacher=D F"])
    with pytest.raises(ConfigError, match="distill.model='DiT-Q'"):
        load_config(overrides=["distill.model=DiT-Q"])
    assert distill.main(["root=/nonexistent/campaign", "tracking.enabled=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no clusters at") and "\n" not in err


def _cfg(root: Path, overrides: tuple[str, ...], *extra: str):
    return load_config(overrides=[f"root={root}", *overrides, "evaluation.enabled=false",
                                  "ray.executor=task", "ray.max_concurrent_experts=0",
                                  "experts.resources.cpus_per_worker=0.25",
                                  "router.resources.cpus_per_worker=0.25",
                                  "distill.resources.cpus_per_worker=0.5", *extra])


def _student_state_when_checkpointed(root: Path, timeout: float = 240) -> tuple[Path, dict]:
    """The first task checkpoint of the student's run -> (its run directory, its state)."""
    from hdd_ray.training.checkpoints import STATE_FILE, TASK_CHECKPOINT, TASK_METRICS

    deadline = time.time() + timeout
    while time.time() < deadline:
        for d in (root / "students").glob("student-*") if (root / "students").exists() else []:
            if (d / TASK_CHECKPOINT / TASK_METRICS).exists():  # written after its state
                return d, torch.load(d / TASK_CHECKPOINT / STATE_FILE, weights_only=True)
        time.sleep(0.1)
    raise AssertionError(f"no student checkpoint appeared in {root / 'students'}")


@pytest.mark.ray
def test_a_killed_student_resumes_and_records_its_teacher(prepared_campaign, tmp_path):
    """A tiny teacher (3 experts + router, a few steps each, as Ray tasks), then jobs/distill.py
    in a thread with the teacher D F - (expert 2 left out: never loaded); the student's worker
    process is SIGKILLed after its first checkpoint; the task is retried from it and the job
    finishes. Its card records the teacher; its MLflow run is a child of the job's run, tagged
    with the teacher; it samples as a one-expert mixture."""
    from mlflow.tracking import MlflowClient

    from hdd_ray import tracking
    from hdd_ray.commands import distill, sample
    from hdd_ray.ensemble import Mixture
    from hdd_ray.training.launcher import train_campaign

    root = prepared_campaign.copy(tmp_path)
    tiny = ("experts.train.steps=2", "experts.train.batch_size=8", "router.train.steps=2",
            "router.train.batch_size=8")  # the teacher's recipe: its ids
    statuses = train_campaign(_cfg(root, prepared_campaign.overrides, *tiny,
                                   "tracking.enabled=false"))
    assert all(s.ok for s in statuses), [s.reason for s in statuses]

    steps, every = 60, 20
    argv = [f"root={root}", *prepared_campaign.overrides, *tiny, "evaluation.enabled=false",
            "ray.executor=task", "distill.resources.cpus_per_worker=0.5",
            "distill.teacher=D F -", f"distill.train.steps={steps}",
            f"distill.train.checkpoint_every={every}", "distill.train.batch_size=8",
            "--guidance", "3"]
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(rc=distill.main(argv)))
    runner.start()
    d, state = _student_state_when_checkpointed(root)
    assert state["step"] < steps - every, "the run got too far before the kill"
    os.kill(state["history"][-1]["pid"], signal.SIGKILL)  # the student's worker process
    runner.join(timeout=300)
    assert result.get("rc") == 0

    card = json.loads((d / "student.json").read_text())
    starts = [a["start_step"] for a in card["attempts"]]
    assert card["steps"] == steps and len(starts) == 2 and starts[0] == 0
    assert starts[1] > 0 and starts[1] % every == 0, starts  # from a checkpoint, not from 0
    teacher = card["teacher"]
    experts = sorted(p.name for p in (root / "experts").iterdir())
    assert [e and e["expert_id"] for e in teacher["experts"]] == [experts[0], experts[1], None]
    assert teacher["router"]["router_id"] == next((root / "router").iterdir()).name
    assert (teacher["assignment"], teacher["routing"], teacher["k"], teacher["guidance"]) == (
        "D F -", "topk", 2, 3.0)
    assert teacher["conversion"]["beyond_edge"] and teacher["sampler"]["steps"] > 0
    assert card["sample_guidance"] == 1.0 and card["identity"]["teacher"]["guidance"] == 3.0
    assert card["student_id"] == d.name and d.name.startswith("student-")

    cfg = _cfg(root, prepared_campaign.overrides, *tiny)
    client = MlflowClient(tracking.tracking_uri(cfg))
    (run,) = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
        f"tags.run_key = '{d.name}'")
    parent = client.get_run(run.data.tags[tracking.PARENT_TAG])
    assert parent.info.run_name == "distill" and parent.data.tags["stage"] == "campaign"
    assert run.data.tags["teacher_experts"] == f"{experts[0]},{experts[1]}"
    assert run.data.tags["status"] == "trained"  # retried within the launch

    student = Mixture.from_student(str(d), cfg)
    images = student.sample(["a handwritten 3", "a 7"], steps=2)
    assert images.shape == (2, 1, 8, 8) and student.last_evaluations == [2 * 3]
    out = tmp_path / "student.png"  # jobs/sample.py samples it by its id
    assert sample.main(["--student", d.name, "--prompt", "a 3", "--num", "1", "--steps", "2",
                        "--out", str(out), f"root={root}", *prepared_campaign.overrides,
                        *tiny, "tracking.enabled=false"]) == 0
    assert out.exists()


def test_the_memory_plan_counts_the_teacher():
    """Every expert of the teacher (each may be selected) and its router: fp32 weights, and one
    guided forward over the whole drawn batch (before it is split into micro-batches, never
    alive beside the student's activations); the monolith (no teacher) none of it."""
    from hdd_ray.training.distill import student_network
    from hdd_ray.training.memory import estimate, expert_network, router_network

    text = {"encoder": "learned", "dim": 64, "depth": 1, "vocab_size": 1024, "max_len": 8}
    expert = {"architecture": "DiT-S/2", "text": text}
    teacher = {"experts": [expert, None, expert], "router": {"model": "router-T"}}
    alone = student_network("DiT-T/4", text, 32, 4, None)
    net = student_network("DiT-T/4", text, 32, 4, teacher)
    weights = 2 * expert_network("DiT-S/2", text, 32, 4).trainable_params() + router_network(
        "router-T", 32, 4, 3).trainable_params()
    with_teacher, without = estimate(net, 8), estimate(alone, 8)
    assert with_teacher.state["teacher"] == 4 * weights and without.state["teacher"] == 0
    assert with_teacher.teacher_forward > 0 and without.teacher_forward == 0
    assert with_teacher.per_sample == without.per_sample  # the student's own
    # the teacher sees the drawn batch (64 samples), the student a micro-batch (8) at a time
    drawn = estimate(net, 8, rank_batch=64)
    assert drawn.teacher_forward == 8 * with_teacher.teacher_forward
    assert drawn.total == (sum(drawn.state.values()) + drawn.batch
                           + max(drawn.activations + drawn.transient, drawn.teacher_forward))
    assert with_teacher.total >= without.total + 4 * weights


def test_a_damaged_student_card_is_one_line(prepared_campaign, tmp_path, capsys):
    """``jobs/sample.py --student`` with a ``student.json`` that does not read, or lacks what
    sampling needs, fails in one line naming the file."""
    from hdd_ray.campaign import STUDENT_JSON, CampaignPaths
    from hdd_ray.commands import sample

    root = prepared_campaign.copy(tmp_path)
    card = Path(CampaignPaths(str(root)).student_dir("student-x")) / STUDENT_JSON
    card.parent.mkdir(parents=True)
    for damage in (b'{"sample_gui', b'{"steps": 3}'):
        card.write_bytes(damage)
        assert sample.main(["--student", "student-x", "--prompt", "a 3", f"root={root}",
                            *prepared_campaign.overrides, "tracking.enabled=false"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("error: --student student-x: ") and \
            "student.json is unreadable or incomplete" in err, err


def test_a_centroid_routed_teacher_is_refused_in_one_line():
    """The centroid router reads the prompt; the teacher routes on ``x_t`` with the learned
    router, so a mixture routed by centroids is refused before any expert is read."""
    import dataclasses

    from hdd_ray.config import load_config
    from hdd_ray.ensemble import MixtureSpec
    from hdd_ray.errors import MixtureError
    from hdd_ray.training.distill import campaign_teacher

    cfg = load_config()
    spec = dataclasses.replace(MixtureSpec.from_config(cfg), router="centroid")
    with pytest.raises(MixtureError, match="sampling.router=centroid: a teacher routes") as info:
        campaign_teacher(cfg, spec, {})
    assert "\n" not in str(info.value)
