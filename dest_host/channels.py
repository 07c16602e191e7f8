"""The restore side of the data channels (transport tcp).

A migration's data channels come in epochs. OpenData starts one: a new key, every
connection of the earlier epochs closed and its thread off guest RAM before the answer
goes back, so that nothing a broken connection still carried can land over what the new
ones send (the gRPC streams need a generation per frame for that: pages.newer).

Each connection, once it proved the key, is read by its own thread (the data server's,
pvmig.agent.data_server) until the source closes it: page records land in guest RAM
there and then (pvmig.migration.wire.Receiver); the rest (device state, end) are the
session's, run on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import dataclass, field

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig.hv.memory import PAGE_SIZE
from pvmig.migration import policy, wire
from pvmig.rpc import data_channel

log = logging.getLogger(__name__)
LOOP_WAIT_S = 30.0  # for the event loop to take a control record (it is never that busy)
MAX_BATCH_PAGES = policy.MAX_BATCH_PAGES


def on_loop(loop: asyncio.AbstractEventLoop, fn, *args):
    """fn(*args) run on the event loop, from a data connection's thread: its result, or
    its exception raised here."""
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # handed to the thread that asked
            fut.set_exception(e)
    loop.call_soon_threadsafe(run)
    return fut.result(LOOP_WAIT_S)


@dataclass
class Epoch:
    number: int = 0
    key: bytes | None = None
    postcopy: bool = False  # after the switch: connection 0 is the urgent lane
    recovered: bool = False  # post-copy after a pause: the lane begins with MISSING
    claimed: set = field(default_factory=set)
    # index -> (connection, done: set when its thread is off the memory)
    conns: dict = field(default_factory=dict)


class DataChannels:
    """One incoming migration's data channels (RestoreSession.data)."""

    def __init__(self, session, loop: asyncio.AbstractEventLoop) -> None:
        self.session = session
        self.loop = loop
        self.epoch = Epoch()

    # ---- on the event loop

    async def open(self, endpoint: tuple[str, int, bool], postcopy: bool = False,
                   recovered: bool = False) -> pb.DataChannels:
        host, port, tls = endpoint
        await self.close()
        self.epoch = Epoch(self.epoch.number + 1, data_channel.new_key(), postcopy, recovered)
        return pb.DataChannels(host=host, port=port, key=self.epoch.key,
                               epoch=self.epoch.number, tls=tls,
                               max_batch_bytes=MAX_BATCH_PAGES * PAGE_SIZE)

    async def close(self) -> None:
        """Every connection closed and its thread done with guest RAM; the key void."""
        old = list(self.epoch.conns.values())
        self.epoch = Epoch(self.epoch.number)
        for conn, _ in old:
            conn.shutdown()
        if old:
            await asyncio.gather(*(asyncio.wrap_future(done) for _, done in old))

    def claim(self, hello: data_channel.Hello, conn: data_channel.Connection
              ) -> concurrent.futures.Future:
        """A connection's claim to a slot of the current epoch, checked."""
        ep = self.epoch
        if ep.key is None or hello.epoch != ep.number:
            raise errors.FailedPrecondition(
                f"epoch {hello.epoch} of migration {hello.migration_id} is over (its data "
                f"channels are at epoch {ep.number}): a new OpenData gives a new key")
        if not hello.proves(ep.key):
            raise errors.Unauthenticated(f"wrong key for migration {hello.migration_id}")
        if hello.index >= policy.MAX_STREAMS or hello.index in ep.claimed:
            raise errors.InvalidArgument(f"data connection {hello.index} of epoch {ep.number} "
                                         "is taken, or out of range")
        ep.claimed.add(hello.index)
        done: concurrent.futures.Future = concurrent.futures.Future()
        ep.conns[hello.index] = (conn, done)
        # An open connection holds the session, as an open gRPC stream does: a long
        # round with no call from the coordinator is no lost coordinator.
        hold = self.session.lease.hold()
        hold.__enter__()
        done.add_done_callback(
            lambda _: self.loop.call_soon_threadsafe(hold.__exit__, None, None, None))
        return done

    # ---- in a connection's thread

    def receive(self, conn: data_channel.Connection, index: int) -> None:
        """Read records until the source closes the connection. A bad record raises
        (the data server answers it with an error record and closes)."""
        s = self.session
        mem = s.domain.mem
        if self.epoch.postcopy:
            return self._receive_postcopy(conn, index, self.epoch.recovered)
        receiver = wire.Receiver(mem, MAX_BATCH_PAGES)
        received = s.host.metrics.received
        round_pages: dict[int, int] = {}
        damaged: dict[int, list[int]] = {}
        ended = False
        while True:
            try:
                h = wire.read_header(conn)
            except data_channel.Closed:
                if not ended:
                    log.info("migration %s: a data connection closed before its end",
                             s.migration_id)
                return
            s._check_open()
            if ended:
                if s.switched:  # post-copy's first record on this connection
                    return self._receive_postcopy(conn, index, recovered=False, first=h)
                raise errors.InvalidArgument("record after the end of the stream")
            if h.type == wire.PAGES:
                received.labels("memory").inc(wire.HEADER.size + 4 * (h.n_frames + h.n_zero)
                                              + h.data_len)
                got = receiver.receive(conn, h)
                round_pages[h.round] = round_pages.get(h.round, 0) + got.pages
                if not got.ok:
                    damaged.setdefault(h.round, []).append(h.seq)
                s.received(got.landed)
            elif h.type in (wire.DISK, wire.DISK_SYNC):
                if s.storage is None:
                    raise errors.InvalidArgument(f"migration {s.migration_id} copies no "
                                                 "storage: disk records refused")
                if s.ended:  # (the guest may run here from now on: its own writes rule)
                    raise errors.InvalidArgument("disk record after the end of the stream")
                received.labels("disk").inc(wire.HEADER.size + 8 * (h.n_frames + h.n_zero)
                                            + h.data_len)
                got = s.storage.receive(conn, h, receiver.buf)  # (its buffer, free here)
                if h.type == wire.DISK_SYNC:  # a write-blocking write: held now
                    wire.send_control(conn, wire.ACK, n_frames=got)
                else:
                    round_pages[h.round] = round_pages.get(h.round, 0) + got
                s.received_blocks()
            elif h.type == wire.ROUND_END:
                wire.read_control_body(conn, h)
                wire.send_ack(conn, h.round, round_pages.pop(h.round, 0),
                              damaged.pop(h.round, []))
            elif h.type == wire.DEVICE_STATE:
                state = pb.DeviceState()
                try:
                    state.ParseFromString(wire.read_control_body(conn, h))
                except Exception as e:  # protobuf's DecodeError, by any name
                    raise errors.InvalidArgument(f"device state unreadable: {e}") from None
                on_loop(self.loop, s.on_device_state, None, state)
            elif h.type == wire.DISCARD:
                to_come = wire.read_bitmap(conn, h, mem.nr_frames)
                asyncio.run_coroutine_threadsafe(s.on_discard(to_come), self.loop
                                                 ).result(LOOP_WAIT_S)
            elif h.type == wire.END:
                wire.read_control_body(conn, h)
                on_loop(self.loop, s.end_stream, h.n_frames)
                ended = True
                wire.send_control(conn, wire.END_ACK)
                if s.switched and index == 0:
                    # it carried the switch: it goes on as post-copy's urgent lane (the
                    # others as its push connections, with their next record)
                    return self._receive_postcopy(conn, index, recovered=False)
            else:
                raise errors.InvalidArgument(f"unknown record type {h.type}")

    def _receive_postcopy(self, conn: data_channel.Connection, index: int,
                          recovered: bool, first: wire.Header | None = None) -> None:
        """After the switch: pages placed as they come (the guest runs); connection 0
        is the urgent lane, on which the faults' requests go back. Each connection's
        END is answered once every frame is here (the source then completes). A
        connection that ends before its END pauses the paging (a recovery goes on)."""
        s = self.session
        paging = s.paging
        receiver = wire.Receiver(s.domain.mem, MAX_BATCH_PAGES, place=paging.place)
        ended = False
        try:
            if index == 0:
                paging.set_lane(conn, recovered)
            while True:
                try:
                    h, first = first or wire.read_header(conn), None
                except data_channel.Closed:
                    if not ended:
                        paging.pause(f"data connection {index} closed before its end")
                    return
                s._check_open()
                if h.type == wire.PAGES:
                    s.host.metrics.received.labels("memory").inc(
                        wire.HEADER.size + 4 * (h.n_frames + h.n_zero) + h.data_len)
                    receiver.receive(conn, h)
                elif h.type == wire.END:
                    wire.read_control_body(conn, h)
                    paging.wait_all(policy.POSTCOPY_END_S)
                    on_loop(self.loop, s.postcopy_done)
                    wire.send_control(conn, wire.END_ACK)
                    ended = True
                else:
                    raise errors.InvalidArgument(f"{wire.NAMES.get(h.type, h.type)} record "
                                                 "on a post-copy data connection")
        except (OSError, errors.PvmigError) as e:
            paging.pause(f"data connection {index} lost ({e})")
            raise

