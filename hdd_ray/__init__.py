"""hdd_ray: Heterogeneous Decentralized Diffusion on Ray (see README.md and ARCHITECTURE.md)."""

__version__ = "0.2.0"
