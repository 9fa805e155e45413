"""What the listeners ask of a connection's socket: options, unread bytes, the peer's
address, and which errors are routine ends of a connection.

Rule 1: helpers over an asyncio transport's socket only; nothing here keeps state.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios

from proxy.addr import join_host_port

KEEPALIVE_IDLE = 15  # seconds, as Go's default dialer and listener


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


def tune_socket(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY and keepalive (15 s) on a connection's socket, as Go sets by default."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_IDLE)


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
