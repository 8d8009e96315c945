"""How much GPU memory a training run needs, and the micro-batch that fits (the memory plan).

(Long because the estimate and the plans built on it are one model of memory, read together.)

A run's memory is what the loop keeps (:mod:`hdd_ray.training.loop`) plus what one forward and
backward pass saves, estimated from the architecture alone (no network is built):

* **state** (bytes per parameter): fp32 weights (4), gradients (4), AdamW's two moments (8),
  the EMA of the *trainable* parameters (4); a frozen text tower's weights (4, nothing else);
  DDP's gradient buckets (4) with more than one worker; under bf16 autocast the bf16 copies of
  the weights that autocast makes once per forward and the backward keeps (2; with
  checkpointing those outside the blocks and one block's). The gradients are counted as always
  there (they are from a step's second micro-batch on; on the first the peak is lower). A
  distilled student's teacher (:mod:`hdd_ray.training.distill`): its experts' and router's
  fp32 weights (4; every expert, as each may be loaded), and one network's guided forward over
  the whole drawn batch, which runs before the student's micro-batches (the peak is the larger
  of the two).
* **activations per sample**, block by block, each tensor the backward keeps at its dtype: under
  bf16 autocast the matmul inputs (cast copies), outputs, attention outputs and the MLP's hidden
  layer are bf16 (``a = 2`` bytes), what a LayerNorm keeps and returns fp32 (``r = 4``: the
  DiT's norms run in fp32, ``models/dit.Fp32LayerNorm``); the DiT's residual stream itself is
  bf16 (a block's input under checkpointing, the gradients flowing along it), the router's
  fp32; in fp32 every tensor is 4 bytes.
  The attention kernels are the fused ones (flash / memory-efficient: the output and a
  log-sum-exp are kept, never the N x L score matrix). A DiT block (AdaLN-Single: the shared
  ``t0`` modulation, so no per-block timestep MLP; self-attention, cross-attention to L text
  tokens, MLP of ratio m) keeps, with N tokens of width C and H heads::

      4r NC  (LN1 and LN2 outputs, the residual after cross-attention, the block's output)
      + 12a NC (modulated inputs, qkv, self-attention output and its copy in the heads'
                layout, proj and fc2 outputs kept for the gates, q and its input,
                cross-attention output)
      + 2a mNC (the MLP's hidden layer before and after GELU) + 2a LC (cross-attention k, v)
      + 8HN (log-sum-exps) + 16N (LayerNorm statistics)

  An encoder block (the router, the learned text encoder) has no modulation, gates or
  cross-attention: ``2r NC + 7a NC + 2a mNC``. Outside the blocks: the patch embedding, the
  timestep path, the caption projection (and a learned text encoder), the final layer, the loss.
* **activation checkpointing** (``train.activation_checkpointing``): a forward keeps each block's
  input only (``r NC`` per block); the backward recomputes one block at a time, so one block's
  activations are added once.
* **transients** of the backward pass: the gradients flowing along the residual stream and its
  branch (``2r NC``; ``r NC`` with checkpointing, where they replace the block's activations).

What is not a tensor (the CUDA context, kernels' workspaces, the caching allocator's
fragmentation) is the plan's margin: ``usable = (gpu_memory_gb - 1.5) * 0.9`` GB.

Measured against the peak of live tensor storage of a micro-step's forward and backward
(``tests/test_memory.py``, CPU, fp32 and bf16 autocast, with and without checkpointing): the
estimate is 0-15 % above it (CPU's flash attention keeps the copy counted above; CUDA's may
not). ``train.micro_batch_size: auto`` takes the fewest micro-steps whose micro-batch fits:
``ceil(batch / k)`` samples for the smallest such ``k`` (:func:`balanced`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hdd_ray.choices import DIT_SIZES, ROUTER_SIZES
from hdd_ray.errors import ConfigError

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig, ResolvedExpert

log = logging.getLogger(__name__)

__all__ = ["Estimate", "MemoryPlan", "Network", "balanced", "describe_plans", "estimate",
           "expert_network", "expert_plan", "plan", "plan_run", "plans_for_config", "preflight",
           "router_network", "router_plan", "worker_plan"]

GB = 1e9  # gpu_memory_gb counts decimal gigabytes, as GPUs are sold (a "24 GB" card: 24.1e9)
#: the CUDA context, cuBLAS/cuDNN workspaces, NCCL: memory that is not a tensor
RESERVED_GB = 1.5
#: the caching allocator's fragmentation, and what the estimate leaves out
HEADROOM = 0.10
#: attention heads of the learned text encoder (hdd_ray.models.LearnedTextEncoder's default)
LEARNED_TEXT_HEADS = 4


@dataclass(frozen=True)
class Network:
    """What a network's training memory depends on (built from the config, never the weights)."""

    kind: str  # "dit" | "router"
    hidden: int
    depth: int
    heads: int
    patch: int
    image_size: int  # what the network sees (the latent size in latent space)
    channels: int
    mlp_ratio: float = 4.0
    final_conv: bool = False
    text_tokens: int = 0  # L: caption tokens the DiT cross-attends to
    text_dim: int = 0  # D: their width
    text_depth: int = 0  # blocks of a learned (trained) text encoder; 0 = frozen or none
    text_vocab: int = 0
    frozen_params: int = 0  # a frozen text tower (weights only)
    num_classes: int = 0  # the router's K
    # a distillation's teacher (its experts and router, run without gradients in the worker)
    teacher: tuple[Network, ...] = ()

    @property
    def tokens(self) -> int:
        """N: image tokens (the router adds its CLS token)."""
        return (self.image_size // self.patch) ** 2 + (1 if self.kind == "router" else 0)

    @property
    def mlp(self) -> int:
        """M: the MLP's hidden width."""
        return int(self.hidden * self.mlp_ratio)

    def trainable_params(self) -> int:
        """Parameters the optimizer trains (those of ``hdd_ray.models``, counted)."""
        c, p, ch = self.hidden, self.patch, self.channels
        patch_in = ch * p * p * c + c
        temb = 256 * c + c + c * c + c
        blocks = self.depth * _block_params(self)
        if self.kind == "router":
            return (patch_in + c + temb + blocks + 2 * c
                    + c * self.num_classes + self.num_classes)
        d = self.text_dim
        total = (patch_in + temb + 6 * c * c + 6 * c + d * c + c + c * c + c + d
                 + blocks + 2 * c + c * p * p * ch + p * p * ch)
        if self.final_conv:
            total += ch * ch * 9 + ch
        if self.text_depth:  # the learned encoder, trained with the expert
            total += (self.text_vocab * d + self.text_tokens * d
                      + self.text_depth * (12 * d * d + 13 * d) + 2 * d)
        return total


def _encoder_block(n: int, c: int, m: int, heads: int, a: int, r: int) -> int:
    """Bytes an encoder block keeps per sample: the LN1 and LN2 outputs as the matmuls' inputs,
    qkv, the attention output and its copy in the heads' layout, the MLP's hidden layer before
    and after GELU (``a``); the residual after attention and the block's output (``r``)."""
    return 2 * r * n * c + 7 * a * n * c + 2 * a * m * n + 4 * heads * n + 16 * n


def _block(net: Network, a: int, r: int) -> int:
    """Bytes a block keeps per sample (the DiT's: the module docstring's sum)."""
    n, c, m, ell = net.tokens, net.hidden, net.mlp, net.text_tokens
    if net.kind == "router":
        return _encoder_block(n, c, m, net.heads, a, r)
    return (4 * r * n * c + 12 * a * n * c + 2 * a * m * n + 2 * a * ell * c
            + 8 * net.heads * n + 16 * n)


def _block_params(net: Network) -> int:
    c, m = net.hidden, net.mlp
    if net.kind == "router":  # two LayerNorms with affine weights, attention, MLP
        return 4 * c * c + 4 * c + 2 * c * m + m + c + 4 * c
    return 8 * c * c + 2 * c * m + 15 * c + m  # attention, cross-attention, MLP, the table


def _outside(net: Network, a: int, r: int) -> int:
    """Bytes per sample kept outside the blocks: embeddings, caption, final layer, loss."""
    n, c = net.tokens, net.hidden
    pixels = net.channels * net.image_size ** 2
    cast = a if a < r else 0
    stem = r * n * c + cast * pixels + 4 * (256 + 12 * c)  # h0, the cast input, timestep path
    if net.kind == "router":
        return stem + r * n * c + 8 * c
    ell, d = net.text_tokens, net.text_dim
    caption = 8 * ell * d + cast * ell * d + 3 * a * ell * c
    if net.text_depth:
        caption += net.text_depth * _encoder_block(ell, d, 4 * d, LEARNED_TEXT_HEADS, a, r)
        caption += 2 * r * ell * d
    final = r * n * c + a * n * c + (a + 4) * pixels  # LN out, its modulated cast, the loss
    if net.final_conv:
        final += (a + r) * pixels
    return stem + caption + final


@dataclass(frozen=True)
class Estimate:
    """A run's peak GPU memory, by part (bytes); :attr:`total` is what the plan compares."""

    micro_batch: int
    state: dict[str, int]  # weights, gradients, optimizer, ema, frozen, ddp, casts
    batch: int  # the drawn batch of one accumulation chunk (inputs, noise, targets)
    activations: int  # kept by the forward for the backward (micro_batch samples)
    transient: int  # the backward's own
    per_sample: int  # activations + transient of one sample
    #: a student's teacher, run without gradients on the whole drawn batch before the student's
    #: forward (``draw``): never alive beside the student's activations
    teacher_forward: int = 0

    @property
    def total(self) -> int:
        """Everything at the peak, in bytes."""
        return (sum(self.state.values()) + self.batch
                + max(self.activations + self.transient, self.teacher_forward))


def estimate(net: Network, micro_batch: int, precision: str = "fp32",
             checkpointing: bool = False, rank_batch: int | None = None,
             num_workers: int = 1) -> Estimate:
    """The peak memory of a training step at ``micro_batch`` samples per forward.

    ``precision``: ``bf16`` (autocast: bf16 matmuls, the DiT's residual stream bf16) or ``fp32``;
    ``rank_batch``: the samples one worker draws per accumulation chunk (default:
    ``micro_batch``); ``num_workers > 1`` adds DDP's gradient buckets. The peak is at the start
    of the backward pass (with checkpointing: of a block's recomputed backward).
    """
    a, r = (2, 4) if precision == "bf16" else (4, 4)
    p = net.trainable_params()
    # autocast's bf16 weight copies: all of them, kept by the graph; with checkpointing those
    # of the layers outside the blocks and of the one block being recomputed
    cast = p - (net.depth - 1) * _block_params(net) if checkpointing else p
    state = {"weights": 4 * p, "gradients": 4 * p, "optimizer": 8 * p, "ema": 4 * p,
             "frozen": 4 * net.frozen_params, "ddp": 4 * p if num_workers > 1 else 0,
             "casts": 2 * cast if a < r else 0,
             # fp32 weights under autocast, as sampling runs them; no gradients, no state
             "teacher": sum(4 * (t.trainable_params() + t.frozen_params) for t in net.teacher)}
    block = _block(net, a, r)
    # the DiT's residual stream itself is in the autocast dtype (models/dit.py casts the
    # position embedding and the modulation tables); what a LayerNorm saves stays fp32
    stream = a if net.kind == "dit" else r
    outside = _outside(net, a, r) - (r - stream) * net.tokens * net.hidden  # h0
    if checkpointing:  # each block's input kept, one block recomputed at a time
        kept = net.depth * stream * net.tokens * net.hidden + outside + block
    else:
        kept = net.depth * block + outside
    # the gradients flowing back: the residual stream's and its branch's (with checkpointing
    # they replace the recomputed block's activations as it is walked back: one)
    transient = (1 if checkpointing else 2) * stream * net.tokens * net.hidden
    # a teacher's forward (guided: conditional and null rows; no gradients, so at most one
    # network's block and its outside at a time) over the whole drawn batch
    teacher = max((2 * (_block(t, a, r) + _outside(t, a, r)) for t in net.teacher), default=0)
    pixels = net.channels * net.image_size ** 2
    drawn = (16 if net.kind == "dit" else 12) * pixels + 8 * net.text_tokens
    return Estimate(micro_batch=micro_batch, state=state,
                    batch=drawn * (rank_batch or micro_batch),
                    activations=kept * micro_batch, transient=transient * micro_batch,
                    per_sample=kept + transient,
                    teacher_forward=teacher * (rank_batch or micro_batch))


# ------------------------------------------------------------------------------------ the plan


def _size(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def usable_bytes(gpu_memory_gb: float, gpus_per_worker: float = 1.0) -> float:
    """What the plan may fill of a worker's GPU: its share of ``gpu_memory_gb`` less the
    memory that is not a tensor (:data:`RESERVED_GB`), less :data:`HEADROOM`."""
    share = gpu_memory_gb * min(1.0, gpus_per_worker or 1.0)
    return max(0.0, (share - RESERVED_GB) * (1 - HEADROOM)) * GB


@dataclass(frozen=True)
class MemoryPlan:
    """How one run (an expert or the router) fits its GPU: the micro-batch and the estimate."""

    what: str  # "experts (cluster 1)", "router"
    memory_key: str  # the config key that declares the GPU memory
    train_key: str  # the train section: experts.train, experts.list[i], router.train
    network: Network
    rank_batch: int  # samples per worker per accumulation chunk: batch_size / num_workers
    grad_accum: int
    precision: str
    checkpointing: bool
    gpu_memory_gb: float | None
    usable: float | None  # bytes the plan may fill; None = not declared (no limit known)
    micro_batch: int | None  # None: not even one sample fits
    estimate: Estimate  # at micro_batch (at one sample when none fits)
    num_workers: int = 1

    @property
    def fits(self) -> bool:
        """Whether the plan's micro-batch fits (always, when no memory is declared)."""
        return self.micro_batch is not None and (self.usable is None
                                                 or self.estimate.total <= self.usable)

    @property
    def micro_steps(self) -> int:
        """Forward/backward passes per optimizer step (per worker)."""
        return self.grad_accum * math.ceil(self.rank_batch / (self.micro_batch or 1))

    def line(self) -> str:
        """One line: what fits, with the estimate and the memory it is checked against."""
        e = self.estimate
        where = (f"{self.gpu_memory_gb:g} GB ({self.usable / GB:.1f} GB usable)"
                 if self.usable is not None else "no gpu_memory_gb declared")
        head = (f"{self.what}: micro-batch {self.micro_batch} x {self.micro_steps} "
                f"micro-step(s) of a per-worker batch of {self.rank_batch}"
                if self.micro_batch else f"{self.what}: not even one sample fits")
        return (f"{head}; estimate {_size(e.total)} (state {_size(sum(e.state.values()))} + "
                f"{_size(e.per_sample)}/sample, {self.precision}"
                f"{', checkpointing' if self.checkpointing else ''}) on {where}")

    def refusal(self) -> str:
        """The one line that refuses a plan in which not one sample fits ('' when it fits)."""
        if self.micro_batch is not None:
            return ""
        need = self.estimate.total / GB
        recomputed = estimate(self.network, 1, self.precision, True, self.rank_batch,
                              self.num_workers)
        hint = ("" if self.checkpointing or recomputed.total > (self.usable or 0)
                else f", or set {self.train_key}.activation_checkpointing=true "
                     f"({recomputed.total / GB:.1f} GB)")
        return (f"{self.memory_key}={self.gpu_memory_gb:g}: {self.what} needs {need:.1f} GB "
                f"for one sample per forward ({self.network_name()}, {self.precision}), "
                f"{self.usable / GB:.1f} GB usable (less {RESERVED_GB:g} GB and "
                f"{HEADROOM:.0%} headroom): declare a larger GPU{hint}")

    def network_name(self) -> str:
        """The network in words, for the one-line refusal."""
        n = self.network
        return (f"{n.kind} width {n.hidden} depth {n.depth}, {n.tokens} tokens, "
                f"{n.trainable_params() / 1e6:.0f}M trainable parameters")


def balanced(rank_batch: int, most: int) -> int:
    """The micro-batch of the fewest forwards of at most ``most`` samples over ``rank_batch``:
    ``ceil(rank_batch / k)`` with ``k = ceil(rank_batch / most)`` (64 at most 13: 5 x 13)."""
    steps = math.ceil(rank_batch / max(1, min(most, rank_batch)))
    return math.ceil(rank_batch / steps)


def plan(net: Network, rank_batch: int, micro_batch: Any = "auto", precision: str = "fp32",
         checkpointing: bool = False, gpu_memory_gb: float | None = None,
         gpus_per_worker: float = 1.0, grad_accum: int = 1, num_workers: int = 1,
         what: str = "run", memory_key: str = "resources.gpu_memory_gb",
         train_key: str = "train") -> MemoryPlan:
    """The micro-batch of a run and its estimate.

    ``micro_batch``: at most that many samples per forward (an integer), or ``auto``: the
    whole per-worker batch when no memory is declared, else the most that fit
    ``gpu_memory_gb``; None when not even one sample fits. Either way the per-worker batch is
    split into the fewest micro-batches of at most that size, balanced (:func:`balanced`).
    """
    usable = None if gpu_memory_gb is None else usable_bytes(gpu_memory_gb, gpus_per_worker)

    def at(m: int) -> Estimate:
        return estimate(net, m, precision, checkpointing, rank_batch, num_workers)

    if micro_batch != "auto":
        most = int(micro_batch)
    elif usable is None:
        most = rank_batch
    else:
        one = at(1)
        # state and the drawn batch (a student's teacher, which must fit beside them, runs
        # before the micro-batches, not with them)
        fixed = one.total - max(one.per_sample, one.teacher_forward)
        most = int((usable - fixed) // one.per_sample) if usable >= one.total else 0
    chosen = balanced(rank_batch, most) if most >= 1 else None
    return MemoryPlan(what=what, memory_key=memory_key, train_key=train_key, network=net,
                      rank_batch=rank_batch, grad_accum=grad_accum, precision=precision,
                      checkpointing=checkpointing, gpu_memory_gb=gpu_memory_gb, usable=usable,
                      micro_batch=chosen, estimate=at(chosen or 1), num_workers=num_workers)


# ------------------------------------------------------------------------- from the config


def _open_clip_params(text: dict[str, Any]) -> int:
    """Parameters of an open_clip text tower as :class:`hdd_ray.models.OpenCLIPTextEncoder`
    keeps it: embeddings, the transformer, the final LayerNorm (no projection)."""
    w, hidden = text["width"], int(text["width"] * text["mlp_ratio"])
    layer = 4 * w * w + 4 * w + 2 * w * hidden + hidden + w + 4 * w
    return (text["vocab_size"] + text["context_length"]) * w + text["layers"] * layer + 2 * w


def expert_network(model: str, text: dict[str, Any], image_size: int, channels: int) -> Network:
    """An expert's :class:`Network`: DiT ``model`` (``DIT_SIZES``) over ``channels`` x
    ``image_size``² inputs with the text encoder of ``experts.text`` (``text``)."""
    spec = DIT_SIZES[model]
    base = dict(kind="dit", hidden=spec["hidden_size"], depth=spec["depth"],
                heads=spec["num_heads"], patch=spec["patch_size"], image_size=image_size,
                channels=channels, final_conv=bool(spec.get("final_conv", False)))
    if text["encoder"] == "learned":
        return Network(**base, text_tokens=int(text["max_len"]), text_dim=int(text["dim"]),
                       text_depth=int(text["depth"]), text_vocab=int(text["vocab_size"]))
    from hdd_ray.towers import open_clip_text_config

    tower = open_clip_text_config(text["arch"], "experts.text.arch")
    return Network(**base, text_tokens=tower["context_length"], text_dim=tower["width"],
                   frozen_params=_open_clip_params(tower))


def router_network(model: str, image_size: int, channels: int, num_clusters: int) -> Network:
    """The router's :class:`Network` (``ROUTER_SIZES``) over K = ``num_clusters`` classes."""
    spec = ROUTER_SIZES[model]
    return Network(kind="router", hidden=spec["hidden_size"], depth=spec["depth"],
                   heads=spec["num_heads"], patch=spec["patch_size"], image_size=image_size,
                   channels=channels, num_classes=num_clusters)


def plan_run(net: Network, train: dict[str, Any], resources: dict[str, Any],
             gpu_memory_gb: float | None = None, **keys: str) -> MemoryPlan:
    """The plan of a run from its ``train`` and ``resources`` sections (plain dicts);
    ``gpu_memory_gb`` replaces the declared memory (what would fit on another GPU). Precision
    as applied: bf16 only where GPUs are asked for (:func:`hdd_ray.campaign.applied_precision`);
    ``keys``: ``what``, ``memory_key``, ``train_key`` for its lines."""
    from hdd_ray.campaign import applied_precision

    workers = int(resources.get("num_workers", 1))
    declared = resources.get("gpu_memory_gb") if gpu_memory_gb is None else gpu_memory_gb
    gpus = float(resources.get("gpus_per_worker", 0) or 0)
    return plan(net, int(train["batch_size"]) // workers, train.get("micro_batch_size", "auto"),
                applied_precision(train, resources),
                bool(train.get("activation_checkpointing", False)),
                None if declared is None else float(declared), gpus or 1.0,
                int(train.get("grad_accum", 1)), workers, **keys)


def model_input(cfg: CampaignConfig) -> tuple[int, int]:
    """``(size, channels)`` the experts and the router see, from the config alone: the VAE's
    latent shape in latent space (its folder's ``config.json``), else the corpus's."""
    if cfg.latents.vae:
        from hdd_ray.latents import vae_info

        info = vae_info(cfg.latents, cfg.corpus.image_size, cfg.corpus.channels)
        c, s, _ = info.shape(cfg.corpus.image_size)
        return s, c
    return cfg.corpus.image_size, cfg.corpus.channels


def _expert_keys(cfg: CampaignConfig, cluster: int) -> dict[str, str]:
    keys = {"what": f"expert of cluster {cluster}",
            "memory_key": "experts.resources.gpu_memory_gb", "train_key": "experts.train"}
    for i, spec in enumerate(cfg.experts.list):
        if spec.cluster == cluster:
            if "gpu_memory_gb" in (spec.resources or {}):
                keys["memory_key"] = f"experts.list[{i}].resources.gpu_memory_gb"
            if spec.activation_checkpointing is not None or spec.micro_batch_size is not None:
                keys["train_key"] = f"experts.list[{i}]"
    return keys


def expert_plan(cfg: CampaignConfig, expert: ResolvedExpert, shape: tuple[int, int],
                gpu_memory_gb: float | None = None) -> MemoryPlan:
    """The plan of ``expert`` on inputs of ``shape`` (``(size, channels)``)."""
    net = expert_network(expert.model, expert.text, *shape)
    return plan_run(net, expert.train, expert.resources, gpu_memory_gb,
                    **_expert_keys(cfg, expert.cluster))


def router_plan(cfg: CampaignConfig, shape: tuple[int, int],
                gpu_memory_gb: float | None = None) -> MemoryPlan:
    """The router's plan on inputs of ``shape``."""
    from hdd_ray.config import to_dict

    net = router_network(cfg.router.model, *shape, cfg.clustering.k)
    return plan_run(net, to_dict(cfg.router.train), to_dict(cfg.router.resources),
                    gpu_memory_gb, what="router", memory_key="router.resources.gpu_memory_gb",
                    train_key="router.train")


def plans_for_config(cfg: CampaignConfig, gpu_memory_gb: float | None = None,
                     shape: tuple[int, int] | None = None, experts: list[int] | None = None,
                     router: bool = True) -> list[MemoryPlan]:
    """Every run's plan (the experts in cluster order, or those of ``experts``, then the
    router) on the declared GPU memory, or on ``gpu_memory_gb`` for all of them (what would fit
    on such a GPU); ``shape`` defaults to :func:`model_input` (in latent space: the VAE's)."""
    from hdd_ray.config import resolve_experts

    shape = shape or model_input(cfg)
    plans = [expert_plan(cfg, e, shape, gpu_memory_gb) for e in resolve_experts(cfg)
             if experts is None or e.index in experts]
    return plans + ([router_plan(cfg, shape, gpu_memory_gb)] if router else [])


def describe_plans(cfg: CampaignConfig, gpu_memory_gb: float | None = None,
                   shape: tuple[int, int] | None = None) -> str:
    """:func:`plans_for_config` as lines, one per run (what a benchmark or a person reads)."""
    return "\n".join(p.line() for p in plans_for_config(cfg, gpu_memory_gb, shape))


def preflight(cfg: CampaignConfig, shape: tuple[int, int] | None = None,
              experts: list[int] | None = None, router: bool = True) -> list[MemoryPlan]:
    """The plans of the runs a job trains (:func:`plans_for_config`), checked before Ray
    starts: a run that declares its GPU memory and in which not even one sample fits raises
    :class:`ConfigError` in one line naming the key and the memory it needs; a given
    ``micro_batch_size`` over the estimate is a warning. Declared plans are logged."""
    plans = plans_for_config(cfg, shape=shape, experts=experts, router=router)
    for p in plans:
        if p.refusal():
            raise ConfigError(p.refusal())
        if p.usable is not None and not p.fits:
            log.warning("%s.micro_batch_size=%s may not fit: %s", p.train_key, p.micro_batch,
                        p.line())
        elif p.usable is not None:
            log.info("memory plan: %s", p.line())
    return plans


# ------------------------------------------------------------------------------ the worker


def worker_plan(net: Network, train: Any, rank_batch: int, world: int, device: Any,
                gpu_memory_gb: float | None, gpus_per_worker: float, what: str) -> MemoryPlan:
    """The plan a worker trains by, on the device it got: on a GPU checked against its
    ``total_memory`` (a device smaller than the declared ``resources.gpu_memory_gb`` is a
    warning, and ``auto`` plans for the smaller); on the CPU the whole per-worker batch (or the
    given micro-batch). Raises a one-line ``RuntimeError`` when not one sample fits."""
    import torch

    precision = "bf16" if device.type == "cuda" and train.mixed_precision == "bf16" else "fp32"
    memory, key = None, "resources.gpu_memory_gb"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        actual = props.total_memory / GB
        if gpu_memory_gb is None or actual < 0.99 * gpu_memory_gb:
            memory, key = actual, f"{props.name} (total memory, GB)"
            if gpu_memory_gb is not None:
                log.warning("resources.gpu_memory_gb=%g but %s has %.1f GB: planning for %.1f GB",
                            gpu_memory_gb, props.name, actual, actual)
        else:
            memory = gpu_memory_gb
    p = plan(net, rank_batch, train.micro_batch_size, precision,
             bool(train.activation_checkpointing), memory, gpus_per_worker or 1.0,
             int(train.grad_accum), world, what=what, memory_key=key)
    if p.micro_batch is None:
        raise RuntimeError(p.refusal())
    if p.usable is not None and not p.fits:
        log.warning("train.micro_batch_size=%s may not fit: %s", p.micro_batch, p.line())
    return p
