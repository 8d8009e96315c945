"""Pretrained starts: read a checkpoint safely, recognise its format by its keys, and map it onto
our DiT (README, "Pretrained starts").

Formats (:data:`FORMATS`), detected from the keys, never the file name:

* ``dit``: facebookresearch/DiT (``DiT-XL-2-256x256.pt``; training checkpoints nest ``ema`` /
  ``model``): AdaLN-Zero, class-conditional, learned sigma. Loaded into our AdaLN-Zero variant
  exactly: ``x_embedder.proj`` -> ``x_embedder``, the null class's row (index 1000) ->
  ``t_embedder.class_embedding``, the ``eps`` rows of the 2C-channel head (channel index
  fastest: rows ``r`` with ``r mod 2C < C``); ``pos_embed`` is recomputed (ours equals it).
* ``pixart``: PixArt-alpha (``PixArt-XL-2-256x256.pth``, under ``state_dict``): AdaLN-Single,
  named as ours but ``x_embedder.proj``, ``y_embedder.y_proj.fc1/fc2`` and the 2C head. Its null
  caption (120 T5 tokens) has no place in ours (one vector repeated), so ``y_null`` keeps its
  fresh value; its caption projection loads when the expert's text width is 4,096.
* ``hdd_ray``: a finished expert (its folder, or ``weights.safetensors`` beside ``expert.json``).
* ``diffusers_dit`` / ``diffusers_pixart``: a diffusers ``DiTTransformer2DModel`` /
  ``PixArtTransformer2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.*``),
  renamed back to the original layouts (q, k, v fused; per-block copies of the embedders read
  from block 0).

Files load with ``torch.load(weights_only=True)`` (pickled code is refused) or as safetensors.
What our DiT has and a checkpoint lacks starts fresh: cross-attention (its output projection
at zero, so the text path adds exactly nothing at step 0), the caption projection, the null
caption, U-ViT's final convolution (the identity). AdaLN-Zero -> AdaLN-Single is the
documented approximation :func:`adaln_zero_to_single`; every other mismatch of names or shapes
is a one-line :class:`~hdd_ray.errors.WeightsMismatch` naming the first key and both shapes.
"""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hdd_ray import storage
from hdd_ray.diffusion.networks import NetworkSpec
from hdd_ray.errors import WeightsMismatch, first_line
from hdd_ray.models.dit import timestep_embedding

log = logging.getLogger(__name__)

FORMATS = ("dit", "pixart", "hdd_ray", "diffusers_dit", "diffusers_pixart")
#: a 1,000-step DDPM checkpoint's network: eps on the linear schedule, fed the integer step
DDPM_CHECKPOINT = NetworkSpec("eps", "linear", "ddpm_step")
#: keys our DiT may start fresh when a checkpoint lacks them (prefixes)
FRESH_OK = ("y_embedder.", "y_null", "final_conv.", "t_embedder.class_embedding")
_FRESH_BLOCK_PARTS = (".cross_attn.",)


@dataclass
class Checkpoint:
    """A checkpoint read and renamed to our DiT's keys (``state``; AdaLN variant ``adaln``)."""

    path: str
    format: str
    state: dict[str, Tensor]
    adaln: str
    network: NetworkSpec | None  # what it predicts (None: an hdd_ray file without its JSON)
    text: dict[str, Tensor] = field(default_factory=dict)  # an hdd_ray expert's text encoder
    weights_file: str = ""  # the file the tensors came from (a folder's weights file)


# ------------------------------------------------------------------------------ reading files


def _load_bytes(data: bytes | None, path: str, meta: bool) -> dict[str, Any]:
    """A safetensors or torch file (its bytes, or a local ``path`` read lazily) -> its object."""
    if data is not None:
        head = data[:8]
    else:
        with open(path, "rb") as f:
            head = f.read(8)
    if len(head) < 8:
        raise WeightsMismatch(f"empty or truncated ({len(head)} bytes)")
    if head[:4] != b"PK\x03\x04" and 0 < int.from_bytes(head, "little") < 100_000_000:
        try:  # a safetensors header (length, then JSON)
            return _load_safetensors(data, path, meta)
        except WeightsMismatch:
            raise
        except Exception:
            pass
    try:
        if data is not None:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = first_line(exc)
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:  # a pickled class or function: code that weights_only=True never runs
            raise WeightsMismatch(f"holds pickled objects other than tensors ({found.group(1)}): "
                                  "refused (files load with weights_only=True)") from None
        if "central directory" in text or isinstance(exc, EOFError):
            raise WeightsMismatch("truncated or damaged (torch.load: failed reading the "
                                  "archive)") from None
        raise WeightsMismatch(f"not a checkpoint (torch.load: {text[:120]})") from None


