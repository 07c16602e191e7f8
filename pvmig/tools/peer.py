"""`pvmig peer`: a user of the guest's network service, from outside.

It sends numbered requests at a steady rate to the guest's address (netback's UDP port
on the guest's host) and counts the answers: a request unanswered after the
retransmission timeout is sent again, for up to `give_up_s` of tries, then counted
lost; an answer seen twice is a duplicate; the longest time between two new answers
is the outage the migration caused. An ANNOUNCE (the destination netback's gratuitous
ARP) moves the peer to the guest's new address. It sends for its duration, or (duration
0) until SIGINT or SIGTERM, or until it has been answered after `until_announced`
announcements (it followed the guest there and back, say); then it waits for what is
outstanding.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from pvmig import errors
from pvmig.pv import netproto
from pvmig.rpc.channel import parse_address


@dataclass
class PeerStats:
    sent: int = 0
    answered: int = 0
    lost: int = 0
    late: int = 0  # answered after it was counted lost (not counted answered too)
    duplicates: int = 0
    retransmits: int = 0
    announcements: int = 0
    longest_outage_ms: float = 0.0
    target: str = ""

    def to_dict(self) -> dict:
        return {"sent": self.sent, "answered": self.answered, "lost": self.lost,
                "late": self.late, "duplicates": self.duplicates,
                "retransmits": self.retransmits, "announcements": self.announcements,
                "longest-outage-ms": round(self.longest_outage_ms, 3), "target": self.target}


@dataclass
class Peer(asyncio.DatagramProtocol):
    target: tuple[str, int]
    rate: float = 200.0
    rto_s: float = 0.05
    max_tries: int = 40  # 2 s of retransmissions before a request counts as lost
    stats: PeerStats = field(default_factory=PeerStats)
    stopped: bool = False  # no new requests: what is outstanding is still waited for
    until_announced: int = 0  # stop once answered after this many announcements (0: never)
    _outstanding: dict = field(default_factory=dict)  # seq -> (last send, tries)
    _answered: set = field(default_factory=set)
    _lost: set = field(default_factory=set)
    _last_answer: float | None = None
    _transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self._transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        msg = netproto.decode(data)
        if msg is None:
            return
        kind, seq, _ = msg
        if kind == netproto.ANNOUNCE:
            self.target = (addr[0], addr[1])
            self.stats.announcements += 1
            return
        if kind != netproto.RESPONSE:
            return
        if seq in self._answered:
            self.stats.duplicates += 1
            return
        if seq in self._lost:  # given up on already: sent = answered + lost holds
            self._lost.discard(seq)
            self.stats.late += 1
            return
        self._answered.add(seq)
        self._outstanding.pop(seq, None)
        self.stats.answered += 1
        if self.until_announced and self.stats.announcements >= self.until_announced:
            self.stop()  # followed the guest that many times, and answered there
        now = time.monotonic()
        if self._last_answer is not None:
            gap_ms = (now - self._last_answer) * 1e3
            self.stats.longest_outage_ms = max(self.stats.longest_outage_ms, gap_ms)
        self._last_answer = now

    def _send(self, seq: int) -> None:
        self._transport.sendto(netproto.encode(netproto.REQUEST, seq), self.target)

    async def run(self, duration_s: float, stats_file: Path | None = None) -> PeerStats:
        loop = asyncio.get_running_loop()
        start = loop.time()
        seq = 0
        next_write = 0.0
        while True:
            now = loop.time()
            sending = not self.stopped and (not duration_s or now - start < duration_s)
            if not sending and not self._outstanding:
                break
            if sending:
                while seq < int((now - start) * self.rate) + 1:
                    seq += 1
                    self._outstanding[seq] = (now, 1)
                    self.stats.sent += 1
                    self._send(seq)
            self._retransmit(now)
            if stats_file is not None and now >= next_write:
                _write(stats_file, self.stats_now())
                next_write = now + 0.2
            await asyncio.sleep(0.005)
        if stats_file is not None:
            _write(stats_file, self.stats_now())
        return self.stats

    def stop(self) -> None:
        self.stopped = True

    def _retransmit(self, now: float) -> None:
        for seq, (last, tries) in list(self._outstanding.items()):
            if now - last < self.rto_s:
                continue
            if tries >= self.max_tries:
                del self._outstanding[seq]
                self._lost.add(seq)
                self.stats.lost += 1
                continue
            self._outstanding[seq] = (now, tries + 1)
            self.stats.retransmits += 1
            self._send(seq)

    def stats_now(self) -> dict:
        self.stats.target = f"{self.target[0]}:{self.target[1]}"
        return {**self.stats.to_dict(), "outstanding": len(self._outstanding)}


def answered(proc: subprocess.Popen, stats_file: Path, timeout_s: float) -> bool:
    """Wait until the peer process `proc` (`pvmig peer --stats stats_file`) has had its
    first answer; False if it has not within timeout_s, or exited. A migration begun
    before that (the peer still starting, on a loaded machine) would leave the peer
    talking to a host the guest has left, never having been seen by it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(stats_file.read_text()).get("answered", 0) > 0:
                return True
        except (OSError, ValueError):
            pass  # (not written yet)
        time.sleep(0.05)
    return False


def _write(path: Path, data: dict) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


async def run_peer(guest: str, *, rate: float, duration_s: float,
                   stats_file: Path | None, give_up_s: float = 2.0,
                   until_announced: int = 0) -> dict:
    host, port = parse_address(guest)
    loop = asyncio.get_running_loop()
    try:  # the vif's address may carry its host's name: datagrams need a number
        infos = await loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise errors.InvalidArgument(f"cannot resolve the guest's host {host!r}: {e}") from None
    host = infos[0][4][0]
    peer = Peer(target=(host, port), rate=rate, until_announced=until_announced)
    peer.max_tries = max(1, round(give_up_s / peer.rto_s))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, peer.stop)
    transport, _ = await loop.create_datagram_endpoint(lambda: peer, local_addr=("0.0.0.0", 0))
    try:
        await peer.run(duration_s, stats_file)
    finally:
        transport.close()
    return peer.stats_now()
