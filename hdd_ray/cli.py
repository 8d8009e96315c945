"""What every ``jobs/*.py`` entry point shares: argument parsing and joining Ray.

``python jobs/<job>.py [--config FILE] [--force] [key=value ...]``; a bad config prints one line
``error: ...`` and exits 2 before any Ray resource is requested.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from hdd_ray import storage
from hdd_ray.choices import STRATEGIES
from hdd_ray.config import CampaignConfig, ConfigError, config_path, load_config
from hdd_ray.progress import configure_logging


def parse_job_args(
    doc: str, argv: list[str] | None = None, extra: list[tuple[str, dict[str, Any]]] | None = None
) -> tuple[CampaignConfig, argparse.Namespace]:
    """Parse a job's command line into a validated config and the remaining flags.

    ``doc`` (the job's module docstring) and every config option with its **effective** value
    (the config that would run: the demo or ``--config FILE``, with the overrides) and where
    that value comes from are shown by ``--help``. ``extra`` adds job-specific flags as
    ``(name, argparse kwargs)``. Configures logging (:func:`hdd_ray.progress.configure_logging`).
    On a config problem prints ``error: <one line>`` to stderr and exits with status 2.
    """
    configure_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    parser = argparse.ArgumentParser(
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=describe_effective(argv) if wants_help else None,
    )
    parser.add_argument("--config", default=None,
                        help="campaign YAML, or a shipped config's name (default: the demo)")
    parser.add_argument("--force", action="store_true", help="recompute instead of reusing")
    for name, kwargs in extra or []:
        parser.add_argument(name, **kwargs)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # a relative local root means "from where the job was started"; Ray Train and Tune need
    # absolute storage paths, and workers run in other directories
    cfg.root = storage.absolute(cfg.root)
    if in_job_working_dir_copy(cfg.root):
        print(f"warning: root={cfg.root} is inside this job's copy of the uploaded working "
              "directory, which Ray may delete once the job ends; pass an absolute root or a "
              "bucket URI",
              file=sys.stderr)
    return cfg, args


#: the flags that override a mixture's sampling settings (``MixtureSpec.override`` checks them)
MIXTURE_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--routing", {"default": None, "choices": list(STRATEGIES)}),
    ("--k", {"type": int, "default": None, "help": "experts per sample for topk"}),
    ("--threshold", {"type": float, "default": None}),
    ("--guidance", {"type": float, "default": None, "help": "classifier-free guidance"}),
    ("--steps", {"type": int, "default": None, "help": "ODE steps"}),
    ("--seed", {"type": int, "default": None, "help": "noise seed (default sampling.seed)"}),
]

_OVERRIDE = re.compile(r"^[+~]?[A-Za-z_][\w.\[\]]*=")


def _split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """``(--config value, key=value overrides)`` of a command line, without parsing it all."""
    config, overrides, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            config, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            config = a.split("=", 1)[1]
        elif _OVERRIDE.match(a):
            overrides.append(a)
        i += 1
    return config, overrides


def _dotted(node: Any, prefix: str = "") -> set[str]:
    """The dotted keys of a YAML mapping's leaves (a list or scalar is a leaf)."""
    keys: set[str] = set()
    for k, v in node.items() if isinstance(node, dict) else ():
        if isinstance(v, dict) and v:
            keys |= _dotted(v, f"{prefix}{k}.")
        else:
            keys.add(prefix + str(k))
    return keys


def describe_effective(argv: list[str]) -> str:
    """Every config option with the value this command line would run with, and its source:
    ``[<config file>]``, ``[command line]`` or ``[default]`` (the schema's)."""
    import dataclasses

    from omegaconf import OmegaConf

    path, overrides = _split_argv(argv)
    file_path = str(config_path(path))  # a shipped config's name too
    shown = os.path.relpath(file_path) if not os.path.relpath(file_path).startswith("..") \
        else file_path
    note = ""
    try:
        cfg: Any = load_config(path, overrides)
    except ConfigError as exc:
        note = f"  (this command line does not load: {exc}; showing the schema's defaults)\n"
        cfg, overrides, file_keys = CampaignConfig(), [], set()
    else:
        try:
            file_keys = _dotted(OmegaConf.to_container(OmegaConf.load(file_path)))
        except Exception:
            file_keys = set()
    override_keys = {o.split("=", 1)[0].strip().lstrip("+~") for o in overrides}

    def source(key: str) -> str:
        parts = key.split(".")
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        if prefixes & override_keys:
            return "command line"
        if prefixes & file_keys:
            return shown
        return "default"

    lines: list[tuple[str, str]] = []

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            value, key = getattr(node, f.name), f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                if isinstance(value, list):
                    value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                             for v in value]
                lines.append((f"  {key} = {value!r}", source(key)))

    walk(cfg, "")
    width = min(72, max(len(text) for text, _ in lines) + 2)
    body = "\n".join(f"{text:<{width}} [{src}]" for text, src in lines)
    return (f"config options (key=value), with the values this command would run with\n"
            f"(schema defaults <- {shown} <- command-line overrides; [source] of each):\n"
            f"{note}{body}")


def in_job_working_dir_copy(path: str) -> bool:
    """Whether ``path`` lies in a ``ray job submit --working-dir`` package Ray unpacked."""
    parts = os.path.normpath(path).split(os.sep)
    return "runtime_resources" in parts and any(p.startswith("_ray_pkg_") for p in parts)
