"""meshd: a peer-to-peer mesh of scientific sites, in user space."""

__version__ = "0.1.0"
