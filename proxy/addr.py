"""`host:port` addresses, split and joined the one way the whole project does it.

Go's `net.SplitHostPort`/`net.JoinHostPort` rules: an IPv6 host is bracketed (`[::1]:80`),
the host may be empty (`:8443`), the port is a number 0-65535.

Rule 1: pure; imports nothing from the project but `proxy.errors`.
"""

from __future__ import annotations

from proxy.errors import ConfigError


def join_host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(addr: str, name: str, *, default_port: int | None = None) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); the host may be empty.

    Args:
        addr: the address.
        name: what the address is (a flag or field name), for the error message.
        default_port: when given, a bare host (`consul.local`, `[::1]`) is allowed and
            gets this port, as Go's HTTP client allows for its address.

    Raises:
        ConfigError: no port (and no default), too many colons, or a port that is not
            a number 0-65535.
    """
    if default_port is not None:
        bare = addr.startswith("[") and addr.endswith("]")
        if bare or ":" not in addr:
            return addr.strip("[]"), default_port
    host, sep, port = addr.rpartition(":")
    if not sep:
        raise ConfigError(f"{name}: missing port in address {addr!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{name}: too many colons in address {addr!r}")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"{name}: invalid port in address {addr!r}") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"{name}: port out of range in address {addr!r}")
    return host, number
