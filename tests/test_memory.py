"""The memory plan (issue 24, item 3): activation checkpointing and micro-batches change no
result, the estimate is within 20 % of the measured peak of live tensor storage, a plan that
cannot fit one sample is refused in one line, and the paper's config fits both node types.
CPU only; each test a few seconds."""

from __future__ import annotations

import contextlib
from dataclasses import asdict

import pytest
import torch
from helpers_corpus import write_digit_shard
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hdd_ray.campaign import text_features_record
from hdd_ray.config import CONFIG_DIR, load_config, resolve_experts
from hdd_ray.diffusion import get_objective
from hdd_ray.errors import ConfigError
from hdd_ray.models import build_dit, build_router, count_parameters
from hdd_ray.models.expert import ExpertModel, RouterModel
from hdd_ray.models.text import OpenCLIPTextEncoder, register_tiny_open_clip_config
from hdd_ray.training import memory
from hdd_ray.training.loop import EMA, LocalHooks, run_loop
from hdd_ray.training.settings import RunSettings


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: one thread is ~20x faster than two (no OpenMP spinning on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------- measuring live storage


class LiveStorage(TorchDispatchMode):
    """The peak bytes of tensor storage created under it and still alive (weak references to
    each op's output storages; views share their base's). Storages of ``exclude`` (weights,
    inputs made before) are not counted. The running sum counts freed storages until the next
    sweep, so it bounds the live bytes from above: a sweep only when it passes the peak."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        super().__init__()
        self.exclude = {t.untyped_storage()._cdata for t in exclude}
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.total = self.peak = 0

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.refs.items() if ref.expired()]:
            self.total -= self.refs.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key, old = st._cdata, self.refs.get(st._cdata)
                if key in self.exclude or not st.nbytes() or (old and not old[0].expired()):
                    continue
                if old:  # a new storage where a freed one was
                    self.total -= old[1]
                self.refs[key] = (StorageWeakRef(st), st.nbytes())
                self.total += st.nbytes()
        if self.total > self.peak:
            self._sweep()
            self.peak = max(self.peak, self.total)
        return out


def _bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {t.untyped_storage()._cdata: t
                                                     for t in tensors}.values())


TEXT = {"encoder": "learned", "vocab_size": 256, "max_len": 16, "dim": 64, "depth": 1}


def _measured_step(model: torch.nn.Module, draw, precision: str) -> tuple[int, int]:
    """``(bytes kept between steps, peak bytes of a micro-step)``: the second micro-step of an
    accumulation (gradients already there) with AdamW's state and the EMA built, as the loop
    holds them."""
    torch.manual_seed(0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    draw().loss(model).backward()
    opt.step()  # the optimizer's state exists from the first step on
    ema = EMA(model, 0.99)
    draw().loss(model).backward()  # gradients of the step's first micro-batch
    kept = [*model.parameters(), *(p.grad for p in trainable),
            *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
            *ema.state_dict().values()]
    batch = draw()
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    tracker = LiveStorage(kept + list(model.buffers())
                          + [v for v in vars(batch).values() if torch.is_tensor(v)]
                          + list((getattr(batch, "cond", None) or {}).values()))
    with tracker:
        with autocast:
            loss = batch.loss(model)
        loss.backward()
    return _bytes(kept), tracker.peak


CASES = [  # (network, batch, checkpointing, precision)
    *[("DiT-T/2", 8, c, p) for c in (False, True) for p in ("fp32", "bf16")],
    ("DiT-T/4", 16, True, "bf16"),  # a final 3x3 convolution, 16 tokens; the widest margin
    ("router-T", 16, False, "bf16"), ("router-T", 16, True, "fp32")]


@pytest.mark.parametrize("name,batch,checkpointing,precision", CASES)
def test_the_estimate_is_within_20_percent_of_the_measured_peak(name, batch, checkpointing,
                                                                precision):
    torch.manual_seed(0)
    size, ch = 16, 4
    g = torch.Generator().manual_seed(1)
    if name.startswith("DiT"):
        model = ExpertModel(name, TEXT, size, ch)
        model.net.activation_checkpointing = checkpointing
        net = memory.expert_network(name, TEXT, size, ch)
        objective = get_objective("fm_velocity")
        captions = [f"a photo of thing {i}" for i in range(batch)]

        def draw():
            return objective.draw(torch.randn(batch, ch, size, size, generator=g),
                                  model.tokenize(captions), 0.3, g)
    else:
        from hdd_ray.training.loop import LabelledBatch

        model = RouterModel(name, size, ch, 8)
        model.net.activation_checkpointing = checkpointing
        net = memory.router_network(name, size, ch, 8)

        def draw():
            return LabelledBatch(torch.randn(batch, ch, size, size, generator=g),
                                 torch.rand(batch, generator=g) * 1000,
                                 torch.randint(0, 8, (batch,), generator=g))
    kept, peak = _measured_step(model, draw, precision)
    est = memory.estimate(net, batch, precision, checkpointing)
    state = {k: v for k, v in est.state.items() if k not in ("casts", "ddp")}
    # weights, gradients, AdamW (and its step counts), EMA: counted
    assert sum(state.values()) == pytest.approx(kept, rel=0.01)
    dynamic = est.activations + est.transient + est.state["casts"]
    ratio, total_ratio = dynamic / peak, est.total / (kept + peak)
    print(f"{name} batch {batch} {precision} checkpointing={checkpointing}: measured "
          f"{peak / 1e6:.2f} MB, estimated {dynamic / 1e6:.2f} MB ({ratio:.3f}); "
          f"with the state {total_ratio:.3f}")
    assert 0.8 <= ratio <= 1.2
    assert 0.8 <= total_ratio <= 1.2


def test_the_estimate_scales_with_the_architecture_as_counted():
    """Parameter counts are the networks' own; per-sample bytes grow with depth, width, tokens
    and text tokens, shrink in bf16 and with checkpointing."""
    arch = register_tiny_open_clip_config()
    clip = {"encoder": "open_clip", "arch": arch}
    tower = OpenCLIPTextEncoder(arch)
    for size in ("DiT-T/2", "DiT-T/4", "DiT-B/2", "DiT-XL/2"):
        for text in (TEXT, clip):
            net = memory.expert_network(size, text, 32, 4)
            with torch.device("meta"):
                model = build_dit(size, 32, 4, net.text_dim)
            learned = 0 if text is clip else sum(
                p.numel() for p in ExpertModel("DiT-T/2", TEXT, 8, 1).text.parameters())
            assert net.trainable_params() == count_parameters(model) + learned
    assert memory.expert_network("DiT-T/2", clip, 8, 1).frozen_params == count_parameters(tower)
    for size in ("router-T", "router-B"):
        with torch.device("meta"):
            router = build_router(size, 32, 4, 8)
        assert memory.router_network(size, 32, 4, 8).trainable_params() == \
            count_parameters(router)
    xl = memory.expert_network("DiT-XL/2", clip, 32, 4)
    one = memory.estimate(xl, 1, "bf16").per_sample
    assert memory.estimate(xl, 1, "fp32").per_sample > 1.5 * one
    assert memory.estimate(xl, 1, "bf16", checkpointing=True).per_sample < one / 5
    deeper = memory.Network(**{**vars(xl), "depth": 2 * xl.depth})
    assert memory.estimate(deeper, 1, "bf16").per_sample > 1.9 * one


# ----------------------------------------------------------------------------- same results


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    for name in ("DiT-T/2", "router-T"):
        grads = []
        for checkpointing in (False, True):
            torch.manual_seed(0)
            if name.startswith("DiT"):
                model = ExpertModel(name, TEXT, 8, 4)
                for p in model.parameters():  # zero-initialised layers would hide a path
                    p.data.add_(0.05 * torch.randn_like(p))
                g = torch.Generator().manual_seed(3)
                batch = get_objective("ddpm_eps").draw(
                    torch.randn(6, 4, 8, 8, generator=g),
                    model.tokenize(["a cat", "a dog on a mat"] * 3), 0.5, g)
                loss_of = batch.loss
            else:
                model = RouterModel(name, 8, 4, 5)
                x, t = torch.randn(6, 4, 8, 8), torch.rand(6) * 1000
                labels = torch.arange(6) % 5

                def loss_of(m, x=x, t=t, labels=labels):
                    return torch.nn.functional.cross_entropy(m(x, t), labels)
            model.net.activation_checkpointing = checkpointing
            loss = loss_of(model)
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()
                                          if p.grad is not None]))
        (l0, g0), (l1, g1) = grads
        assert torch.equal(l0, l1), name
        assert len(g0) == len(g1) and all(torch.allclose(a, b, rtol=1e-6, atol=1e-8)
                                          for a, b in zip(g0, g1, strict=True)), name


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_digit_shard(str(tmp_path_factory.mktemp("shards") / "shard-000000.tar"),
                             5, 48, "a handwritten digit five")


def _settings(shard: str, **train) -> RunSettings:
    cfg = load_config(overrides=["experts.ddpm_clusters=[]"])
    expert = resolve_experts(cfg)[0]
    return RunSettings.from_dict({
        "kind": "expert", "expert": asdict(expert), "image_size": 8, "channels": 1,
        "shards": [shard], "torch_threads": 1,
        "train": dict(expert.train, steps=3, checkpoint_every=10, batch_size=16, **train)})


def _weights(settings: RunSettings, directory) -> dict[str, torch.Tensor]:
    hooks = LocalHooks(str(directory))
    run_loop(settings, hooks)
    return hooks.load_state()["model"]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_micro_batches_give_the_same_update_as_the_whole_batch(shard, tmp_path, grad_accum):
    """The same samples, noise and mean loss: 16 at once, or 4 micro-batches of 4 (with and
    without checkpointing), or of at most 6 (6, 6, 4: each loss weighted by its share)."""
    whole = _weights(_settings(shard, grad_accum=grad_accum), tmp_path / "whole")
    for i, extra in enumerate([{"micro_batch_size": 4},
                               {"micro_batch_size": 4, "activation_checkpointing": True},
                               {"micro_batch_size": 6}]):
        split = _weights(_settings(shard, grad_accum=grad_accum, **extra), tmp_path / f"s{i}")
        for key, value in whole.items():
            assert torch.allclose(value, split[key], rtol=1e-5, atol=1e-6), (extra, key)


class _CountingDDP(torch.nn.Module):
    """A stand-in for DDP: records, per forward, whether it ran under ``no_sync``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module, self.synced, self._quiet = module, [], False

    @contextlib.contextmanager
    def no_sync(self):
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    def forward(self, *args, **kwargs):
        self.synced.append(not self._quiet)
        return self.module(*args, **kwargs)


class _TwoRanks(LocalHooks):
    rank, world = 0, 2

    def wrap(self, model):
        self.ddp = _CountingDDP(model)
        return self.ddp


def test_under_ddp_only_the_last_micro_batch_of_a_step_synchronises(shard, tmp_path):
    hooks = _TwoRanks(str(tmp_path / "run"))
    # 16 over 2 workers: 8 each, 2 chunks (grad_accum) of micro-batches of 3, 3, 2
    run_loop(_settings(shard, grad_accum=2, micro_batch_size=3), hooks)
    assert hooks.ddp.synced == ([False] * 5 + [True]) * 3


# ---------------------------------------------------------------------------- config and plan


def test_memory_keys_are_validated_in_one_line_naming_the_key():
    bad = [
        ("experts.train.micro_batch_size=0", "experts.train.micro_batch_size=0: must be 'auto'"),
        ("router.train.micro_batch_size=big", "router.train.micro_batch_size='big'"),
        ("experts.train.micro_batch_size=65", "train.micro_batch_size=65 is more than the "
                                              "per-worker batch 64"),
        ("experts.resources.gpu_memory_gb=24", "experts.resources.gpu_memory_gb=24: declared "
                                               "for workers without a GPU"),
        ("router.resources.gpu_memory_gb=-1", "router.resources.gpu_memory_gb=-1"),
    ]
    for override, message in bad:
        with pytest.raises(ConfigError) as info:
            load_config(overrides=[override])
        assert message in str(info.value) and "\n" not in str(info.value), override
    with pytest.raises(ConfigError, match=r"experts\.list\[0\]\.micro_batch_size=-2"):
        load_config(overrides=["experts.list=[{cluster: 0, micro_batch_size: -2}]"])


def test_micro_batches_and_checkpointing_are_not_part_of_a_run_identity():
    from hdd_ray.campaign import MEMORY_TRAIN_KEYS, expert_id, router_id
    from hdd_ray.sweep.space import describe

    manifest = {"data_hash": "d", "clusters": [{"cluster": c, "hash": f"h{c}", "count": 10,
                                                "shards": []} for c in range(8)]}

    def ids(overrides):
        cfg = load_config(overrides=overrides)
        return ([expert_id(cfg, e, manifest) for e in resolve_experts(cfg)],
                router_id(cfg, manifest))

    from hdd_ray.campaign.identity import _identity_train

    assert not set(memory_keys := ("micro_batch_size", "activation_checkpointing")) & set(
        _identity_train(resolve_experts(load_config())[0].train))
    assert memory_keys == MEMORY_TRAIN_KEYS
    base = ids([])
    assert ids(["experts.train.micro_batch_size=8", "experts.train.activation_checkpointing=true",
                "router.train.micro_batch_size=16",
                "experts.list=[{cluster: 2, micro_batch_size: 4}]"]) == base
    assert describe(load_config(overrides=["experts.train.activation_checkpointing=true"])) == \
        describe(load_config())
    cfg = load_config(overrides=["experts.list=[{cluster: 2, micro_batch_size: 4, "
                                 "activation_checkpointing: true}]"])
    resolved = resolve_experts(cfg)
    assert resolved[2].train["micro_batch_size"] == 4
    assert resolved[2].train["activation_checkpointing"] is True
    assert resolved[1].train["micro_batch_size"] == "auto"


def test_auto_takes_the_fewest_balanced_micro_batches_that_fit():
    assert memory.balanced(64, 13) == 13 and memory.balanced(64, 16) == 16
    assert memory.balanced(64, 40) == 32 and memory.balanced(64, 200) == 64
    assert memory.balanced(10, 3) == 3  # 3, 3, 3, 1: four forwards, none avoidable
    net = memory.expert_network("DiT-B/2", TEXT, 32, 4)
    for gb in (8, 12, 24, 48):
        p = memory.plan(net, 256, "auto", "bf16", gpu_memory_gb=gb)
        assert p.fits and p.estimate.total <= p.usable
        more = memory.estimate(net, p.micro_batch + 1, "bf16", rank_batch=256)
        fewer_steps = memory.balanced(256, 256 // (p.micro_steps - 1)) if p.micro_steps > 1 \
            else None
        assert p.micro_batch == 256 or more.total > p.usable or fewer_steps
    assert memory.plan(net, 64, "auto").micro_batch == 64  # no memory declared: all of it


def test_a_plan_that_cannot_fit_one_sample_is_refused_before_ray_naming_key_and_need(tmp_path):
    def refusal(gb):
        cfg = load_config(CONFIG_DIR / "paper-8x-xl.yaml", overrides=[
            f"experts.list=[{{cluster: 5, resources: {{gpu_memory_gb: {gb}}}}}]"])
        with pytest.raises(ConfigError) as info:
            memory.preflight(cfg, shape=(32, 4))
        assert "\n" not in str(info.value)
        return str(info.value)

    line = refusal(12)
    assert line.startswith("experts.list[0].resources.gpu_memory_gb=12: expert of cluster 5 "
                           "needs 14.3 GB for one sample per forward")
    assert "activation_checkpointing" not in line  # it would not fit with it either
    assert refusal(16).endswith("declare a larger GPU, or set "
                                "experts.train.activation_checkpointing=true (12.7 GB)")
    # the launcher refuses such a run before it waits for a GPU (its status line's reason)
    from hdd_ray.training.jobs import expert_job

    cfg = load_config(CONFIG_DIR / "paper-8x-xl.yaml", overrides=[
        f"root={tmp_path}", "experts.list=[{cluster: 5, resources: {gpu_memory_gb: 12}}]",
        "experts.init=null"])  # the DiT-XL/2 checkpoint is on the training nodes only
    latents = {"identity": "v", "shape": [4, 32, 32], "scaling_factor": 0.18215,
               "shift_factor": 0.0, "dtype": "float16"}
    manifest = {"data_hash": "d", "latents": latents, "clusters": [
        {"cluster": c, "count": 10, "hash": "h", "shards": [f"{c}/shard-000000.tar"]}
        for c in (4, 5)]}
    expert = resolve_experts(cfg)[5]
    # prepare stored the frozen ViT-L/14's caption features (hdd_ray.models.text_features)
    manifest["text_features"] = text_features_record(expert.text)
    job = expert_job(cfg, expert, manifest)
    assert job.precheck_error == refusal(12)
    assert expert_job(cfg, resolve_experts(cfg)[4], manifest).precheck_error == ""
    # the job says so before it starts MLflow, prepares anything or starts Ray
    from hdd_ray.commands import train_all_experts as job

    root = tmp_path / "root"
    assert job.main([f"root={root}", "experts.model=DiT-XL/2", "experts.resources.gpus_per_worker=1",
                     "experts.resources.gpu_memory_gb=4"]) == 2
    assert not root.exists()


def test_the_worker_checks_the_device_it_got(monkeypatch, caplog):
    class Props:
        name, total_memory = "NVIDIA L4", 22.5e9

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    net = memory.expert_network("DiT-XL/2", TEXT, 32, 4)
    train = load_config(CONFIG_DIR / "paper-8x-xl.yaml").experts.train
    cuda = torch.device("cuda")
    with caplog.at_level("WARNING"):
        p = memory.worker_plan(net, train, 64, 1, cuda, 24.0, 1.0, "expert")
    assert "resources.gpu_memory_gb=24 but NVIDIA L4 has 22.5 GB" in caplog.text
    assert p.gpu_memory_gb == 22.5 and p.fits and p.micro_batch < 13
    Props.total_memory = 10e9
    with pytest.raises(RuntimeError, match=r"^NVIDIA L4 \(total memory, GB\)=10: expert needs "
                                           r"1[0-9.]+ GB for one sample"):
        memory.worker_plan(net, train, 64, 1, cuda, None, 1.0, "expert")
    cpu = memory.worker_plan(net, train, 64, 1, torch.device("cpu"), 24.0, 1.0, "expert")
    assert cpu.micro_batch == 64 and cpu.precision == "fp32"


def test_the_paper_config_trains_on_both_of_its_node_types():
    cfg = load_config(CONFIG_DIR / "paper-8x-xl.yaml")
    plans = memory.preflight(cfg, shape=(32, 4))  # SD-VAE latents of 256 px images
    experts = resolve_experts(cfg)
    for p, e in zip(plans, experts, strict=False):
        node = e.resources["custom"]
        gb = 80 if "gpu_80gb" in node else 24
        assert e.resources["gpu_memory_gb"] == gb and p.fits, p.line()
        assert p.precision == "bf16" and p.network.depth == 28  # DiT-XL/2, as trained
        assert p.micro_batch == (64 if gb == 80 else 13), p.line()
    assert plans[-1].what == "router" and plans[-1].fits
    text = memory.describe_plans(cfg, 24, shape=(32, 4))
    assert text.count("\n") == len(plans) - 1 and "on 24 GB" in text
