"""The save side of the data channels (transport tcp): one connection per stream.

Each stream has a thread of its own that does everything on its connection, in order:
it takes batches from the round's shared list, sends them from guest RAM
(pvmig.migration.wire), ends the round and reads the destination's answer. The event
loop only starts that work and waits for it, so the copies into the kernel run beside
the agent's loop and beside each other (sendmsg releases the GIL).

A batch whose checksum failed at the destination comes back with the round's answer
(see wire.py): the session decides what it means (save.SaveSession._settle).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pvmig import errors
from pvmig.hv.foreign_writes import TORN
from pvmig.migration import wire
from pvmig.rpc import data_channel

log = logging.getLogger(__name__)
ERROR_WAIT_S = 1.0  # after a failed send: how long to wait for the destination's reason
LANE_POLL_S = 0.02  # the urgent lane looks this often whether the push has finished


class Batches:
    """A round's frames in batches, shared by its streams: each batch goes on exactly one
    (a lock, as the streams' threads take from it at once)."""

    def __init__(self, frames: np.ndarray, size: int, first_seq: int) -> None:
        self._frames, self._size = frames, size
        self._lo, self.next_seq = 0, first_seq
        self._lock = threading.Lock()

    def take(self) -> tuple[int, np.ndarray] | None:
        with self._lock:
            if self._lo >= len(self._frames):
                return None
            lo, self._lo = self._lo, self._lo + self._size
            seq, self.next_seq = self.next_seq, self.next_seq + 1
        return seq, self._frames[lo:lo + self._size]

    def __iter__(self):
        while (batch := self.take()) is not None:
            yield batch


class Tally:
    """What a round sent, summed over its streams' threads."""

    def __init__(self) -> None:
        self.normal = self.zero = self.bytes = 0
        self._lock = threading.Lock()

    def add(self, normal: int, zero: int, nbytes: int) -> None:
        with self._lock:
            self.normal += normal
            self.zero += zero
            self.bytes += nbytes


@dataclass(frozen=True)
class Mismatch:
    """A batch whose checksum failed after it landed at the destination."""

    seq: int
    frames: np.ndarray
    tick: int  # the journal's tick when it was copied


@dataclass
class Source:
    """What a stream's thread reads and calls: the session's, handed over once a round."""

    domain: object  # its memory and dom0's journal of writes into it
    inject: object  # Injector
    loop: asyncio.AbstractEventLoop
    limit: object | None = None  # RateLimit
    corrupt_seq: int | None = None  # an injection point: this batch goes out damaged
    tally: Tally = field(default_factory=Tally)
    disk: object = None  # a storage round's disk (source_host.storage.SourceDisk)
    hold: object = None  # (storage-holds-halfway: called with each disk batch first)


class DataStream:
    def __init__(self, conn: data_channel.Connection, index: int, batch_pages: int) -> None:
        self.conn = conn
        self.index = index
        self.compressor = None  # a zstandard.ZstdCompressor, with migrate --compress zstd
        self.sent_in_round = 0
        self._scratch = wire.Scratch(batch_pages)
        self._in_round: dict[int, tuple[np.ndarray, int]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"data-{index}")
        self._pending: tuple[int, int] | None = None  # a final round end not yet answered

    @classmethod
    async def open(cls, host: str, port: int, *, migration_id: str, epoch: int, index: int,
                   key: bytes, tls, batch_pages: int) -> "DataStream":
        conn = await asyncio.to_thread(
            data_channel.connect, host, port, migration_id=migration_id, epoch=epoch,
            index=index, key=key, tls=tls)
        return cls(conn, index, batch_pages)

    async def _run(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except RuntimeError as e:  # (the pool was shut down: closed under us)
            raise errors.Unavailable(f"data connection closed: {e}") from None

    # ---- a round

    async def send(self, src: Source, batches: Batches, number: int) -> None:
        await self._run(self._send, src, batches, number)

    def _send(self, src: Source, batches: Batches, number: int) -> None:
        with self._failures():
            for seq, frames in batches:
                if self.conn.has_input():  # the destination's error, said early
                    self._expect(wire.ERROR)
                torn = None
                if src.inject.tearing:
                    torn = asyncio.run_coroutine_threadsafe(
                        src.inject.tear(src.domain, frames), src.loop).result()
                # Before the frames are read: a foreign write during the send is later
                # than the copy, whichever version of the page went out.
                tick = src.domain.journal.copy(frames)
                if torn is not None:
                    src.domain.journal.write(torn[0], TORN)
                sent = wire.send_pages(self.conn, src.domain.mem, frames, seq=seq, round=number,
                                       scratch=self._scratch, compressor=self.compressor,
                                       torn=torn, corrupt=seq == src.corrupt_seq)
                self._in_round[seq] = (frames, tick)
                self.sent_in_round += len(frames)
                src.tally.add(sent.normal, sent.zero, sent.wire_bytes)
                if src.limit is not None:
                    src.limit.take_blocking(sent.wire_bytes)

    async def send_blocks(self, src: Source, batches: Batches, number: int) -> None:
        await self._run(self._send_blocks, src, batches, number)

    def _send_blocks(self, src: Source, batches: Batches, number: int) -> None:
        disk = src.disk
        with self._failures():
            for seq, blocks in batches:
                if self.conn.has_input():  # the destination's error, said early
                    self._expect(wire.ERROR)
                if src.hold is not None:
                    src.hold(blocks, self.conn.has_input)
                sent = wire.send_blocks(self.conn, disk.view, blocks, disk.log.gens,
                                        device=disk.devid, seq=seq, round=number,
                                        scratch=self._scratch,
                                        corrupt=seq == src.corrupt_seq)
                self.sent_in_round += len(blocks)
                src.tally.add(sent.normal, sent.zero, sent.wire_bytes)
                if src.limit is not None:
                    src.limit.take_blocking(sent.wire_bytes)

    async def write_through(self, device: int, block: int, gen: int, data: bytes) -> wire.Sent:
        """One write-blocking write: returns once the destination's image holds it."""
        return await self._run(self._write_through, device, block, gen, data)

    def _write_through(self, device: int, block: int, gen: int, data: bytes) -> wire.Sent:
        rows = np.frombuffer(data, np.uint8).reshape(1, -1)
        with self._failures():
            sent = wire.send_block_rows(self.conn, wire.DISK_SYNC,
                                        np.array([block], np.uint32),
                                        np.array([gen], np.uint32), rows, device=device)
            wire.read_control_body(self.conn, self._expect(wire.ACK))
        return sent

    async def end_round(self, number: int, *, wait: bool = True) -> list[Mismatch]:
        """Mark the end of a round; with wait, return once the destination has it all
        (and what it found damaged). Without (the final pass), the answer is read
        after the stream's end (see end): one round trip less inside the downtime."""
        sent, self.sent_in_round = self.sent_in_round, 0
        await self._run(self._end_round, number, sent)
        if not wait:
            self._pending = (number, sent)
            return []
        return await self._run(self._answer, number, sent)

    def _end_round(self, number: int, sent: int) -> None:
        with self._failures():
            wire.send_control(self.conn, wire.ROUND_END, round=number, n_frames=sent)

    def _answer(self, number: int, sent: int) -> list[Mismatch]:
        with self._failures():
            h = self._expect(wire.ACK)
            body = wire.read_control_body(self.conn, h)
        if h.round != number or h.n_frames != sent:
            raise errors.DataLoss(f"round {number}: destination received {h.n_frames} "
                                  f"pages of {sent} (its answer for round {h.round})")
        seqs = np.frombuffer(body, "<u8")[:h.n_zero].tolist()
        in_round, self._in_round = self._in_round, {}
        try:
            return [Mismatch(s, *in_round[s]) for s in seqs]
        except KeyError as e:
            raise errors.DataLoss(f"round {number}: the destination names batch {e}, "
                                  "which this stream did not send in it") from None

    async def end(self, streams: int, device_state: bytes | None = None,
                  discard: np.ndarray | None = None) -> list[Mismatch]:
        """The device state (on the stream that carries it), the end of the stream, and
        the answers: the final round's, then the end's. discard (a switch to post-copy):
        the frames still to come (a mask), first."""
        return await self._run(self._end, streams, device_state, discard)

    def _end(self, streams: int, device_state: bytes | None,
             discard: np.ndarray | None = None) -> list[Mismatch]:
        with self._failures():
            if discard is not None:
                wire.send_bitmap(self.conn, wire.DISCARD, discard)
            if device_state is not None:
                wire.send_control(self.conn, wire.DEVICE_STATE, data=device_state)
            wire.send_control(self.conn, wire.END, n_frames=streams)
        mismatched = []
        if self._pending is not None:
            (number, sent), self._pending = self._pending, None
            mismatched = self._answer(number, sent)
        with self._failures():
            self._expect(wire.END_ACK)
        return mismatched

    # ---- post-copy (source_host.postcopy)

    async def push(self, t) -> None:
        """Send the transfer's frames until none are left, then end; the destination
        answers the end once it has them all."""
        await self._run(self._push, t)

    def _push(self, t) -> None:
        with self._failures():
            while (frames := t.next_batch()) is not None:
                if self.conn.has_input():  # the destination's error, said early
                    self._expect(wire.ERROR)
                self._send_transfer(t, frames, held=True)
            wire.send_control(self.conn, wire.END)
            self._expect(wire.END_ACK)

    async def read_missing(self, nr_frames: int):
        """A recovered epoch's urgent lane: first, the frames the destination lacks."""
        def read():
            with self._failures():
                return wire.read_frames(self.conn, self._expect(wire.MISSING), nr_frames)
        return await self._run(read)

    async def serve_requests(self, t) -> None:
        """The urgent lane: the destination's requests answered first, until it has
        every frame (its answer to this lane's end, sent once the push is done)."""
        await self._run(self._serve_requests, t)

    def _serve_requests(self, t) -> None:
        nr = t.mem.nr_frames
        ended = False
        with self._failures():
            while True:
                if not ended and t.all_sent:
                    wire.send_control(self.conn, wire.END)
                    ended = True
                if not self.conn.has_input(LANE_POLL_S):
                    continue
                h = wire.read_header(self.conn)
                if h.type == wire.END_ACK:
                    wire.read_control_body(self.conn, h)
                    return
                if h.type == wire.ERROR:
                    raise wire.error_of(wire.read_control_body(self.conn, h))
                if h.type != wire.REQUEST:
                    raise errors.InvalidArgument(
                        f"the destination sent a {wire.NAMES.get(h.type, h.type)} record on "
                        "the urgent lane")
                frames = t.take_requested(wire.read_frames(self.conn, h, nr))
                for lo in range(0, len(frames), self._scratch.batch_pages):
                    self._send_transfer(t, frames[lo:lo + self._scratch.batch_pages],
                                        held=False)

    def _send_transfer(self, t, frames: np.ndarray, held: bool) -> None:
        """Post-copy's pages, from a snapshot (the source's backends may write them as
        they go). held: the push waits on the bandwidth cap; the lane is only charged
        to it (a blocked guest does not queue behind the cap)."""
        sent = wire.send_pages(self.conn, t.mem, frames, seq=t.seq(), round=0,
                               scratch=self._scratch, snapshot=True)
        t.count_bytes(sent.wire_bytes)
        if t.limit is not None:
            (t.limit.take_blocking if held else t.limit.charge)(sent.wire_bytes)

    def _expect(self, kind: int) -> wire.Header:
        """The next record, of that kind; the destination's error raised as itself."""
        h = wire.read_header(self.conn)
        if h.type == wire.ERROR:
            raise wire.error_of(wire.read_control_body(self.conn, h))
        if h.type != kind:
            raise errors.InvalidArgument(f"the destination answered with a "
                                         f"{wire.NAMES.get(h.type, h.type)} record, not "
                                         f"{wire.NAMES[kind]}")
        return h

    @contextlib.contextmanager
    def _failures(self):
        """A broken connection, as the destination's own reason where it sent one."""
        try:
            yield
        except OSError as e:
            raise self._cause(e) from None

    def _cause(self, e: OSError) -> errors.PvmigError:
        try:
            h = wire.read_header(self.conn, deadline=time.monotonic() + ERROR_WAIT_S)
            if h.type == wire.ERROR:
                return wire.error_of(wire.read_control_body(self.conn, h))
        except (OSError, errors.PvmigError, ValueError):
            pass
        what = "closed" if isinstance(e, data_channel.Closed) else f"lost ({e})"
        return errors.Unavailable(f"data connection {self.index} to {self.conn.peer} {what}")

    async def close(self) -> None:
        """Wake the thread (a blocked send or read fails), wait for it, then close."""
        self.conn.shutdown()
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        self.conn.close()
