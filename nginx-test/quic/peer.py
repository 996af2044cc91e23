#!/usr/bin/env python3
"""HTTP/3 peers for the tests, on aioquic (https://github.com/aiortc/aioquic).

    peer.py server PORT NAME CERT KEY      answers every request with NAME; prints "ready"
    peer.py get PORT SNI [--pad N] [--version 1|2] [--count N]
                                           one HTTP/3 GET per connection through PORT with
                                           server name SNI; prints each answer's body, or
                                           "error: ..."; --pad inflates the ClientHello by N
                                           bytes (ALPN names), so it spans several datagrams
                                           [--requests N --pause S] N requests on each
                                           connection, S seconds apart
    peer.py relay PORT TARGET_PORT [--drop] a UDP relay that swaps each client's first two
                                           datagrams (with --drop: forwards only the first);
                                           prints "ready"
    peer.py initials SNI [--pad N]         prints, in hex, one per line, the datagrams of a
                                           client's first flight (aioquic's), sent nowhere
    peer.py flood PORT SECONDS             datagrams for SECONDS, a new client every tenth:
                                           garbage, and Initial-looking packets of random
                                           connection IDs that open with no key; prints
                                           how many it sent
"""

import argparse
import asyncio
import os
import socket
import ssl
import sys

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent
from aioquic.quic.packet import QuicProtocolVersion


class Server(QuicConnectionProtocol):
    name = b""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)

    def quic_event_received(self, event: QuicEvent) -> None:
        for e in self.h3.handle_event(event):
            if isinstance(e, HeadersReceived) and e.stream_ended or isinstance(e, DataReceived) and e.stream_ended:
                self.h3.send_headers(e.stream_id, [(b":status", b"200"), (b"content-length", str(len(self.name)).encode())])
                self.h3.send_data(e.stream_id, self.name, end_stream=True)
        self.transmit()


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.body = b""
        self.done = asyncio.get_event_loop().create_future()

    def quic_event_received(self, event: QuicEvent) -> None:
        for e in self.h3.handle_event(event):
            if isinstance(e, DataReceived):
                self.body += e.data
                if e.stream_ended and not self.done.done():
                    self.done.set_result(self.body)
            elif isinstance(e, HeadersReceived) and e.stream_ended and not self.done.done():
                self.done.set_result(self.body)

    async def get(self, host: str) -> bytes:
        stream = self._quic.get_next_available_stream_id()
        self.h3.send_headers(stream, [(b":method", b"GET"), (b":scheme", b"https"),
                                      (b":authority", host.encode()), (b":path", b"/")], end_stream=True)
        self.transmit()
        return await self.done


async def run_server(args) -> None:
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    config.load_cert_chain(args.cert, args.key)
    Server.name = args.name.encode()
    await serve("127.0.0.1", args.port, configuration=config, create_protocol=Server, retry=args.retry)
    print("ready", flush=True)
    await asyncio.Future()


def pad_alpn(alpn, pad):
    """Names of up to 255 bytes added to `alpn`: the hello grows by about `pad` bytes."""
    left = pad
    while left > 0:
        n = min(255, left)
        alpn.append("x" * (n - 1))
        left -= n + 1
    return alpn


async def run_get(args) -> None:
    alpn = pad_alpn(list(H3_ALPN), args.pad)
    config = QuicConfiguration(is_client=True, alpn_protocols=alpn, server_name=args.sni,
                               verify_mode=ssl.CERT_NONE, idle_timeout=5)
    if args.version == 2:
        config.original_version = QuicProtocolVersion.VERSION_2
        config.supported_versions = [QuicProtocolVersion.VERSION_2, QuicProtocolVersion.VERSION_1]
    for _ in range(args.count):
        try:
            async with connect("127.0.0.1", args.port, configuration=config, create_protocol=Client,
                               wait_connected=True) as client:
                for i in range(args.requests):
                    if i:
                        await asyncio.sleep(args.pause)
                        client.body = b""
                        client.done = asyncio.get_event_loop().create_future()
                    body = await asyncio.wait_for(client.get(args.sni), args.timeout)
                    print(body.decode(), flush=True)
        except Exception as e:  # one line per failed connection
            print(f"error: {type(e).__name__} {e}", flush=True)


