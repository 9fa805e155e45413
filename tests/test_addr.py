"""proxy.addr: the one host:port pair of the project (Go's net.SplitHostPort rules)."""

from __future__ import annotations

import pytest

from proxy.addr import join_host_port, split_host_port
from proxy.errors import ConfigError

# -- split_host_port ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("0.0.0.0:21000", ("0.0.0.0", 21000)),
        ("[::1]:80", ("::1", 80)),
        ("[fe80::1]:0", ("fe80::1", 0)),
        (":8080", ("", 8080)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_split_host_port_accepts_go_shapes(addr: str, expected: tuple[str, int]) -> None:
    assert split_host_port(addr, "-listen") == expected


@pytest.mark.parametrize(
    ("addr", "message"),
    [
        ("127.0.0.1", "missing port"),
        ("", "missing port"),
        ("127.0.0.1:http", "invalid port"),
        ("127.0.0.1:", "invalid port"),
        ("127.0.0.1:65536", "port out of range"),
        ("127.0.0.1:-1", "port out of range"),
        ("::1:80", "too many colons"),
        ("a:b:80", "too many colons"),
    ],
)
def test_split_host_port_rejects_with_the_field_name(addr: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^-listen: {message}"):
        split_host_port(addr, "-listen")


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("consul.local", ("consul.local", 0)),
        ("[::1]", ("::1", 0)),
        ("consul.local:8501", ("consul.local", 8501)),
        ("[::1]:8500", ("::1", 8500)),
    ],
)
def test_a_default_port_allows_a_bare_host(addr: str, expected: tuple[str, int]) -> None:
    assert split_host_port(addr, "-http-addr", default_port=0) == expected


def test_a_default_port_still_refuses_a_bad_port() -> None:
    with pytest.raises(ConfigError, match=r"^-http-addr: invalid port"):
        split_host_port("consul.local:http", "-http-addr", default_port=0)


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [("127.0.0.1", 80, "127.0.0.1:80"), ("::1", 80, "[::1]:80"), ("", 8443, ":8443")],
)
def test_join_host_port_brackets_ipv6(host: str, port: int, expected: str) -> None:
    assert join_host_port(host, port) == expected
    assert split_host_port(expected, "x") == (host, port)
