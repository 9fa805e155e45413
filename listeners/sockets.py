"""What the listeners ask of a connection's socket: options, unread bytes, the peer's
address, and which errors are routine ends of a connection.

Rule 1: helpers over an asyncio transport's socket only; nothing here keeps state.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import ipaddress
import socket
import struct
import sys
import termios

from proxy.addr import join_host_port

KEEPALIVE_IDLE = 15  # seconds, as Go's default dialer and listener

# Linux copies a listening socket's options (TCP_NODELAY, SO_KEEPALIVE and its timers) to
# every connection it accepts, so a listener sets them once (`tune_listening_socket`) and
# an accepted connection needs no call of its own. Each call through uvloop's socket wrapper
# also built a Python socket object from the descriptor, with system calls to learn its
# family and type: 22 µs per connection for the four options (bench/README.md,
# "Per-connection work, second pass").
INHERITS_OPTIONS = sys.platform == "linux"


@functools.lru_cache(maxsize=256)  # asked per upstream dial; the hosts are few
def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is this machine's loopback: `localhost`,
    127.0.0.0/8, ::1. Other names are not resolved here, and count as not loopback."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def pending_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes the kernel holds unread on the transport's socket (0 when it cannot tell)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        answer = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int(struct.unpack("i", answer)[0])


def _set_options(sock: socket.socket, *, nodelay: bool) -> None:
    with contextlib.suppress(OSError):
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_IDLE)


def tune_listening_socket(sock: socket.socket) -> None:
    """TCP_NODELAY and keepalive (15 s) on a listening TCP socket: its accepted connections
    inherit them where `INHERITS_OPTIONS`."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        _set_options(sock, nodelay=True)


def tune_accepted(transport: asyncio.BaseTransport) -> None:
    """Options of an accepted connection: nothing to do where they were inherited from a
    socket set by `tune_listening_socket`, else `tune_socket`."""
    if not INHERITS_OPTIONS:
        tune_socket(transport)


def tune_socket(transport: asyncio.BaseTransport) -> None:
    """Keepalive (15 s) on a connection's socket, as Go's dialer sets by default.

    TCP_NODELAY, which Go sets too, is the event loop's: asyncio and uvloop set it on every
    TCP transport they make. The options go through one socket object made with the
    descriptor's family and type given, so that it costs no system call to learn them.
    """
    wrapped = transport.get_extra_info("socket")
    if wrapped is None:
        return
    family = wrapped.family
    if family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, wrapped.fileno())
    try:
        _set_options(sock, nodelay=False)
    finally:
        sock.detach()  # the descriptor stays the transport's


def peer_address(transport: asyncio.BaseTransport) -> str:
    """The `host:port` of a connection's remote end ("" when the socket has none)."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return join_host_port(str(peer[0]), int(peer[1]))
    return ""


def is_routine_close(exc: BaseException | None) -> bool:
    """Peer resets, broken pipes and EOFs: part of life, logged at debug only."""
    return exc is None or isinstance(
        exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError | EOFError
    )
