"""Data channels: the plain connections page data travels on (transport tcp).

gRPC sets them up and stays the control plane: the destination's OpenData names an
endpoint, an epoch and a one-time key; the source opens N connections to it, as QEMU's
multifd channels and Xen's migration stream are plain sockets. Under mutual TLS each
connection is TLS with the agents' own certificates. Whatever the security, each
connection proves the key before the destination reads a record from it:

    destination -> source   SERVER_HELLO  magic, version, a 16-byte nonce
    source -> destination   CLIENT_HELLO  magic, version, epoch, index, the migration's
                                          id, HMAC-SHA256(key, nonce | epoch | index | id)
    destination -> source   VERDICT       0 and nothing, or an error's code and message

A fresh nonce per connection makes a replayed hello worthless; a slot (epoch, index) is
taken once; the whole handshake has HANDSHAKE_S to finish, so a peer that trickles
bytes is cut off. After it, both sides use blocking sockets in threads of their own
(`recv_into` and `sendmsg` release the GIL: the copies run beside the event loop), and
the kernel's own timers notice a dead peer (TCP_USER_TIMEOUT, keepalive).
"""

from __future__ import annotations

import hmac
import os
import select
import socket
import ssl
import struct
import tempfile
import time
from dataclasses import dataclass
from hashlib import sha256

from pvmig import errors
from pvmig.rpc.security import Security

MAGIC = b"PVMD"
VERSION = 1
NONCE_BYTES = 16
KEY_BYTES = 32
MAX_ID = 64
HANDSHAKE_S = 5.0  # from accept to verdict, all of it
CONNECT_S = 5.0
USER_TIMEOUT_MS = 10_000  # unacknowledged data this long: the connection is dead
KEEPALIVE = (5, 2, 3)  # idle s, interval s, probes: an idle connection's peer gone

_SERVER_HELLO = struct.Struct(f"<4sH{NONCE_BYTES}s")
_CLIENT_HELLO = struct.Struct("<4sHIHH32s")  # + the migration id
_VERDICT = struct.Struct("<BH")  # 0: accepted; else the error's code follows, then text


class Closed(ConnectionError):
    """The peer closed the connection (cleanly, between or inside a record)."""


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def proof(key: bytes, nonce: bytes, epoch: int, index: int, migration_id: str) -> bytes:
    msg = b"pvmig-data/1" + nonce + struct.pack("<IH", epoch, index) + migration_id.encode()
    return hmac.new(key, msg, sha256).digest()


@dataclass(frozen=True)
class Hello:
    """A source's claim, before it is checked against the migration's key."""

    migration_id: str
    epoch: int
    index: int
    nonce: bytes
    proof: bytes

    def proves(self, key: bytes) -> bool:
        return hmac.compare_digest(
            self.proof, proof(key, self.nonce, self.epoch, self.index, self.migration_id))


class Connection:
    """One data connection: whole sends and whole receives, nothing more."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.tls = isinstance(sock, ssl.SSLSocket)

    def send(self, parts) -> None:
        """Send every part (bytes-like, each contiguous), in order, as one write where
        the socket allows it (sendmsg gathers them in the kernel: no copy here)."""
        if self.tls:  # an SSLSocket has no sendmsg
            for part in parts:
                self.sock.sendall(part)
            return
        views = [v.cast("B") for v in map(memoryview, parts) if v.nbytes]
        while views:
            sent = self.sock.sendmsg(views[:1024])  # (IOV_MAX)
            while sent:
                if sent >= len(views[0]):
                    sent -= len(views.pop(0))
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    def recv_into(self, view, deadline: float | None = None) -> None:
        """Exactly len(view) bytes into view (guest RAM, a buffer); Closed at EOF."""
        view = memoryview(view)
        if not view.nbytes:
            return
        view = view.cast("B")
        got, size = 0, len(view)
        while got < size:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("too slow")
                self.sock.settimeout(left)
            if self.tls or deadline is not None:
                n = self.sock.recv_into(view[got:], size - got)
            else:
                n = self.sock.recv_into(view[got:], size - got, socket.MSG_WAITALL)
            if n == 0:
                raise Closed(f"{self.peer} closed the connection"
                             + (f" {size - got} bytes short of a record" if got else ""))
            got += n

    def recv(self, size: int, deadline: float | None = None) -> bytes:
        buf = bytearray(size)
        self.recv_into(buf, deadline)
        return bytes(buf)

    def has_input(self, timeout_s: float = 0.0) -> bool:
        """Whether the peer sent something (a destination sends nothing mid-round but
        an error: the source looks between batches, before its sends stall on it), or
        does within timeout_s."""
        if self.tls and self.sock.pending():
            return True
        return bool(select.select([self.sock], [], [], timeout_s)[0])

    def shutdown(self) -> None:
        """Wake any thread blocked on the connection (it gets an error or EOF)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.shutdown()
        self.sock.close()


