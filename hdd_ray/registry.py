"""A mixture folder in MLflow: logged as a ``pyfunc`` model (:func:`log_mixture`), registered
in the Model Registry, and the ``champion`` alias moved to the best one (:func:`promote`).

* **The model.** :class:`MixturePyfunc` wraps a mixture folder (``hdd_ray.mixture_folder``),
  logged as the model's artifact ``mixture``; it is logged as *code* (a two-line file that
  builds it, MLflow's models from code), so nothing is pickled. Its signature: a DataFrame with
  a ``prompt`` column (string) and an optional ``seed`` column (integer; rows without one use
  the folder's seed) in, uint8 images ``[N, H, W, C]`` out; ``steps`` and ``guidance`` are
  params defaulting to the folder's. Rows that share a seed are sampled together, so a
  DataFrame of one seed gives ``Mixture.sample(prompts, seed)``'s images. Loading it needs
  ``hdd_ray`` importable (it is not on PyPI: the model's requirements list its dependencies).
* **Registration.** ``--register NAME`` (``jobs/export_mixture.py``) or ``sweep.register_as``
  creates a version of ``NAME`` tagged with the mixture's id, FID and the key of its
  evaluation settings (:func:`hdd_ray.sharing.evaluation_key`).
* **The champion.** :func:`promote` moves the alias ``champion`` to a version when there is
  none yet, or when its FID is lower than the champion's under the same evaluation settings;
  FIDs of other settings (another extractor, N, corpus, evaluation version) are not compared.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from hdd_ray.errors import MixtureError

if TYPE_CHECKING:
    from hdd_ray.config import CampaignConfig

log = logging.getLogger(__name__)

__all__ = ["CHAMPION", "MODEL_NAME", "Logged", "MixturePyfunc", "champion_decision",
           "log_mixture", "model_signature", "promote"]

MODEL_NAME = "mixture"  # the logged model's name in its run; its artifact is the folder
CHAMPION = "champion"
#: the model's code (models from code): builds the wrapper, nothing pickled
_MODEL_CODE = ('"""hdd_ray\'s mixture as an MLflow pyfunc: needs hdd_ray importable."""\n'
               "import mlflow\n\nfrom hdd_ray.registry import MixturePyfunc\n\n"
               "mlflow.models.set_model(MixturePyfunc())\n")
#: what the model needs where it is loaded, besides hdd_ray itself
_REQUIREMENTS = ("torch", "numpy", "pandas", "safetensors", "open_clip_torch", "omegaconf",
                 "pyarrow", "pillow", "mlflow")


class MixturePyfunc(mlflow.pyfunc.PythonModel):
    """The mixture folder logged with the model, as an MLflow pyfunc (module docstring).

    Runs on a GPU when the loading process sees one (``HDD_RAY_DEVICE`` names another
    device: ``cpu``, ``cuda:1``)."""

    def load_context(self, context: Any) -> None:
        """Load the folder (``Mixture.from_folder``: every file checked)."""
        from hdd_ray.devices import resolve_device
        from hdd_ray.ensemble import Mixture

        device = resolve_device(os.environ.get("HDD_RAY_DEVICE", "auto"), "HDD_RAY_DEVICE")
        self.mixture = Mixture.from_folder(context.artifacts[MODEL_NAME], device)

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> np.ndarray:
        """Images ``[N, H, W, C]`` uint8, one per row of ``model_input`` (module docstring)."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "prompt" not in frame.columns:
            raise MixtureError(f"the input needs a 'prompt' column (got {list(frame.columns)})")
        prompts = [str(p) for p in frame["prompt"]]
        default = int(self.mixture.cfg.sampling.seed)
        seeds = ([default if pd.isna(s) else int(s) for s in frame["seed"]]
                 if "seed" in frame.columns else [default] * len(prompts))
        params = params or {}
        steps = params.get("steps")
        guidance = params.get("guidance")
        out: np.ndarray | None = None
        for seed in dict.fromkeys(seeds):  # each seed once, in order of appearance
            rows = [i for i, s in enumerate(seeds) if s == seed]
            images = self.mixture.sample([prompts[i] for i in rows], seed=seed,
                                         steps=None if steps is None else int(steps),
                                         guidance=None if guidance is None else float(guidance))
            pixels = to_uint8(images)
            if out is None:
                out = np.empty((len(prompts), *pixels.shape[1:]), np.uint8)
            out[rows] = pixels
        return out if out is not None else np.empty((0, 0, 0, 0), np.uint8)


def to_uint8(images: Any) -> np.ndarray:
    """Images ``[N, C, H, W]`` in [-1, 1] (a tensor) -> ``[N, H, W, C]`` uint8."""
    import torch

    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def model_signature(described: dict[str, Any]) -> Any:
    """The logged signature of a mixture folder's ``mixture.json`` (module docstring)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    size, channels = int(described["image"]["size"]), int(described["image"]["channels"])
    spec = described["spec"]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, channels))]),
        params=ParamSchema([ParamSpec("steps", "long", int(spec["steps"])),
                            ParamSpec("guidance", "double", float(spec["guidance"]))]))


