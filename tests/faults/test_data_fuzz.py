"""Bad input on an agent's data port (hypothesis), as test_wire_fuzz.py does for gRPC:
garbage, wrong and replayed keys, truncated headers, batches past the limit or outside
the domain, a trickle, a migration that ended. Each gets an error in the agent's log and
a closed connection; the agent stays up, the domain running on it all along is
unharmed, and the incoming domain's memory (a real file) never changes."""

from __future__ import annotations

import socket
import struct
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import create, domains, local_cluster, wait_running_and_checking

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig._proto import pvmig_pb2_grpc as pb_grpc
from pvmig.hv.memory import PAGE_SIZE
from pvmig.migration import policy, wire
from pvmig.rpc import data_channel as dc

VICTIM = "victim-d4"
LIVE = "data-fuzz-live"
INCOMING = "data-fuzz-incoming"
RAM = 1 << 20  # 256 frames
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(tmp_path_factory.mktemp("datafuzz"), session_timeout_s=30) as c:
        create(c["a"].address, VICTIM, ram_mb=16, dirty_rate=2000)
        yield c


def _dest(cluster):
    return grpc.insecure_channel(cluster["b"].address)


@pytest.fixture(scope="module")
def live(cluster):
    """An incoming migration prepared on b, and its data channels' first epoch."""
    with _dest(cluster) as ch:
        stub = pb_grpc.MigrationDestStub(ch)
        stub.Prepare(pb.PrepareRequest(migration_id=LIVE, domain=INCOMING, ram_bytes=RAM,
                                       source_agent="a"), timeout=60)
        chans = stub.OpenData(pb.MigrationRef(migration_id=LIVE), timeout=30)
    assert chans.port == cluster["b"].data_port and not chans.tls and len(chans.key) == 32
    return chans


def _memory(cluster) -> np.ndarray:
    """The incoming domain's RAM, read from its file."""
    (path,) = [p for p in cluster["b"].mem_dir.rglob("*") if INCOMING in p.name
               and p.stat().st_size == RAM]
    return np.fromfile(path, np.uint8)


def _closed_by_agent(s: socket.socket, timeout: float = 15.0) -> bytes:
    """What the agent sent until it closed the connection (it must close it)."""
    s.settimeout(timeout)
    got = b""
    while chunk := s.recv(1 << 16):
        got += chunk
    return got


def _still_fine(cluster, before=None) -> None:
    for agent in (cluster["a"], cluster["b"]):
        assert agent.running, f"agent {agent.name} died: {agent.log_tail()}"
    assert domains(cluster["a"].address)[VICTIM].state == "running"
    assert domains(cluster["b"].address)[INCOMING].state == "incoming"
    if before is not None:
        assert np.array_equal(_memory(cluster), before), "the incoming domain's memory changed"


def _connect(cluster, chans, *, key=None, epoch=None, index=0, mid=LIVE):
    return dc.connect("127.0.0.1", chans.port, migration_id=mid,
                      epoch=chans.epoch if epoch is None else epoch, index=index,
                      key=chans.key if key is None else key, tls=None)


@FUZZ
@given(st.binary(min_size=1, max_size=200))
def test_garbage_before_the_handshake_is_cut_off(cluster, live, data):
    before = _memory(cluster)
    s = socket.create_connection(("127.0.0.1", live.port))
    try:
        s.recv(6 + dc.NONCE_BYTES)
        s.sendall(data)
        if len(data) < 50:  # a short hello waits for the rest: the handshake's deadline
            s.shutdown(socket.SHUT_WR)
        _closed_by_agent(s)
    finally:
        s.close()
    _still_fine(cluster, before)


def test_wrong_replayed_and_stale_keys_are_refused(cluster, live):
    before = _memory(cluster)
    with pytest.raises(errors.Unauthenticated, match="wrong key for migration"):
        _connect(cluster, live, key=dc.new_key())
    with pytest.raises(errors.FailedPrecondition, match="epoch 7 .* is over"):
        _connect(cluster, live, epoch=7)
    with pytest.raises(errors.NotFound, match="no incoming migration 'nobody'"):
        _connect(cluster, live, mid="nobody")
    # a hello seen on the wire, replayed on a connection of its own: its nonce is gone
    raw = socket.create_connection(("127.0.0.1", live.port))
    nonce = raw.recv(6 + dc.NONCE_BYTES)[6:]
    hello = (dc._CLIENT_HELLO.pack(dc.MAGIC, dc.VERSION, live.epoch, 9, len(LIVE),
                                   dc.proof(live.key, nonce, live.epoch, 9, LIVE))
             + LIVE.encode())
    raw.close()  # (sent nowhere: only seen)
    replay = socket.create_connection(("127.0.0.1", live.port))
    replay.recv(6 + dc.NONCE_BYTES)
    replay.sendall(hello)
    verdict = _closed_by_agent(replay)
    replay.close()
    assert verdict[:1] == b"\x01" and b"UNAUTHENTICATED: wrong key" in verdict
    _still_fine(cluster, before)
    log = (cluster["b"].dir / "agent.log").read_text()
    assert "data connection from 127.0.0.1" in log and "wrong key" in log


