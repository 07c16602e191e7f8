"""The transport's ceilings: two processes moving a guest's worth of bytes.

`pvmig bench` measures pvmig against these in the same run. Like a migration, one
process reads the bytes out of a shared-memory file and sends them on N streams, another
receives them straight into a shared-memory file of its own; nothing else is done with
them (no checksums, hashing or page bookkeeping). Two transports:

- tcp: raw TCP, N connections, 1 MiB sends and recv_into: what the machine can move.
- tls: the same over TLS (Python's ssl, OpenSSL), certificates from a throwaway CA as
  the agents' under mutual TLS: what the data channels can move when encrypted.
- grpc: what pvmig's own transport can move, a bare gRPC (grpc.aio, HTTP/2) page stream
  with the agents' channel options: N bidirectional streams on one channel, 1 MiB
  messages of raw bytes (no protobuf), each copied into place on arrival, as pvmig's are.

The sender is this process's child, the receiver another: two processes, as two agents.

    python -m pvmig.tools.ceiling recv TRANSPORT PORT_FILE DEST_FILE NBYTES STREAMS [CERTS]
    python -m pvmig.tools.ceiling send TRANSPORT HOST:PORT SRC_FILE STREAMS [CERTS]
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from pvmig.hv.shm import SharedFile
from pvmig.rpc import channel, data_channel
from pvmig.rpc.security import Security, init_ca, issue

CHUNK = 1 << 20
TRANSPORTS = ("tcp", "tls", "grpc")
_OFFSET = 8  # a gRPC chunk starts with its offset, u64 little-endian


def measure(nbytes: int, streams: int, workdir: Path, *, host: str = "127.0.0.1",
            transport: str = "tcp") -> dict:
    """Move `nbytes` from one process to another on `streams` streams of `transport`;
    the receiver's clock from the first stream accepted to the last byte in its memory."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r} (one of {', '.join(TRANSPORTS)})")
    workdir.mkdir(parents=True, exist_ok=True)
    src, dst, port_file = workdir / "ceiling.src", workdir / "ceiling.dst", workdir / "port"
    fill = SharedFile.create(src, nbytes)
    try:
        rng = np.random.default_rng(1)
        fill.bytes[:] = rng.integers(0, 256, nbytes, dtype=np.uint8)
    finally:
        fill.close()
    port_file.unlink(missing_ok=True)
    certs = []
    if transport == "tls":
        certs = [str(workdir / "certs")]
        if not (workdir / "certs" / "ceiling.pem").exists():
            init_ca(workdir / "certs")
            issue(workdir / "certs", "ceiling", ["127.0.0.1"])
    recv = subprocess.Popen([sys.executable, "-m", "pvmig.tools.ceiling", "recv", transport,
                             str(port_file), str(dst), str(nbytes), str(streams), *certs],
                            stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if recv.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the ceiling's receiver did not start")
            time.sleep(0.01)
        port = int(port_file.read_text())
        send = subprocess.run([sys.executable, "-m", "pvmig.tools.ceiling", "send", transport,
                               f"{host}:{port}", str(src), str(streams), *certs], timeout=600)
        out, _ = recv.communicate(timeout=600)
        if send.returncode or recv.returncode:
            raise RuntimeError(f"the ceiling's sender or receiver failed "
                               f"({send.returncode}, {recv.returncode})")
        result = json.loads(out)
        result["identical"] = _same(src, dst)
    finally:
        if recv.poll() is None:
            recv.kill()
        for p in (src, dst):
            p.unlink(missing_ok=True)
    result["gib_per_s"] = nbytes / result["seconds"] / (1 << 30)
    result["streams"] = streams
    result["transport"] = transport
    return result


def _same(a: Path, b: Path) -> bool:
    """Whether the receiver holds exactly what was sent: a ceiling that lost bytes would
    flatter nobody."""
    x, y = SharedFile.open(a), SharedFile.open(b)
    try:
        return x.size == y.size and all(
            np.array_equal(x.bytes[lo:lo + (64 << 20)], y.bytes[lo:lo + (64 << 20)])
            for lo in range(0, x.size, 64 << 20))
    finally:
        x.close()
        y.close()


def _announce(port_file: str, port: int) -> None:
    """The port, written whole before the file appears (the parent reads it at once)."""
    tmp = Path(f"{port_file}.tmp")
    tmp.write_text(str(port))
    tmp.replace(port_file)


def _spans(nbytes: int, streams: int) -> list[tuple[int, int]]:
    step = -(-nbytes // streams)
    return [(lo, min(lo + step, nbytes)) for lo in range(0, nbytes, step)]


def _tls(certs: str | None, side: int) -> ssl.SSLContext | None:
    if not certs:
        return None
    d = Path(certs)
    sec = Security.load(ca=d / "ca.pem", cert=d / "ceiling.pem", key=d / "ceiling-key.pem")
    return (data_channel.server_context(sec) if side == ssl.PROTOCOL_TLS_SERVER
            else data_channel.client_context(sec))


def _recv(port_file: str, dst: str, nbytes: int, streams: int, certs: str | None = None) -> None:
    mem = SharedFile.create(dst, nbytes)
    view = memoryview(mem.bytes)
    srv = socket.create_server(("127.0.0.1", 0))
    srv.listen(streams)
    _announce(port_file, srv.getsockname()[1])
    tls = _tls(certs, ssl.PROTOCOL_TLS_SERVER)
    conns = [srv.accept()[0] for _ in range(len(_spans(nbytes, streams)))]
    started = time.monotonic()
    if tls is not None:  # (the handshakes count: a migration's connections make them too)
        conns = [tls.wrap_socket(c, server_side=True) for c in conns]

    def drain(conn: socket.socket, lo: int, hi: int) -> None:
        while lo < hi:
            n = conn.recv_into(view[lo:min(hi, lo + CHUNK)])
            if not n:
                raise ConnectionError("sender went away")
            lo += n

    threads = [threading.Thread(target=drain, args=(c, *span))
               for c, span in zip(conns, _spans(nbytes, streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"seconds": time.monotonic() - started, "bytes": nbytes}))


def _send(address: str, src: str, streams: int, certs: str | None = None) -> None:
    mem = SharedFile.open(src)
    data = memoryview(mem.bytes)
    host, _, port = address.rpartition(":")
    spans = _spans(len(data), streams)
    conns = [socket.create_connection((host, int(port))) for _ in spans]
    tls = _tls(certs, ssl.PROTOCOL_TLS_CLIENT)
    if tls is not None:
        conns = [tls.wrap_socket(c, server_hostname=host) for c in conns]

    def pour(conn: socket.socket, lo: int, hi: int) -> None:
        for at in range(lo, hi, CHUNK):
            conn.sendall(data[at:min(hi, at + CHUNK)])
        if tls is not None:
            # TLS 1.3's session tickets sit unread here: closing now would reset the
            # connection and drop what the receiver has not read yet. Wait for its close.
            try:
                while conn.recv(1 << 16):
                    pass
            except OSError:  # (ssl.SSLError too: an end without close_notify)
                pass
        conn.close()

    threads = [threading.Thread(target=pour, args=(c, *span)) for c, span in zip(conns, spans)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ---- gRPC: pvmig's transport with nothing of pvmig on it

_METHOD = "/pvmig.Ceiling/Transfer"


def _raw(b: bytes) -> bytes:
    return b


def _grpc_recv(port_file: str, dst: str, nbytes: int, streams: int) -> None:
    import grpc

    mem = SharedFile.create(dst, nbytes)
    into = mem.bytes
    clock: dict = {}

    async def transfer(chunks, context):
        clock.setdefault("started", time.monotonic())
        async for chunk in chunks:
            at = int.from_bytes(chunk[:_OFFSET], "little")
            into[at:at + len(chunk) - _OFFSET] = np.frombuffer(chunk, np.uint8, offset=_OFFSET)
        clock["received"] = clock.get("received", 0) + 1
        yield b""

    async def serve() -> None:
        server = grpc.aio.server(options=channel.SERVER_OPTIONS)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "pvmig.Ceiling", {"Transfer": grpc.stream_stream_rpc_method_handler(
                transfer, request_deserializer=_raw, response_serializer=_raw)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        _announce(port_file, port)
        while clock.get("received", 0) < len(_spans(nbytes, streams)):
            await asyncio.sleep(0.001)
        seconds = time.monotonic() - clock["started"]
        await server.stop(1)
        print(json.dumps({"seconds": seconds, "bytes": nbytes}))

    asyncio.run(serve())


def _grpc_send(address: str, src: str, streams: int) -> None:
    import grpc

    mem = SharedFile.open(src)
    data = memoryview(mem.bytes)

    async def pour(channel, lo: int, hi: int) -> None:
        call = channel.stream_stream(_METHOD, request_serializer=_raw,
                                     response_deserializer=_raw)()
        for at in range(lo, hi, CHUNK):
            await call.write(b"".join((at.to_bytes(_OFFSET, "little"),
                                       data[at:min(hi, at + CHUNK)])))
        await call.done_writing()
        async for _ in call:
            pass

    async def main() -> None:
        async with grpc.aio.insecure_channel(address, options=channel.CHANNEL_OPTIONS) as ch:
            await asyncio.gather(*(pour(ch, *span) for span in _spans(len(data), streams)))

    asyncio.run(main())


if __name__ == "__main__":
    mode, transport, *rest = sys.argv[1:]
    if mode == "recv":
        if transport == "grpc":
            _grpc_recv(rest[0], rest[1], int(rest[2]), int(rest[3]))
        else:
            _recv(rest[0], rest[1], int(rest[2]), int(rest[3]), *rest[4:])
    elif transport == "grpc":
        _grpc_send(rest[0], rest[1], int(rest[2]))
    else:
        _send(rest[0], rest[1], int(rest[2]), *rest[3:])
