"""The xenstore wire protocol, its ring page and the guest's client (pvmig/pv/xenstore.py).

The client is tested here against a hand-driven server end of the ring, so that what
goes over the wire is pinned byte for byte; tests/unit/dom0/test_xenstored.py runs it against the
real daemon.
"""

from __future__ import annotations

import struct
import threading
import time

import numpy as np
import pytest

from pvmig.errors import InvalidArgument
from pvmig.pv.xenstore import (
    REQ_CONS,
    REQ_PROD,
    RSP_CONS,
    RSP_PROD,
    XENSTORE_PAYLOAD_MAX,
    Decoder,
    XenstoreError,
    XsClient,
    XsMessage,
    XsRing,
    XsType,
    encode,
    pack_strings,
)

pytestmark = pytest.mark.timeout(30)


def set_idx(page: np.ndarray, off: int, value: int) -> None:
    page[off:off + 4] = np.frombuffer(struct.pack("<I", value & 0xFFFFFFFF), np.uint8)


def get_idx(page: np.ndarray, off: int) -> int:
    return struct.unpack("<I", page[off:off + 4].tobytes())[0]


# ---- messages


def test_the_type_numbers_are_xs_wires():
    assert {t.name: int(t) for t in XsType} == {
        "DIRECTORY": 1, "READ": 2, "GET_PERMS": 3, "WATCH": 4, "UNWATCH": 5,
        "TRANSACTION_START": 6, "TRANSACTION_END": 7, "INTRODUCE": 8, "RELEASE": 9,
        "GET_DOMAIN_PATH": 10, "WRITE": 11, "MKDIR": 12, "RM": 13, "SET_PERMS": 14,
        "WATCH_EVENT": 15, "ERROR": 16, "IS_DOMAIN_INTRODUCED": 17, "RESUME": 18,
        "SET_TARGET": 19, "RESET_WATCHES": 21}


def test_header_layout_is_four_little_endian_u32_then_the_payload():
    msg = XsMessage.of(XsType.WATCH, "/a", "tok", req_id=0x01020304, tx_id=7)
    assert msg.payload == b"/a\0tok\0"
    assert encode(msg) == (b"\x04\0\0\0" b"\x04\x03\x02\x01" b"\x07\0\0\0" b"\x07\0\0\0"
                           b"/a\0tok\0")
    assert msg.strings() == ["/a", "tok"]


@pytest.mark.parametrize("payload", [b"", b"\0", b"x" * 100, bytes(range(256)) * 16,
                                     b"\xff" * XENSTORE_PAYLOAD_MAX])
@pytest.mark.parametrize("type_", list(XsType))
def test_encode_decode_round_trip(type_, payload):
    msg = XsMessage(type_, 0xFFFFFFFF, 12345, payload)
    data = encode(msg)
    assert len(data) == 16 + len(payload)
    assert list(Decoder().feed(data)) == [msg]


def test_encode_refuses_what_the_wire_cannot_carry():
    with pytest.raises(XenstoreError, match="payload of 4097 bytes exceeds 4096") as e:
        encode(XsMessage(XsType.WRITE, 1, 0, b"x" * 4097))
    assert e.value.err == "E2BIG"
    assert isinstance(e.value, InvalidArgument)
    with pytest.raises(XenstoreError, match="unknown message type 20"):
        encode(XsMessage(20, 1, 0, b""))  # type: ignore[arg-type]
    with pytest.raises(XenstoreError, match="not a u32"):
        encode(XsMessage(XsType.READ, 2**32, 0, b""))


def test_strings_are_lossless_for_any_byte():
    msg = XsMessage.of(XsType.WATCH_EVENT, "/x", "t\xff\u00e9")
    assert XsMessage(msg.type, 0, 0, msg.payload).strings() == ["/x", "t\xff\u00e9"]
    odd = XsMessage(XsType.WATCH_EVENT, 0, 0, b"/x\0\xfe\0")
    assert pack_strings(*odd.strings()) == odd.payload


# ---- the decoder


MESSAGES = [
    XsMessage.of(XsType.READ, "/local/domain/3/device/vbd/768/state", req_id=1),
    XsMessage(XsType.WRITE, 2, 5, b"/a/b\0" + bytes(range(40))),
    XsMessage(XsType.TRANSACTION_START, 3, 0, b""),  # an empty payload
    XsMessage.of(XsType.WATCH_EVENT, "/x", "token"),
]
STREAM = b"".join(encode(m) for m in MESSAGES)


def test_decoder_reassembles_messages_split_at_every_byte():
    for cut in range(len(STREAM) + 1):
        d = Decoder()
        got = list(d.feed(STREAM[:cut])) + list(d.feed(STREAM[cut:]))
        assert got == MESSAGES, cut
        assert d.buffered == 0


