"""The benchmark's backend process: one plain and one mTLS server, both echo-or-sink.

    python bench/bench_backend.py -http-addr 127.0.0.1:8500 [-service db]

Fetches the leaf of `-service` and the roots from the agent, listens on 127.0.0.1:0 twice
(plain, and mTLS requiring a client leaf from the roots), prints
`READY plain=<port> tls=<port>` and serves until SIGTERM/SIGINT.

Per connection, the first byte decides:
- `S` followed by an 8-byte big-endian length N: sink. Count bytes until N have arrived
  (counted here, at the far end), then answer the count as 8 bytes big-endian.
- anything else: echo every byte back.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import sys

import uvloop
from bench_util import AgentHTTP, server_context

_ECHO, _SINK, _DONE = 1, 2, 3


class EchoOrSink(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.mode = 0
        self.head = b""
        self.need = 0
        self.got = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        t = self.transport
        assert t is not None
        if self.mode == _ECHO:
            t.write(data)
            return
        if self.mode == _SINK:
            self.got += len(data)
            if self.got >= self.need:
                self.mode = _DONE
                t.write(struct.pack("!Q", self.got))
            return
        if self.mode == _DONE:
            return
        buf = self.head + data
        if buf[:1] != b"S":
            self.mode = _ECHO
            t.write(buf)
            return
        if len(buf) < 9:
            self.head = buf
            return
        self.head = b""
        (self.need,) = struct.unpack("!Q", buf[1:9])
        self.mode = _SINK
        self.got = len(buf) - 9
        if self.got >= self.need:
            self.mode = _DONE
            t.write(struct.pack("!Q", self.got))

    def eof_received(self) -> bool:
        return False  # close our side too

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()


async def serve(agent_addr: str, service: str) -> None:
    mat = AgentHTTP(agent_addr).material(service)
    ctx = server_context(mat)
    loop = asyncio.get_running_loop()
    plain = await loop.create_server(EchoOrSink, "127.0.0.1", 0, backlog=4096)
    tls = await loop.create_server(EchoOrSink, "127.0.0.1", 0, ssl=ctx, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    pp = plain.sockets[0].getsockname()[1]
    tp = tls.sockets[0].getsockname()[1]
    print(f"READY plain={pp} tls={tp}", flush=True)
    await stop.wait()
    plain.close()
    tls.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-http-addr", required=True)
    parser.add_argument("-service", default="db")
    args = parser.parse_args()
    uvloop.run(serve(args.http_addr, args.service))
    return 0


if __name__ == "__main__":
    sys.exit(main())
