"""hdd_ray: Heterogeneous Decentralized Diffusion on Ray (see README.md and ARCHITECTURE.md)."""

__version__ = "0.2.0"


def __getattr__(name: str) -> type:
    """``hdd_ray.Mixture`` (``hdd_ray.Mixture.from_folder(PATH)`` loads an exported mixture),
    imported on first use: ``import hdd_ray.config`` stays free of torch."""
    if name == "Mixture":
        from hdd_ray.ensemble import Mixture

        return Mixture
    raise AttributeError(f"module 'hdd_ray' has no attribute {name!r}")