def test_decoder_reassembles_messages_split_at_every_pair_of_bytes():
    for i in range(0, len(STREAM) + 1, 3):
        for j in range(i, len(STREAM) + 1):
            d = Decoder()
            got = [*d.feed(STREAM[:i]), *d.feed(STREAM[i:j]), *d.feed(STREAM[j:])]
            assert got == MESSAGES, (i, j)


def test_decoder_byte_by_byte():
    d = Decoder()
    got = []
    for b in STREAM:
        got += d.feed(bytes([b]))
    assert got == MESSAGES


def test_decoder_refuses_an_unknown_type_and_goes_on_after_it():
    bad = struct.pack("<IIII", 99, 42, 7, 3) + b"abc"
    d = Decoder()
    it = d.feed(encode(MESSAGES[0]) + bad + encode(MESSAGES[1]))
    assert next(it) == MESSAGES[0]
    with pytest.raises(XenstoreError, match="unknown message type 99 \\(req_id 42\\)") as e:
        next(it)
    assert e.value.header == (99, 42, 7) and e.value.err == "EINVAL"
    assert list(d.feed()) == [MESSAGES[1]]  # the stream is still in step


def test_decoder_waits_for_the_whole_of_an_unknown_message_before_refusing_it():
    bad = struct.pack("<IIII", 0, 1, 0, 10) + b"0123456789"
    d = Decoder()
    assert list(d.feed(bad[:20])) == []
    with pytest.raises(XenstoreError, match="unknown message type 0"):
        list(d.feed(bad[20:]))
    assert d.buffered == 0


def test_decoder_refuses_an_oversized_length_for_good():
    d = Decoder()
    with pytest.raises(XenstoreError, match="length 4097 exceeds 4096") as e:
        list(d.feed(struct.pack("<IIII", 2, 1, 0, 4097)))
    assert e.value.header is None and e.value.err == "EIO"
    with pytest.raises(XenstoreError, match="the stream is lost"):
        list(d.feed(encode(MESSAGES[0])))


# ---- the ring


def make_ring(on_write=None) -> tuple[np.ndarray, XsRing]:
    page = np.zeros(4096, np.uint8)
    return page, XsRing(page, on_write=on_write)


def test_ring_needs_one_page_of_bytes():
    with pytest.raises(InvalidArgument, match="contiguous page of 4096 u8"):
        XsRing(np.zeros(4096, np.uint16))
    with pytest.raises(InvalidArgument, match="contiguous page of 4096 u8"):
        XsRing(np.zeros(2048, np.uint8))


def test_ring_requests_and_responses_land_at_xs_wire_offsets():
    page, ring = make_ring()
    assert ring.write_request(b"hello") == 5
    assert page[0:5].tobytes() == b"hello"
    assert get_idx(page, REQ_PROD) == 5 and get_idx(page, REQ_CONS) == 0
    assert ring.requests_pending() == 5
    assert ring.read_request(3) == b"hel"
    assert get_idx(page, REQ_CONS) == 3
    assert ring.read_request() == b"lo"
    assert ring.read_request() == b""

    assert ring.write_response(b"world!") == 6
    assert page[1024:1030].tobytes() == b"world!"
    assert get_idx(page, RSP_PROD) == 6
    assert ring.read_response() == b"world!"
    assert get_idx(page, RSP_CONS) == 6
    ring.server_features = 1
    ring.connection = 0
    assert get_idx(page, 2064) == 1 and ring.server_features == 1


@pytest.mark.parametrize("start", [2**32 - 5, 2**32 - 1024, 2**32 - 1, 1020, 1023])
def test_ring_wraps_around_the_page_and_the_u32(start):
    page, ring = make_ring()
    for off in (REQ_CONS, REQ_PROD):
        set_idx(page, off, start)
    data = bytes(range(256)) * 4  # a full ring: always crosses the 1024-byte end
    assert ring.write_request(data) == 1024
    assert get_idx(page, REQ_PROD) == (start + 1024) & 0xFFFFFFFF
    pos = start & 1023
    assert page[pos:1024].tobytes() == data[:1024 - pos]  # up to the end...
    assert page[0:pos].tobytes() == data[1024 - pos:]     # ...and on from the start
    assert ring.write_request(b"more") == 0                # full
    got = ring.read_request(100) + ring.read_request()
    assert got == data
    assert get_idx(page, REQ_CONS) == (start + 1024) & 0xFFFFFFFF


def test_ring_writes_partially_when_full_and_never_overruns_the_consumer():
    page, ring = make_ring()
    assert ring.write_response(b"a" * 1500) == 1024
    assert ring.write_response(b"b") == 0
    assert ring.read_response(100) == b"a" * 100
    assert ring.write_response(b"c" * 300) == 100
    assert ring.responses_pending() == 1024
    assert ring.read_response(5000) == b"a" * 924 + b"c" * 100
    assert ring.responses_pending() == 0


