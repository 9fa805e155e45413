"""How many connections a listener takes by default: derived from the descriptor limit.

Rule 1: pure arithmetic over the process's RLIMIT_NOFILE; the budgets themselves (the slots
that count against these limits) live with the accept loop in `listeners.serve`.
"""

from __future__ import annotations

import resource

RESERVED_DESCRIPTORS = 64  # left for the agent's connections, logs, upstream dials
_UNLIMITED = 1 << 20  # what RLIM_INFINITY counts as


def descriptor_limit() -> int:
    """The soft RLIMIT_NOFILE of this process (RLIM_INFINITY counts as 2**20)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _UNLIMITED if soft == resource.RLIM_INFINITY or soft > _UNLIMITED else int(soft)


def default_max_connections(limit: int | None = None) -> int:
    """The connection cap of a listener when none is configured.

    A forwarded connection holds two descriptors (the accepted one and the one dialled);
    a listener may use half of what is left after `RESERVED_DESCRIPTORS`, so the public
    listener and the upstreams together stay under the limit. At least 16.

    Args:
        limit: the descriptor limit (default: this process's, `descriptor_limit()`).
    """
    if limit is None:
        limit = descriptor_limit()
    return max(16, (limit - RESERVED_DESCRIPTORS) // 4)


def default_handshake_limit(max_connections: int) -> int:
    """The budget of connections still in their TLS handshake: a quarter of the cap,
    at most 1,024 (a handshake costs CPU; more at once only queue), at least 1."""
    return max(1, min(max_connections // 4, 1024))