class Relay(asyncio.DatagramProtocol):
    """Forwards each client's datagrams to the target, its first two swapped."""

    def __init__(self, target, drop):
        self.target = target
        self.drop = drop
        self.clients = {}

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        c = self.clients.get(addr)
        if c is None:
            c = self.clients[addr] = {"held": [], "count": 0, "up": None}
            loop = asyncio.get_event_loop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.connect(("127.0.0.1", self.target))
            sock.setblocking(False)
            c["up"] = sock
            loop.add_reader(sock, self.answer, sock, addr)
        c["count"] += 1
        if self.drop:
            if c["count"] == 1:
                c["up"].send(data)
            return
        if c["count"] == 1:
            c["held"].append(data)
            return
        c["up"].send(data)
        for held in c["held"]:
            c["up"].send(held)
        c["held"] = []

    def answer(self, sock, addr):
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        self.transport.sendto(data, addr)


async def run_relay(args) -> None:
    loop = asyncio.get_event_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: Relay(args.target, args.drop), local_addr=("127.0.0.1", args.port))
    print("ready", flush=True)
    await asyncio.Future()


def run_flood(args) -> None:
    import time
    socks = []
    for _ in range(100):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        socks.append(sock)
    end = time.monotonic() + args.seconds
    sent = 0
    while time.monotonic() < end:
        if sent % 2:
            data = os.urandom(1 + sent % 1400)
        else:
            # A long header of version 1, a random 8-byte connection ID, no token, a length
            # that fits: it looks like an Initial packet and opens with no key.
            body = os.urandom(1182)
            data = bytes([0xc3]) + (1).to_bytes(4, "big") + bytes([8]) + os.urandom(8) + bytes([0, 0]) \
                + (0x4000 | len(body)).to_bytes(2, "big") + body
        k = sent % len(socks)
        if sent % 10 == 0:
            # A new client every tenth datagram: a session of its own at the edge.
            socks[k].close()
            socks[k] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks[k].bind(("127.0.0.1", 0))
            socks[k].setblocking(False)
        try:
            socks[k].sendto(data, ("127.0.0.1", args.port))
        except BlockingIOError:
            time.sleep(0.001)
        sent += 1
        if sent % 200 == 0:
            time.sleep(0.001)
    print(sent, flush=True)


def run_initials(args) -> None:
    from aioquic.quic.connection import QuicConnection

    config = QuicConfiguration(is_client=True, alpn_protocols=pad_alpn(list(H3_ALPN), args.pad),
                               server_name=args.sni, verify_mode=ssl.CERT_NONE)
    quic = QuicConnection(configuration=config)
    quic.connect(("127.0.0.1", 443), now=0.0)
    for data, _ in quic.datagrams_to_send(now=0.0):
        print(data.hex(), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("port", type=int)
    s.add_argument("name")
    s.add_argument("cert")
    s.add_argument("key")
    s.add_argument("--retry", action="store_true", help="answer a first Initial with a Retry")
    g = sub.add_parser("get")
    g.add_argument("port", type=int)
    g.add_argument("sni")
    g.add_argument("--pad", type=int, default=0)
    g.add_argument("--version", type=int, default=1)
    g.add_argument("--count", type=int, default=1)
    g.add_argument("--timeout", type=float, default=10)
    g.add_argument("--requests", type=int, default=1)
    g.add_argument("--pause", type=float, default=0)
    r = sub.add_parser("relay")
    r.add_argument("port", type=int)
    r.add_argument("target", type=int)
    r.add_argument("--drop", action="store_true")
    i = sub.add_parser("initials")
    i.add_argument("sni")
    i.add_argument("--pad", type=int, default=0)
    f = sub.add_parser("flood")
    f.add_argument("port", type=int)
    f.add_argument("seconds", type=float)
    args = p.parse_args()
    if args.cmd in ("flood", "initials"):
        {"flood": run_flood, "initials": run_initials}[args.cmd](args)
        return
    runner = {"server": run_server, "get": run_get, "relay": run_relay}[args.cmd]
    try:
        asyncio.run(runner(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