def test_ring_stores_data_before_moving_the_index():
    page, ring = None, None
    calls: list[tuple[int, int, int]] = []  # (offset, length, req_prod seen at the call)

    def on_write(off: int, n: int) -> None:
        calls.append((off, n, get_idx(page, REQ_PROD)))

    page, ring = make_ring(on_write)
    set_idx(page, REQ_PROD, 1000)
    set_idx(page, REQ_CONS, 1000)
    assert ring.write_request(b"x" * 50) == 50
    # two data stores (the write wraps at 1024), each made while the index was old,
    # then the index, last
    assert calls == [(1000, 24, 1000), (0, 26, 1000), (REQ_PROD, 4, 1050)]
    calls.clear()
    ring.read_response()  # nothing there: no store
    assert calls == []


def test_ring_consumer_stores_only_its_index():
    page, ring = make_ring()
    ring.write_response(b"abcdef")
    calls = []
    guest = XsRing(page, on_write=lambda off, n: calls.append((off, n)))
    assert guest.read_response() == b"abcdef"
    assert calls == [(RSP_CONS, 4)]


@pytest.mark.parametrize("method,cons,prod", [
    ("read_request", REQ_CONS, REQ_PROD), ("write_request", REQ_CONS, REQ_PROD),
    ("read_response", RSP_CONS, RSP_PROD), ("write_response", RSP_CONS, RSP_PROD)])
def test_ring_detects_a_broken_peer(method, cons, prod):
    page, ring = make_ring()
    set_idx(page, cons, 10)
    set_idx(page, prod, 10 + 1025)
    arg = b"x" if method.startswith("write") else 10
    with pytest.raises(XenstoreError, match="ring is corrupt: prod 1035 is 1025 bytes ahead"):
        getattr(ring, method)(arg)
    set_idx(page, prod, 5)  # behind the consumer: as bad (2**32 - 5 ahead)
    with pytest.raises(XenstoreError, match="ring is corrupt"):
        getattr(ring, method)(arg)


# ---- the client, against a hand-driven server end


class FakeServer:
    """The server end of a ring, driven by hand."""

    def __init__(self, page: np.ndarray) -> None:
        self.ring = XsRing(page)
        self.decoder = Decoder()
        self.received: list[XsMessage] = []

    def take(self) -> list[XsMessage]:
        while data := self.ring.read_request():
            self.received += self.decoder.feed(data)
        got, self.received = self.received, []
        return got

    def send(self, *msgs: XsMessage) -> None:
        data = b"".join(encode(m) for m in msgs)
        assert self.ring.write_response(data) == len(data)


def make_client(answer=None, **kw) -> tuple[XsClient, FakeServer, list[str]]:
    """A client whose `wait` runs `answer(server)` (the other end) once per wait."""
    page = np.zeros(4096, np.uint8)
    server = FakeServer(page)
    trace: list[str] = []
    client = XsClient(XsRing(page), lambda: trace.append("notify"),
                      wait=(lambda t: answer(server)) if answer else None, **kw)
    return client, server, trace


def ok_to_everything(server: FakeServer) -> None:
    for m in server.take():
        server.send(XsMessage.of(m.type, "OK", req_id=m.req_id, tx_id=m.tx_id))


def test_client_sends_requests_with_increasing_ids_and_matches_replies():
    def answer(server: FakeServer) -> None:
        for m in server.take():
            if m.type == XsType.READ:
                # an unrelated reply first, then a watch event, then the reply, split
                data = (encode(XsMessage.of(XsType.READ, "stale", req_id=999))
                        + encode(XsMessage.of(XsType.WATCH_EVENT, "/w", "tk"))
                        + encode(XsMessage(XsType.READ, m.req_id, 0, b"value")))
                server.ring.write_response(data)
            else:
                server.send(XsMessage.of(m.type, "OK", req_id=m.req_id))
            answered.append(m)

    answered: list[XsMessage] = []
    client, server, trace = make_client(answer)
    client.write("/a", b"v\0x")
    assert client.read("/a") == b"value"
    assert [(m.type, m.req_id, m.payload) for m in answered] == [
        (XsType.WRITE, 1, b"/a\0v\0x"), (XsType.READ, 2, b"/a\0")]
    assert client.pop_watch_events() == [("/w", "tk")]
    assert client.pop_watch_events() == []
    assert "notify" in trace