def _load_safetensors(data: bytes | None, path: str, meta: bool) -> dict[str, Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load as load_bytes

    try:
        if data is not None:
            return load_bytes(data)
        with safe_open(path, framework="pt") as f:
            if meta:
                return {k: _meta_like(f.get_slice(k)) for k in f.keys()}
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise WeightsMismatch(f"truncated or damaged safetensors ({first_line(exc)[:120]})") \
            from None


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}


def _meta_like(sl: Any) -> Tensor:
    return torch.empty(sl.get_shape(), dtype=_ST_DTYPES.get(sl.get_dtype(), torch.float32),
                       device="meta")


def _unwrap(obj: Any) -> dict[str, Tensor]:
    """The state dict inside a checkpoint object: the EMA of a training checkpoint (``ema``),
    else ``state_dict`` / ``model``, else the object itself; every value must be a tensor."""
    if isinstance(obj, dict):
        for key in ("ema", "state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, Tensor)
                                                         for v in inner.values()):
                return inner
        if obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
            return obj
    raise WeightsMismatch("not a state dict of tensors (nor one under ema / state_dict / model)")


def _folder_file(path: str) -> tuple[str, dict[str, Any]]:
    """The weights file of a folder and what describes it (``expert.json``, diffusers
    ``config.json``; also a diffusers pipeline's ``transformer/``)."""
    for sub in ("", "transformer"):
        folder = storage.join(path, sub) if sub else path
        if storage.exists(storage.join(folder, "expert.json")):
            return (storage.join(folder, "weights.safetensors"),
                    {"expert_json": storage.read_json(storage.join(folder, "expert.json"))})
        if storage.exists(storage.join(folder, "config.json")):
            config = storage.read_json(storage.join(folder, "config.json"))
            for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
                if storage.exists(storage.join(folder, name)):
                    return storage.join(folder, name), {"diffusers_config": config}
    raise WeightsMismatch("a folder with no expert.json + weights.safetensors, nor a diffusers "
                          "config.json + diffusion_pytorch_model.*")


def _is_dir(path: str) -> bool:
    if not storage.is_uri(path):
        return os.path.isdir(path)
    fs, inner = storage.resolve(path)
    import pyarrow.fs as pafs

    return fs.get_file_info(inner).type == pafs.FileType.Directory


def weights_file(path: str) -> str:
    """The file a checkpoint's tensors are read from: a folder's weights file, else ``path``."""
    return _folder_file(path)[0] if _is_dir(path) else path


