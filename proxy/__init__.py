"""connect-proxy: a pure-Python implementation of Consul's built-in Connect proxy."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