# ---- TLS

def _context(sec: Security, side: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=sec.ca.decode())
    ctx.verify_mode = ssl.CERT_REQUIRED
    # ssl loads a chain from files only: a private directory, gone at once
    with tempfile.TemporaryDirectory(prefix="pvmig-tls-") as d:
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        for path, data in ((cert, sec.cert), (key, sec.key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert, key)
    return ctx


def server_context(sec: Security) -> ssl.SSLContext | None:
    return _context(sec, ssl.PROTOCOL_TLS_SERVER) if sec.tls else None


def client_context(sec: Security) -> ssl.SSLContext | None:
    return _context(sec, ssl.PROTOCOL_TLS_CLIENT) if sec.tls else None


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle, interval, count = KEEPALIVE
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


# ---- the source's end

def connect(host: str, port: int, *, migration_id: str, epoch: int, index: int, key: bytes,
            tls: ssl.SSLContext | None) -> Connection:
    """Open, secure and prove one connection; the destination's refusal, by name."""
    where = f"the destination's data endpoint {host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_S)
    except OSError as e:
        raise errors.Unavailable(f"cannot reach {where}: {e.strerror or e}") from None
    conn = None
    try:
        _tune(sock)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
        conn = Connection(sock, where)
        deadline = time.monotonic() + HANDSHAKE_S
        magic, version, nonce = _SERVER_HELLO.unpack(conn.recv(_SERVER_HELLO.size, deadline))
        if magic != MAGIC or version != VERSION:
            raise errors.FailedPrecondition(f"{where} is not a pvmig data endpoint of "
                                            f"version {VERSION}")
        mid = migration_id.encode()
        conn.send([_CLIENT_HELLO.pack(MAGIC, VERSION, epoch, index, len(mid),
                                      proof(key, nonce, epoch, index, migration_id)), mid])
        status, length = _VERDICT.unpack(conn.recv(_VERDICT.size, deadline))
        if status:
            text = conn.recv(length, deadline).decode(errors="replace") if length else ""
            code, _, message = text.partition(": ")
            raise errors.BY_CODE.get(code, errors.Unavailable)(
                f"{where} refused a data connection: {message or text}")
        sock.settimeout(None)
        return conn
    except (OSError, struct.error) as e:
        (conn or Connection(sock, where)).close()
        if isinstance(e, ssl.SSLError):
            raise errors.Unauthenticated(f"TLS with {where} failed: {e.reason or e}") from None
        raise errors.Unavailable(f"data connection to {where} failed: {e}") from None
    except BaseException:
        (conn or Connection(sock, where)).close()
        raise


# ---- the destination's end

def listen(address: tuple[str, int]) -> socket.socket:
    host, port = address
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host
                                    else socket.AF_INET, backlog=64)
    except OSError as e:
        raise errors.Unavailable(f"cannot listen for data on {host}:{port}: "
                                 f"{e.strerror or e}") from None
    return sock


def handshake(sock: socket.socket, peer: str, tls: ssl.SSLContext | None
              ) -> tuple[Connection, Hello]:
    """The destination's half up to the claim (TLS done, nonce sent, hello read).
    Raises errors.InvalidArgument (or OSError, TimeoutError) on anything else."""
    deadline = time.monotonic() + HANDSHAKE_S
    sock.settimeout(HANDSHAKE_S)
    _tune(sock)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_side=True)
    conn = Connection(sock, peer)
    nonce = os.urandom(NONCE_BYTES)
    conn.send([_SERVER_HELLO.pack(MAGIC, VERSION, nonce)])
    magic, version, epoch, index, id_len, given = _CLIENT_HELLO.unpack(
        conn.recv(_CLIENT_HELLO.size, deadline))
    if magic != MAGIC:
        raise errors.InvalidArgument("not a pvmig data connection (bad magic)")
    if version != VERSION:
        raise errors.FailedPrecondition(f"data channel version {version}, this agent speaks "
                                        f"{VERSION}")
    if not 0 < id_len <= MAX_ID:
        raise errors.InvalidArgument(f"migration id of {id_len} bytes")
    try:
        mid = conn.recv(id_len, deadline).decode()
    except UnicodeDecodeError:
        raise errors.InvalidArgument("migration id is not UTF-8") from None
    return conn, Hello(mid, epoch, index, nonce, given)


def accept(conn: Connection) -> None:
    conn.send([_VERDICT.pack(0, 0)])
    conn.sock.settimeout(None)


def refuse(conn: Connection, error: errors.PvmigError) -> None:
    text = f"{error.code}: {error}".encode()[:4000]
    try:
        conn.send([_VERDICT.pack(1, len(text)), text])
    except OSError:
        pass