def read_state(path: str, meta: bool = False) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state dict, sidecar)`` of a checkpoint file or folder (local or URI). ``meta``: the
    tensors' shapes and dtypes only (on the ``meta`` device), nothing else read where the file
    format allows. The sidecar holds an ``expert.json`` or a diffusers ``config.json``.
    Raises :class:`WeightsMismatch` (one line, without the config key) on a bad file."""
    sidecar: dict[str, Any] = {}
    if _is_dir(path):
        path, sidecar = _folder_file(path)
    elif path.endswith(".safetensors"):
        beside = storage.join(os.path.dirname(path.rstrip("/")), "expert.json")
        if storage.exists(beside):
            sidecar = {"expert_json": storage.read_json(beside)}
    if not storage.exists(path):
        raise WeightsMismatch(f"{path} does not exist")
    data = storage.read_bytes(path) if storage.is_uri(path) else None
    state = _unwrap(_load_bytes(data, path, meta))
    if meta:
        state = {k: v.to("meta") for k, v in state.items()}
    return state, {**sidecar, "weights_file": path}


# ------------------------------------------------------------------------------ formats


def detect_format(keys: set[str]) -> str:
    """The format of a state dict, from its keys (:data:`FORMATS`)."""
    if any(k.startswith("net.") for k in keys):
        return "hdd_ray"
    if "proj_out_2.weight" in keys and "transformer_blocks.0.norm1.linear.weight" in keys:
        return "diffusers_dit"
    if "adaln_single.linear.weight" in keys:
        return "diffusers_pixart"
    if "y_embedder.embedding_table.weight" in keys and "blocks.0.adaLN_modulation.1.weight" in keys:
        return "dit"
    if "t_block.1.weight" in keys and "y_embedder.y_proj.fc1.weight" in keys:
        return "pixart"
    sample = ", ".join(sorted(keys)[:3])
    raise WeightsMismatch(f"not a known checkpoint: none of the DiT, PixArt-alpha, hdd_ray or "
                          f"diffusers key layouts (keys: {sample}, ...)")


def _eps_rows(weight: Tensor, channels: int) -> Tensor:
    """The ``eps`` rows of a learned-sigma head: rows ``r`` with ``r mod 2C < C``."""
    rows = torch.arange(weight.shape[0], device="cpu")
    keep = rows[(rows % (2 * channels)) < channels]
    return weight[keep.to(weight.device)] if weight.device.type != "meta" else \
        torch.empty((keep.numel(), *weight.shape[1:]), dtype=weight.dtype, device="meta")


def _head(state: dict[str, Tensor], out: dict[str, Tensor]) -> None:
    """The final linear layer: the ``eps`` rows of a learned-sigma head, else as it is."""
    w = state["x_embedder.proj.weight"]
    channels, p = w.shape[1], w.shape[2]
    for name in ("weight", "bias"):
        t = state[f"final_layer.linear.{name}"]
        out[f"final_layer.linear.{name}"] = (_eps_rows(t, channels)
                                             if t.shape[0] == p * p * 2 * channels else t)


def _from_dit(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if k in ("pos_embed",) or k.startswith(("final_layer.linear.", "y_embedder.")):
            continue
        out[k.replace("x_embedder.proj.", "x_embedder.")] = v
    table = state["y_embedder.embedding_table.weight"]
    out["t_embedder.class_embedding"] = table[-1]  # the null class (index num_classes)
    _head(state, out)
    return out


def _from_pixart(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if k in ("pos_embed", "y_embedder.y_embedding") or k.startswith("final_layer.linear."):
            continue
        out[k.replace("x_embedder.proj.", "x_embedder.").replace("y_embedder.y_proj.",
                                                                 "y_embedder.")] = v
    _head(state, out)
    return out


def _fused(state: dict[str, Tensor], prefix: str, parts: tuple[str, ...]) -> dict[str, Tensor]:
    return {name: torch.cat([state[f"{prefix}.{p}.{name}"] for p in parts])
            for name in ("weight", "bias")}


_DIFFUSERS_BLOCK = {"attn1.to_out.0": "attn.proj", "ff.net.0.proj": "mlp.fc1",
                    "ff.net.2": "mlp.fc2", "norm1.linear": "adaLN_modulation.1",
                    "attn2.to_q": "cross_attn.q_linear", "attn2.to_out.0": "cross_attn.proj"}


def _from_diffusers(state: dict[str, Tensor], pixart: bool) -> dict[str, Tensor]:
    """A diffusers DiT / PixArt transformer renamed back to the original layout."""
    out: dict[str, Tensor] = {}
    emb = "adaln_single.emb" if pixart else "transformer_blocks.0.norm1.emb"
    top = {"pos_embed.proj": "x_embedder.proj", f"{emb}.timestep_embedder.linear_1":
           "t_embedder.mlp.0", f"{emb}.timestep_embedder.linear_2": "t_embedder.mlp.2",
           "adaln_single.linear": "t_block.1", "caption_projection.linear_1":
           "y_embedder.y_proj.fc1", "caption_projection.linear_2": "y_embedder.y_proj.fc2",
           "proj_out_1": "final_layer.adaLN_modulation.1", "proj_out_2": "final_layer.linear",
           "proj_out": "final_layer.linear"}
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks."))
    for k, v in state.items():
        stem, _, name = k.rpartition(".")
        if stem in top:
            out[f"{top[stem]}.{name}"] = v
        elif k == "scale_shift_table":
            out["final_layer.scale_shift_table"] = v
        elif f"{emb}.class_embedder" in k:
            out["y_embedder.embedding_table.weight"] = v
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}", f"blocks.{i}"
        for name, t in _fused(state, f"{src}.attn1", ("to_q", "to_k", "to_v")).items():
            out[f"{dst}.attn.qkv.{name}"] = t
        if pixart:
            for name, t in _fused(state, f"{src}.attn2", ("to_k", "to_v")).items():
                out[f"{dst}.cross_attn.kv_linear.{name}"] = t
            out[f"{dst}.scale_shift_table"] = state[f"{src}.scale_shift_table"]
        for theirs, ours in _DIFFUSERS_BLOCK.items():
            for name in ("weight", "bias"):
                if f"{src}.{theirs}.{name}" in state:
                    out[f"{dst}.{ours}.{name}"] = state[f"{src}.{theirs}.{name}"]
    return out


def _hdd_ray(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    net = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    text = {k[5:]: v for k, v in state.items() if k.startswith("text.")}
    return net, text


def read_checkpoint(path: str, meta: bool = False) -> Checkpoint:
    """A checkpoint (file or folder, local or URI) renamed to our DiT's keys. ``meta``: shapes
    only. One-line :class:`WeightsMismatch` (without the config key) on a bad file."""
    raw, sidecar = read_state(path, meta)
    fmt = detect_format(set(raw))
    text: dict[str, Tensor] = {}
    network: NetworkSpec | None = DDPM_CHECKPOINT
    if fmt == "hdd_ray":
        state, text = _hdd_ray(raw)
        desc = sidecar.get("expert_json")
        network = (NetworkSpec.from_dict(desc.get("network"), desc["objective"],
                                         desc.get("schedule")) if desc else None)
    else:
        if fmt.startswith("diffusers"):
            raw = _from_diffusers(raw, pixart=fmt == "diffusers_pixart")
        try:
            state = _from_dit(raw) if fmt.endswith("dit") else _from_pixart(raw)
        except KeyError as exc:
            raise WeightsMismatch(f"a {fmt} checkpoint without {exc.args[0]}") from None
    adaln = "zero" if "t_embedder.class_embedding" in state else "single"
    return Checkpoint(path, fmt, state, adaln, network, text, sidecar["weights_file"])


# ------------------------------------------------------------------------------ fitting


def adaln_zero_to_single(state: dict[str, Tensor], times: Tensor | None = None) -> dict[str, Tensor]:
    """AdaLN-Zero weights (ours, renamed) mapped onto AdaLN-Single: the documented approximation.

    AdaLN-Zero modulates block ``i`` by ``W_i s(t) + b_i`` with ``s(t) = SiLU(c(t))``,
    ``c = t_emb(t) + y``; AdaLN-Single by ``table_i + W s(t) + b`` with one shared ``W, b``.

    * the conditioning is exact: ``y`` is folded into the timestep MLP's last bias (``c`` is
      then what ``t_embedder`` returns);
    * the shared map is the blocks' mean, ``W = mean_i W_i``, ``b = mean_i b_i``;
    * each block's table is its mean residual over the checkpoint's 1,000 steps
      (``times``, default 0..999): ``table_i = (W_i - W) E[s] + b_i - b``, exact wherever
      ``(W_i - W) (s(t) - E[s]) = 0`` (e.g. blocks that share their ``W_i``);
    * the final layer's ``W_f s + b_f`` becomes ``table_f + c`` with
      ``table_f = E[W_f s + b_f - c]``.

    What is left is the blocks' modulation spread around their mean; it is measured on a
    trained model in ``benchmarks/bench_init.py`` (``adaln_single_error``).
    """
    out = dict(state)
    y = out.pop("t_embedder.class_embedding")
    w0, b0 = out["t_embedder.mlp.0.weight"], out["t_embedder.mlp.0.bias"]
    w2, b2 = out["t_embedder.mlp.2.weight"], out["t_embedder.mlp.2.bias"]
    if times is None:
        times = torch.arange(1000, dtype=torch.float32)
    times = times.to(device=w0.device, dtype=torch.float32)
    freq = timestep_embedding(times, w0.shape[1]).to(w0.dtype)
    c = nn.functional.linear(nn.functional.silu(nn.functional.linear(freq, w0, b0)), w2, b2) + y
    s_mean = nn.functional.silu(c).mean(0)
    out["t_embedder.mlp.2.bias"] = b2 + y
    depth = 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks."))
    ws = [out.pop(f"blocks.{i}.adaLN_modulation.1.weight") for i in range(depth)]
    bs = [out.pop(f"blocks.{i}.adaLN_modulation.1.bias") for i in range(depth)]
    w_mean, b_mean = torch.stack(ws).mean(0), torch.stack(bs).mean(0)
    out["t_block.1.weight"], out["t_block.1.bias"] = w_mean, b_mean
    for i in range(depth):
        table = (ws[i] - w_mean) @ s_mean + bs[i] - b_mean
        out[f"blocks.{i}.scale_shift_table"] = table.reshape(6, -1)
    wf = out.pop("final_layer.adaLN_modulation.1.weight")
    bf = out.pop("final_layer.adaLN_modulation.1.bias")
    final = nn.functional.linear(nn.functional.silu(c), wf, bf).reshape(c.shape[0], 2, -1)
    out["final_layer.scale_shift_table"] = (final - c[:, None]).mean(0)
    return out


def _fresh_ok(key: str, mode: str) -> bool:
    if mode == "paper" and key.startswith("final_layer."):
        return True
    if key.startswith("blocks."):
        return any(part in key for part in _FRESH_BLOCK_PARTS)
    return key.startswith(FRESH_OK)


def fit_state(ckpt: Checkpoint, expected: dict[str, Tensor], adaln: str, mode: str = "exact",
              model: str = "the expert's DiT") -> tuple[dict[str, Tensor], bool]:
    """``(weights to load, text_path_off)``: ``ckpt`` fitted to a DiT whose state dict is
    ``expected`` (shapes are what count: ``meta`` tensors do), with the modulation ``adaln``.

    ``mode="paper"`` re-initialises the final layer and the caption projection (the HDD
    paper's way). A caption projection of another text width starts fresh. ``text_path_off``:
    the caption projection starts fresh while cross-attention came from the checkpoint, so its
    output projection must start at zero (the text path adds nothing at step 0). One-line
    :class:`WeightsMismatch` on the first key whose name or shape does not fit.
    """
    state = dict(ckpt.state)
    if ckpt.adaln == "single" and adaln == "zero":
        raise WeightsMismatch(f"an AdaLN-Single checkpoint ({ckpt.format}) cannot start an "
                              "AdaLN-Zero expert exactly: set experts.adaln=single")
    if ckpt.adaln == "zero" and adaln == "single":
        log.warning("%s: AdaLN-Zero weights mapped onto AdaLN-Single (an approximation: "
                    "experts.adaln=zero starts exactly)", ckpt.path)
        state = adaln_zero_to_single(state)
    if mode == "paper":
        state = {k: v for k, v in state.items()
                 if not k.startswith(("final_layer.", "y_embedder.", "y_null"))}
    text_keys = [k for k in state if k.startswith(("y_embedder.", "y_null"))]
    if any(k in expected and state[k].shape != expected[k].shape for k in text_keys):
        for k in text_keys:  # another text width: the caption projection starts fresh
            del state[k]
    for key, want in expected.items():
        if key in state and tuple(state[key].shape) != tuple(want.shape):
            raise WeightsMismatch(f"{key} has shape {list(state[key].shape)} in the "
                                  f"{ckpt.format} checkpoint, {model} needs {list(want.shape)}")
        if key not in state and not _fresh_ok(key, mode):
            raise WeightsMismatch(f"the {ckpt.format} checkpoint lacks {key} "
                                  f"{list(want.shape)}, which {model} needs")
    extra = [k for k in state if k not in expected]
    if extra:
        raise WeightsMismatch(f"{extra[0]} {list(state[extra[0]].shape)} of the {ckpt.format} "
                              f"checkpoint has no place in {model}")
    loaded_cross = any(".cross_attn." in k for k in state)
    text_path_off = loaded_cross and "y_embedder.fc1.weight" not in state
    return state, text_path_off


def start_expert(model: nn.Module, path: str, adaln: str, mode: str = "exact",
                 model_name: str = "the expert's DiT") -> Checkpoint:
    """Load the checkpoint at ``path`` into an expert (``model.net``, a DiT; ``model.text``,
    its text encoder: an hdd_ray expert's learned one is loaded when its shapes fit) before
    training; returns the checkpoint read. One-line :class:`WeightsMismatch` on a bad file."""
    ckpt = read_checkpoint(path)
    state, text_path_off = fit_state(ckpt, model.net.state_dict(), adaln, mode, model_name)
    model.net.load_state_dict(state, strict=False)
    with torch.no_grad():
        if text_path_off:
            for block in model.net.blocks:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        if mode == "paper":  # re-initialised head: an untrained head predicts 0 (as DiT)
            nn.init.zeros_(model.net.final_layer.linear.weight)
            nn.init.zeros_(model.net.final_layer.linear.bias)
    own = {k: v for k, v in model.text.state_dict().items()}
    if ckpt.text and not getattr(model, "text_frozen", False) and set(ckpt.text) == set(own) \
            and all(ckpt.text[k].shape == own[k].shape for k in own):
        model.text.load_state_dict(ckpt.text)
    return ckpt


def router_weights(path: str) -> str:
    """The safetensors file of a finished hdd_ray router (its folder, or the file itself)."""
    if _is_dir(path):
        if not storage.exists(storage.join(path, "router.json")):
            raise WeightsMismatch("not a finished hdd_ray router (no router.json in the folder)")
        return storage.join(path, "weights.safetensors")
    return path

