"""Data channel set-up (pvmig/rpc/data_channel.py): the key proven over a fresh nonce,
TLS with the agents' certificates, and every failure of it a clear error."""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest

from pvmig import errors
from pvmig.rpc import data_channel as dc
from pvmig.rpc.security import Security, init_ca, issue

pytestmark = pytest.mark.timeout(60)
MID = "m1234"


class Server:
    """A listener whose connections each get the destination's half of the handshake;
    `check(hello)` decides, as the agent's claim does."""

    def __init__(self, check, tls=None) -> None:
        self.sock = dc.listen(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.check, self.tls = check, tls
        self.outcomes: list = []
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        sock, addr = self.sock.accept()
        try:
            conn, hello = dc.handshake(sock, str(addr), self.tls)
            try:
                self.check(hello)
            except errors.PvmigError as e:
                dc.refuse(conn, e)
                self.outcomes.append(e)
                return
            dc.accept(conn)
            self.outcomes.append(hello)
            conn.send([conn.recv(5)])  # echo: the connection works after it
        except Exception as e:
            self.outcomes.append(e)
        finally:
            sock.close()
            self.done.set()

    def close(self) -> None:
        self.sock.close()


def _key_check(key):
    def check(hello):
        if not hello.proves(key):
            raise errors.Unauthenticated("wrong key")
    return check


def test_a_proven_connection_carries_data():
    key = dc.new_key()
    srv = Server(_key_check(key))
    conn = dc.connect("127.0.0.1", srv.port, migration_id=MID, epoch=3, index=1, key=key,
                      tls=None)
    conn.send([b"hello"])
    assert conn.recv(5) == b"hello"
    conn.close()
    srv.done.wait(10)
    hello = srv.outcomes[0]
    assert (hello.migration_id, hello.epoch, hello.index) == (MID, 3, 1)
    srv.close()


def test_a_wrong_key_is_refused_by_name():
    srv = Server(_key_check(dc.new_key()))
    with pytest.raises(errors.Unauthenticated, match="refused a data connection: wrong key"):
        dc.connect("127.0.0.1", srv.port, migration_id=MID, epoch=1, index=0,
                   key=dc.new_key(), tls=None)
    srv.close()


def test_a_replayed_hello_proves_nothing():
    """What a listener on the wire saw of one connection, sent again on another: the
    nonce differs, so the proof does not hold."""
    key = dc.new_key()
    first = Server(_key_check(key))
    seen = []
    raw = socket.create_connection(("127.0.0.1", first.port))
    nonce = raw.recv(6 + dc.NONCE_BYTES)[6:]
    hello = (dc._CLIENT_HELLO.pack(dc.MAGIC, dc.VERSION, 1, 0, len(MID),
                                   dc.proof(key, nonce, 1, 0, MID)) + MID.encode())
    raw.sendall(hello)
    seen.append(hello)
    assert raw.recv(3) == b"\x00\x00\x00"  # accepted
    raw.close()
    again = Server(_key_check(key))
    replay = socket.create_connection(("127.0.0.1", again.port))
    replay.recv(6 + dc.NONCE_BYTES)
    replay.sendall(seen[0])
    again.done.wait(10)
    assert isinstance(again.outcomes[0], errors.Unauthenticated)
    replay.close()
    first.close()
    again.close()


def test_garbage_and_a_trickle_are_cut_off(monkeypatch):
    monkeypatch.setattr(dc, "HANDSHAKE_S", 0.5)
    srv = Server(lambda hello: None)
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.recv(64)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00" * 64)
    srv.done.wait(10)
    assert isinstance(srv.outcomes[0], errors.InvalidArgument)
    assert "bad magic" in str(srv.outcomes[0])
    s.close()
    srv.close()

    srv = Server(lambda hello: None)
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.recv(64)
    started = time.monotonic()
    for b in dc.MAGIC:  # a byte at a time, slower than the handshake allows in all
        s.sendall(bytes([b]))
        if srv.done.wait(0.2):
            break
    assert srv.done.wait(10)
    assert isinstance(srv.outcomes[0], (TimeoutError, socket.timeout))
    assert time.monotonic() - started < 5
    s.close()
    srv.close()


def test_nobody_listening_is_unavailable_by_address():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(errors.Unavailable, match=f"127.0.0.1:{port}"):
        dc.connect("127.0.0.1", port, migration_id=MID, epoch=1, index=0, key=b"k" * 32,
                   tls=None)


@pytest.fixture
def certs(tmp_path):
    init_ca(tmp_path)
    for name in ("a", "b"):
        issue(tmp_path, name, ["127.0.0.1"])

    def load(name):
        return Security.load(ca=tmp_path / "ca.pem", cert=tmp_path / f"{name}.pem",
                             key=tmp_path / f"{name}-key.pem")
    return load


def test_tls_with_the_agents_certificates(certs):
    key = dc.new_key()
    srv = Server(_key_check(key), tls=dc.server_context(certs("b")))
    conn = dc.connect("127.0.0.1", srv.port, migration_id=MID, epoch=1, index=0, key=key,
                      tls=dc.client_context(certs("a")))
    assert conn.tls
    conn.send([b"12345"])
    assert conn.recv(5) == b"12345"
    conn.close()
    srv.close()


def test_tls_without_a_client_certificate_is_refused(certs, tmp_path):
    srv = Server(lambda hello: None, tls=dc.server_context(certs("b")))
    bare = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    with pytest.raises((errors.Unauthenticated, errors.Unavailable)):
        dc.connect("127.0.0.1", srv.port, migration_id=MID, epoch=1, index=0,
                   key=dc.new_key(), tls=bare)
    srv.done.wait(10)
    assert isinstance(srv.outcomes[0], (ssl.SSLError, OSError))
    srv.close()