@dataclass(frozen=True)
class Logged:
    """Where :func:`log_mixture` put the folder: its run, the model's URI, and the registered
    version (``None`` without a name) with whether ``champion`` moved to it."""

    run_id: str
    model_uri: str
    name: str | None = None
    version: str | None = None
    champion: bool = False
    reason: str = ""


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (which ``log_model`` uses) pointed at ``uri`` for the block, then
    back to what the environment says: ``set_tracking_uri`` mirrors every value it sets into
    ``MLFLOW_TRACKING_URI``, so that variable as it was is the whole state to restore."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # unset (and the variable)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in _REQUIREMENTS:
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            out.append(dist)
    return out


def log_mixture(cfg: CampaignConfig, folder: str, described: dict[str, Any],
                register: str | None = None, parent_run_id: str | None = None,
                version_tags: dict[str, str] | None = None) -> Logged | None:
    """Log the mixture folder ``folder`` (its ``mixture.json``: ``described``) as an MLflow
    pyfunc model in a new run of the campaign's experiment, and with ``register`` register it
    as a version of that model name (tagged with ``version_tags``) and :func:`promote` it.

    ``None`` when tracking is off or MLflow is unreachable (one warning line)."""
    from hdd_ray import tracking

    exp = tracking.connect(cfg)
    if exp is None:
        return None
    spec = described["spec"]
    run = exp.create(f"export {described['assignment']} {spec['routing']}",
                     {"stage": "export", "mixture_id": str(described.get("mixture_id")),
                      "assignment": described["assignment"]}, parent=parent_run_id)
    with tempfile.TemporaryDirectory() as tmp, _tracking_uri(exp.uri):
        code = os.path.join(tmp, "hdd_ray_mixture_model.py")
        with open(code, "w", encoding="utf-8") as f:
            f.write(_MODEL_CODE)
        # MLflow 3 names a logged model (``name``); MLflow 2 gave an ``artifact_path``
        key = "name" if "name" in inspect.signature(mlflow.pyfunc.log_model).parameters \
            else "artifact_path"
        with mlflow.start_run(run_id=run.run_id):
            info = mlflow.pyfunc.log_model(
                **{key: MODEL_NAME}, python_model=code, artifacts={MODEL_NAME: folder},
                signature=model_signature(described), pip_requirements=_requirements())
        if register is None:
            return Logged(run.run_id, info.model_uri)
        version = mlflow.register_model(info.model_uri, register, tags=version_tags or {})
    moved, reason = promote(exp.client, register, str(version.version))
    return Logged(run.run_id, info.model_uri, register, str(version.version), moved, reason)


def champion_decision(champion: dict[str, str] | None,
                      candidate: dict[str, str]) -> tuple[bool, str]:
    """Whether the version tagged ``candidate`` takes the ``champion`` alias from the one
    tagged ``champion`` (None: no champion yet) -> ``(move, why)``: when it has an FID and there
    is no champion, or its FID is lower under the same ``evaluation_key``."""
    fid = _fid(candidate)
    if fid is None:
        return False, "not evaluated (no FID): the champion is left as it is"
    if champion is None:
        return True, f"the first champion (FID {fid:.4g})"
    held = _fid(champion)
    if champion.get("evaluation_key") != candidate.get("evaluation_key") or held is None:
        return False, ("the champion was evaluated under other settings "
                       f"({champion.get('evaluation_key')} vs "
                       f"{candidate.get('evaluation_key')}): FIDs not compared")
    if fid < held:
        return True, f"FID {fid:.4g} < the champion's {held:.4g}"
    return False, f"FID {fid:.4g} is not below the champion's {held:.4g}"


def _fid(tags: dict[str, str]) -> float | None:
    try:
        return float(tags["fid"])
    except (KeyError, TypeError, ValueError):
        return None


def promote(client: Any, name: str, version: str) -> tuple[bool, str]:
    """Move registered model ``name``'s alias ``champion`` to ``version`` when
    :func:`champion_decision` says so -> ``(moved, why)``."""
    from mlflow.exceptions import MlflowException

    candidate = client.get_model_version(name, version)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    if current is not None and str(current.version) == str(version):
        return False, f"version {version} is the champion already"
    move, why = champion_decision(None if current is None else dict(current.tags),
                                  dict(candidate.tags))
    if move:
        client.set_registered_model_alias(name, CHAMPION, version)
    log.info("registered model %s version %s: %s%s", name, version, why,
             f" -> alias {CHAMPION}" if move else "")
    return move, why
