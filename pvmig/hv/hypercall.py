"""The channel between a guest process and its host agent: the emulated hypercall and
upcall path for what the shared memory does not carry (boot, suspend, resume).

Length-prefixed msgpack over a socketpair. The guest side is blocking (the guest is a
single vCPU); the agent side is asyncio.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct

import msgpack

_LEN = struct.Struct("<I")
MAX_MESSAGE = 1 << 20


def encode(msg: dict) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return _LEN.pack(len(body)) + body


class HypervisorGone(ConnectionError):
    """The agent's end of the channel closed: it crashed (a destroy kills the guest)."""


class GuestChannel:
    """The guest's end: blocking send and receive, and a poll for the main loop."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        sock.setblocking(True)

    def send(self, msg: dict) -> None:
        self._sock.sendall(encode(msg))

    def send_fd(self, msg: dict, fd: int) -> None:
        """A message with a descriptor (SCM_RIGHTS): the first one on the channel only,
        which the agent reads before its streams take the socket (read_first)."""
        data = encode(msg)
        sent = socket.send_fds(self._sock, [data], [fd])
        if sent < len(data):
            self._sock.sendall(data[sent:])

    def fileno(self) -> int:
        return self._sock.fileno()

    def poll(self, timeout: float) -> bool:
        return bool(select.select([self._sock], [], [], max(timeout, 0.0))[0])

    def closed(self) -> bool:
        """The agent has gone (its end is closed), without taking a message, even one
        it sent before it went (POLLRDHUP says so with data still unread)."""
        poller = select.poll()
        poller.register(self._sock, select.POLLRDHUP)
        return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
                   for _, ev in poller.poll(0))

    def recv(self) -> dict | None:
        """The next message, or None when the agent has gone."""
        head = self._read(_LEN.size)
        if head is None:
            return None
        body = self._read(_LEN.unpack(head)[0])
        return None if body is None else msgpack.unpackb(body, raw=False)

    def _read(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self._sock.recv(n - len(buf))
            except ConnectionError:
                return None
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)


def read_first(sock: socket.socket, timeout_s: float) -> tuple[dict, list[int]]:
    """The guest's first message, and the descriptors it carried (GuestChannel.send_fd),
    read with no byte beyond it; blocking (run it in a thread)."""
    sock.settimeout(timeout_s)
    try:
        head, fds, _, _ = socket.recv_fds(sock, _LEN.size, 4)
        if len(head) < _LEN.size:
            head += sock.recv(_LEN.size - len(head), socket.MSG_WAITALL)
        if len(head) < _LEN.size:
            raise EOFError("the guest closed its channel")
        (n,) = _LEN.unpack(head)
        if n > MAX_MESSAGE:
            raise EOFError(f"guest sent a {n}-byte message")
        body = sock.recv(n, socket.MSG_WAITALL)
        if len(body) < n:
            raise EOFError("the guest closed its channel")
        return msgpack.unpackb(body, raw=False), fds
    finally:
        sock.settimeout(None)


class AgentChannel:
    """The agent's end, over asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> "AgentChannel":
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    async def send(self, msg: dict) -> None:
        self._writer.write(encode(msg))
        await self._writer.drain()

    async def recv(self) -> dict:
        """The next message; EOFError when the guest has gone."""
        try:
            head = await self._reader.readexactly(_LEN.size)
            (n,) = _LEN.unpack(head)
            if n > MAX_MESSAGE:
                raise EOFError(f"guest sent a {n}-byte message")
            return msgpack.unpackb(await self._reader.readexactly(n), raw=False)
        except asyncio.IncompleteReadError as e:
            raise EOFError("the guest closed its channel") from e

    def close(self) -> None:
        self._writer.close()