def test_client_raises_the_error_string():
    def answer(server: FakeServer) -> None:
        for m in server.take():
            server.send(XsMessage.of(XsType.ERROR, "ENOENT", req_id=m.req_id))

    client, _, _ = make_client(answer)
    with pytest.raises(XenstoreError, match="xenstore READ /nope: ENOENT") as e:
        client.read("/nope")
    assert e.value.err == "ENOENT"


def test_client_times_out_without_a_server():
    client, _, _ = make_client(timeout=0.2, poll_interval=0.02)
    t0 = time.monotonic()
    with pytest.raises(XenstoreError, match="no reply to request 1 after 0.2 s") as e:
        client.read("/a")
    assert e.value.err == "ETIMEDOUT"
    assert 0.15 < time.monotonic() - t0 < 2


def test_client_sends_a_request_larger_than_the_ring_in_pieces():
    value = bytes(range(256)) * 15  # 3840 bytes: more than the 1024-byte ring

    def answer(server: FakeServer) -> None:
        for m in server.take():
            got.append(m)
            server.send(XsMessage.of(m.type, "OK", req_id=m.req_id))

    got: list[XsMessage] = []
    client, _, _ = make_client(answer)
    client.write("/big", value)
    assert got[0].payload == b"/big\0" + value


def test_client_transactions_carry_their_id():
    def answer(server: FakeServer) -> None:
        for m in server.take():
            seen.append(m)
            if m.type == XsType.TRANSACTION_START:
                server.send(XsMessage.of(m.type, "17", req_id=m.req_id))
            elif m.type == XsType.TRANSACTION_END:
                server.send(XsMessage.of(XsType.ERROR, "EAGAIN", req_id=m.req_id,
                                         tx_id=m.tx_id))
            else:
                server.send(XsMessage.of(m.type, "OK", req_id=m.req_id, tx_id=m.tx_id))

    seen: list[XsMessage] = []
    client, _, _ = make_client(answer)
    tx = client.transaction_start()
    assert tx == 17
    client.write("/a", "1", tx=tx)
    with pytest.raises(XenstoreError) as e:
        client.transaction_end(tx, commit=True)
    assert e.value.err == "EAGAIN"
    assert [(m.type, m.tx_id, m.payload) for m in seen] == [
        (XsType.TRANSACTION_START, 0, b"\0"), (XsType.WRITE, 17, b"/a\x001"),
        (XsType.TRANSACTION_END, 17, b"T\0")]


def test_suspend_blocks_new_requests_until_resume():
    client, server, _ = make_client(ok_to_everything, poll_interval=0.01)
    client.suspend()
    with pytest.raises(XenstoreError, match="blocked while suspended") as e:
        client.write("/a", "x")  # the suspending thread itself: refused at once
    assert e.value.err == "EBUSY"
    done = threading.Event()

    def other() -> None:
        client.write("/b", "y")
        done.set()

    t = threading.Thread(target=other)
    t.start()
    time.sleep(0.1)
    assert not done.is_set() and server.take() == []  # nothing went out
    client.resume()
    t.join(5)
    assert done.is_set()


def test_suspend_waits_for_the_request_in_flight():
    release = threading.Event()

    def answer(server: FakeServer) -> None:
        if release.is_set():
            ok_to_everything(server)

    client, _, _ = make_client(answer, poll_interval=0.01)
    finished = []
    t = threading.Thread(target=lambda: (client.write("/a", "1"), finished.append(1)))
    t.start()
    deadline = time.monotonic() + 5
    while not client._inflight and time.monotonic() < deadline:  # the write is out
        time.sleep(0.005)
    with pytest.raises(XenstoreError, match="requests still in flight"):
        client.suspend(timeout=0.1)
    threading.Timer(0.1, release.set).start()
    client.suspend(timeout=5)  # returns once the write has its reply
    assert finished == [1]
    t.join(5)
    client.resume()


def test_resume_drops_stale_responses_and_registers_every_watch_again():
    def answer(server: FakeServer) -> None:
        for m in server.take():
            seen.append(m)
            server.send(XsMessage.of(m.type, "OK", req_id=m.req_id))

    seen: list[XsMessage] = []
    client, server, _ = make_client(answer)
    client.watch("/a", "t1")
    client.watch("device", "t2")
    client.suspend()
    # what the old host's xenstored left in the ring: half a message and an event
    server.send(XsMessage.of(XsType.WATCH_EVENT, "/a", "t1"))
    server.ring.write_response(encode(XsMessage.of(XsType.READ, "x", req_id=5))[:7])
    seen.clear()
    client.resume()
    assert [(m.type, m.payload) for m in seen] == [
        (XsType.WATCH, b"/a\0t1\0"), (XsType.WATCH, b"device\0t2\0")]
    assert client.pop_watch_events() == []  # the stale event went with the ring
    assert client.watches == [("/a", "t1"), ("device", "t2")]
