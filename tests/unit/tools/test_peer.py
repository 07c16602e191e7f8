"""The net peer's accounting (pvmig.tools.peer), fed datagrams by hand: no network, no
clock but the one the test passes."""

from __future__ import annotations

from pvmig.pv import netproto
from pvmig.tools.peer import Peer


class _Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple]] = []

    def sendto(self, data: bytes, addr: tuple) -> None:
        self.sent.append((data, addr))


def _peer(**kw) -> tuple[Peer, _Transport]:
    peer = Peer(target=("127.0.0.1", 9), **kw)
    transport = _Transport()
    peer.connection_made(transport)
    return peer, transport


def _ask(peer: Peer, seq: int, now: float) -> None:
    peer._outstanding[seq] = (now, 1)
    peer.stats.sent += 1
    peer._send(seq)


def _answer(peer: Peer, seq: int, addr=("127.0.0.1", 9)) -> None:
    peer.datagram_received(netproto.encode(netproto.RESPONSE, seq), addr)


def test_every_request_is_answered_lost_or_outstanding_never_two_of_them():
    peer, transport = _peer(max_tries=3)
    for seq in (1, 2, 3):
        _ask(peer, seq, now=0.0)
    _answer(peer, 1)
    _answer(peer, 1)  # a duplicate
    for now in (0.1, 0.2, 0.3):
        peer._retransmit(now)  # 2 and 3 are sent again, then given up
    assert peer.stats.lost == 2 and peer.stats.retransmits == 4
    _answer(peer, 2)  # late: counted lost already, not answered as well
    s = peer.stats_now()
    assert (s["answered"], s["lost"], s["late"], s["duplicates"]) == (1, 2, 1, 1)
    assert s["answered"] + s["lost"] + s["outstanding"] == s["sent"] == 3
    assert len(transport.sent) == 3 + 4


def test_it_follows_the_announcement_and_stops_once_answered_there():
    peer, transport = _peer(until_announced=1)
    _ask(peer, 1, now=0.0)
    peer.datagram_received(netproto.encode(netproto.ANNOUNCE, 0), ("127.0.0.2", 7))
    assert peer.target == ("127.0.0.2", 7) and not peer.stopped
    _ask(peer, 2, now=0.0)
    assert transport.sent[-1][1] == ("127.0.0.2", 7)  # requests go where the guest is
    _answer(peer, 2, ("127.0.0.2", 7))
    assert peer.stopped and peer.stats.announcements == 1
    assert peer.stats_now()["target"] == "127.0.0.2:7"
