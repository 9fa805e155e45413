"""Listeners of connect-proxy: public (inbound mTLS) and upstream (outbound) listeners."""

from __future__ import annotations

__all__: list[str] = []