def test_a_trickle_is_cut_off_at_the_handshake_deadline(cluster, live):
    before = _memory(cluster)
    s = socket.create_connection(("127.0.0.1", live.port))
    s.recv(6 + dc.NONCE_BYTES)
    s.settimeout(1.0)
    started, closed = time.monotonic(), False
    for _ in range(int(dc.HANDSHAKE_S) + 5):  # one byte a second, bounded
        try:
            s.sendall(b"P")
            if s.recv(1) == b"":
                closed = True
                break
        except socket.timeout:
            continue
        except OSError:
            closed = True
            break
    s.close()
    assert closed and time.monotonic() - started < dc.HANDSHAKE_S + 4
    _still_fine(cluster, before)


def _bad_records():
    """Records a proven connection may send that must not land: each is bad."""
    n_frames = 256  # the incoming domain's
    limit = policy.MAX_BATCH_PAGES  # the destination's batch limit
    u32 = st.integers(0, (1 << 32) - 1)
    too_many = st.builds(lambda n, z: (wire.Header(wire.PAGES, n_frames=n, n_zero=z,
                                                   data_len=n * PAGE_SIZE), b""),
                         st.integers(limit + 1, 1 << 19), st.integers(0, 10))
    outside = st.builds(
        lambda fs, bad: (wire.Header(wire.PAGES, n_frames=len(fs) + 1,
                                     data_len=(len(fs) + 1) * PAGE_SIZE),
                         np.array([*fs, bad], "<u4").tobytes()),
        st.lists(st.integers(0, n_frames - 1), max_size=8), st.integers(n_frames, (1 << 32) - 1))
    zero_outside = st.builds(
        lambda bad: (wire.Header(wire.PAGES, n_zero=1), struct.pack("<I", bad)),
        st.integers(n_frames, (1 << 32) - 1))
    length = st.tuples(st.integers(1, 16), u32).filter(
        lambda nd: nd[1] != nd[0] * PAGE_SIZE).map(
        lambda nd: (wire.Header(wire.PAGES, n_frames=nd[0], data_len=nd[1]), b""))
    encoding = st.builds(lambda e: (wire.Header(wire.PAGES, encoding=e, n_frames=1,
                                                data_len=PAGE_SIZE), b""),
                         st.integers(2, 255))
    kind = st.builds(lambda t: (wire.Header(t), b""), st.integers(0, 255).filter(
        lambda t: t not in (wire.PAGES, wire.ROUND_END, wire.DEVICE_STATE, wire.END)))
    truncated = st.builds(lambda k: (None, wire.Header(wire.PAGES, n_frames=1,
                                                       data_len=PAGE_SIZE).pack()[:k]),
                          st.integers(1, wire.HEADER.size - 1))
    big_control = st.builds(lambda d: (wire.Header(wire.DEVICE_STATE, data_len=d), b""),
                            st.integers(wire.MAX_CONTROL + 1, (1 << 32) - 1))
    return st.one_of(too_many, outside, zero_outside, length, encoding, kind, truncated,
                     big_control)


def test_bad_records_on_a_proven_connection_land_nowhere(cluster, live):
    seen: dict = {}
    before = _memory(cluster)

    @FUZZ
    @given(_bad_records())
    def run(record):
        header, body = record
        with _dest(cluster) as ch:  # a new epoch each time: the slots are taken once
            chans = pb_grpc.MigrationDestStub(ch).OpenData(pb.MigrationRef(migration_id=LIVE),
                                                           timeout=30)
        conn = _connect(cluster, chans)
        try:
            conn.send([header.pack() if header is not None else b"", body])
            if header is None:  # a truncated header: the source goes away
                conn.sock.shutdown(socket.SHUT_WR)
            answer = _closed_by_agent(conn.sock)
        finally:
            conn.close()
        if answer:
            h = wire.Header.unpack(answer[:wire.HEADER.size])
            assert h.type == wire.ERROR
            text = answer[wire.HEADER.size:wire.HEADER.size + h.data_len].decode()
            assert text.split(":")[0] in ("INVALID_ARGUMENT", "DATA_LOSS"), text
            seen[text.split(":")[0]] = seen.get(text.split(":")[0], 0) + 1
        else:
            seen["closed"] = seen.get("closed", 0) + 1
    run()
    print(f"bad records: {seen}")
    assert seen.get("INVALID_ARGUMENT", 0) >= 20
    _still_fine(cluster, before)
    after = wait_running_and_checking(cluster["a"].address, VICTIM)
    assert after.guest.checks_failed == 0


def test_a_migration_that_ended_takes_no_connection(cluster):
    with _dest(cluster) as ch:
        stub = pb_grpc.MigrationDestStub(ch)
        stub.Prepare(pb.PrepareRequest(migration_id="data-fuzz-gone", domain="gone",
                                       ram_bytes=RAM, source_agent="a"), timeout=60)
        chans = stub.OpenData(pb.MigrationRef(migration_id="data-fuzz-gone"), timeout=30)
        stub.Abort(pb.MigrationRef(migration_id="data-fuzz-gone"), timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            stub.OpenData(pb.MigrationRef(migration_id="data-fuzz-gone"), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(errors.NotFound, match="no incoming migration 'data-fuzz-gone'"):
        _connect(cluster, chans, mid="data-fuzz-gone")
    for agent in (cluster["a"], cluster["b"]):
        assert agent.running
