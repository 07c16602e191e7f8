"""Records on a data channel (transport tcp): a fixed 36-byte header, then its body.

    type u8 | encoding u8 | device u16 | round u32 | seq u64 |
    n_frames u32 | n_zero u32 | data_len u32 | checksum u64

PAGES          n_frames u32 frame numbers, n_zero u32 zero-page numbers (nothing else
               is sent for those), then data_len bytes of page data (encoding 0: the
               pages; 1: them zstd-compressed). checksum: xxh3-64 over the header (its
               checksum field 0) and the body.
ROUND_END      n_frames: the pages this connection carried in the round.
DEVICE_STATE   data_len bytes: the DeviceState message (proto, as on the gRPC stream).
END            n_frames: how many connections the migration has.
DISCARD        n_frames: the domain's frames; a bitmap of them, bit i (LSB first) for
               frame i (post-copy's switch): these come later; any copy the
               destination holds of them is stale. (A bitmap: 32 KiB for 1 GiB, where
               a list of every frame was 1 MiB and its handling ms of the downtime.)
REQUEST (back) n_frames u32 frame numbers (post-copy's urgent lane): send these first.
MISSING (back) n_frames u32 frame numbers: the first record of a recovered post-copy's
               urgent lane, every frame the destination still lacks (QEMU's
               recv bitmap): what a broken connection carried and lost goes again.
DISK           (migrate --copy-storage) blocks of disk `device` (its devid):
               n_frames u32 block numbers, n_zero u32 zero-block numbers, a u32
               generation for each of them (in that order), then the blocks' data
               (raw). Counted in the round as pages are. The destination keeps a block
               only if it is not older than the copy it holds.
DISK_SYNC      as DISK, one write-blocking write: answered at once by an ACK
               (n_frames: blocks held) once the destination's image has it.
ACK (back)     a round end's answer: n_frames pages received, n_zero seqs of batches
               whose checksum failed after they landed, as u64 in the body.
END_ACK (back) the end is in.
ERROR (back)   data_len bytes: "CODE: message"; the connection closes after it.

The same meaning as PageStream's records (pvmig.migration.pages), with no protobuf
between guest RAM and the socket: a run of frames goes from the source's mapping to
the socket (sendmsg over views of guest RAM; scattered frames are gathered once), and
from the socket into the destination's guest RAM (recv_into a view; scattered frames
into one reusable buffer, then scattered). Frame numbers are checked against the
domain before a byte of data is read.

The source's pages may change while they are sent (the guest runs): a checksum taken
over guest RAM then need not match what left. The destination reports such batches
instead of failing on them, and the source decides (source_host.save: _settle): frames
written since they were copied go again; a batch nothing wrote is corrupt, and the
migration aborts before anything at the destination runs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import xxhash

from pvmig import errors
from pvmig.hv.memory import PAGE_SIZE, GuestMemory, is_run, runs, zero_rows
from pvmig.migration.pages import zstd_decode
from pvmig.rpc.data_channel import Closed, Connection

HEADER = struct.Struct("<BBHIQIIIQ")
(PAGES, ROUND_END, DEVICE_STATE, END, ACK, END_ACK, ERROR, DISCARD, REQUEST,
 MISSING, DISK, DISK_SYNC) = range(1, 13)
NAMES = {PAGES: "pages", ROUND_END: "round end", DEVICE_STATE: "device state", END: "end",
         ACK: "ack", END_ACK: "end ack", ERROR: "error", DISCARD: "discard",
         REQUEST: "request", MISSING: "missing", DISK: "disk", DISK_SYNC: "disk sync"}
RAW, ZSTD = 0, 1
MAX_PARTS = 32  # runs sent as views of guest RAM at most; more are gathered
MAX_CONTROL = 16 << 20  # a device state or an error message
_U32 = np.dtype("<u4")
_U64 = np.dtype("<u8")


@dataclass
class Header:
    type: int
    encoding: int = RAW
    round: int = 0
    seq: int = 0
    n_frames: int = 0
    n_zero: int = 0
    data_len: int = 0
    checksum: int = 0
    device: int = 0  # DISK, DISK_SYNC: the disk's devid

    def pack(self, checksum: int | None = None) -> bytes:
        return HEADER.pack(self.type, self.encoding, self.device, self.round, self.seq,
                           self.n_frames, self.n_zero, self.data_len,
                           self.checksum if checksum is None else checksum)

    @classmethod
    def unpack(cls, raw) -> "Header":
        t, enc, dev, rnd, seq, n, z, length, csum = HEADER.unpack(raw)
        return cls(t, enc, rnd, seq, n, z, length, csum, dev)


def checksum(header: Header, parts) -> int:
    h = xxhash.xxh3_64(header.pack(checksum=0))
    for part in parts:
        h.update(part)
    return h.intdigest()


# ---- the source's side

@dataclass
class Sent:
    normal: int
    zero: int
    wire_bytes: int


@dataclass
class Scratch:
    """A connection's reusable buffers: batch_pages rows each, made once."""

    batch_pages: int
    gather: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.gather = np.empty((self.batch_pages, PAGE_SIZE), np.uint8)


def send_pages(conn: Connection, mem: GuestMemory, frames: np.ndarray, *, seq: int,
               round: int, scratch: Scratch, compressor=None,
               torn: tuple[int, np.ndarray] | None = None, corrupt: bool = False,
               snapshot: bool = False) -> Sent:
    """One PAGES record of `frames` (at most scratch.batch_pages), straight from guest RAM.

    torn (an injection point): (frame, head) as in pages.pack. corrupt (an injection
    point): the checksum sent is off by one, as a batch damaged on the way. snapshot:
    gathered into the scratch buffer first, checksum and send from that copy (post-copy:
    dom0 may write the suspended guest's frames as they go, and no later round would
    send them again)."""
    pages = mem.pages
    n = len(frames)
    if is_run(frames) and not snapshot:
        first = int(frames[0])
        rows, gathered = pages[first:first + n], False
    else:
        rows, gathered = np.take(pages, frames, axis=0, out=scratch.gather[:n]), True
    if torn is not None:
        frame, head = torn
        if not gathered:
            rows, gathered = np.copyto(scratch.gather[:n], rows) or scratch.gather[:n], True
        rows[frames == frame, :len(head)] = head
    zero = zero_rows(rows)
    if zero.any():
        keep = ~zero
        zero_frames, frames = frames[zero], frames[keep]
        if gathered:
            parts = [rows[keep]] if len(frames) else []
        else:
            parts = _views(pages, frames, scratch)
    else:
        zero_frames = frames[:0]
        parts = [rows]
    fbytes = frames.astype(_U32).tobytes()
    zbytes = zero_frames.astype(_U32).tobytes()
    encoding = RAW
    if compressor is not None and parts:
        packed = compressor.compress(parts[0] if len(parts) == 1 else b"".join(
            memoryview(p).cast("B") for p in parts))
        if len(packed) < len(frames) * PAGE_SIZE:
            parts, encoding = [packed], ZSTD
    data_len = sum(memoryview(p).nbytes for p in parts)
    header = Header(PAGES, encoding, round, seq, len(frames), len(zero_frames), data_len)
    body = [fbytes, zbytes, *parts]
    csum = checksum(header, body)
    header.checksum = csum ^ 1 if corrupt else csum
    conn.send([header.pack(), *body])
    return Sent(len(frames), len(zero_frames), HEADER.size + len(fbytes) + len(zbytes) + data_len)


def _views(pages: np.ndarray, frames: np.ndarray, scratch: Scratch) -> list:
    """The rows of `frames`: a view per run while there are few runs, else one gather."""
    if not len(frames):
        return []
    starts, lengths = runs(frames)
    if len(starts) <= MAX_PARTS:
        return [pages[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist())]
    return [np.take(pages, frames, axis=0, out=scratch.gather[:len(frames)])]


def send_blocks(conn: Connection, image: np.ndarray, blocks: np.ndarray, gens: np.ndarray, *,
                device: int, seq: int, round: int, scratch: Scratch,
                corrupt: bool = False) -> Sent:
    """One DISK record of `blocks` (at most scratch.batch_pages) of a disk image (its
    (blocks, 4096) view), with their generations. The generations are read first, then
    the blocks gathered into the scratch buffer, and the checksum and the send are of
    that copy: blkback may write the image meanwhile (the block goes again; its copy
    here is not older than the generation sent with it). corrupt (an injection point):
    the checksum sent is off by one."""
    gen = gens[blocks]  # (a copy, before the data)
    rows = np.take(image, blocks, axis=0, out=scratch.gather[:len(blocks)])
    return send_block_rows(conn, DISK, blocks, gen, rows, device=device, seq=seq, round=round,
                           corrupt=corrupt)


def send_block_rows(conn: Connection, type: int, blocks: np.ndarray, gens: np.ndarray,
                    rows: np.ndarray, *, device: int, seq: int = 0, round: int = 0,
                    corrupt: bool = False) -> Sent:
    """A DISK or DISK_SYNC record of these blocks' rows (zero rows as numbers only)."""
    zero = zero_rows(rows)
    keep = ~zero
    blocks, zero_blocks = blocks[keep], blocks[zero]
    gens = np.concatenate((gens[keep], gens[zero])).astype(_U32)
    parts = [rows[keep]] if zero.any() and len(blocks) else ([rows] if len(blocks) else [])
    fbytes, zbytes = blocks.astype(_U32).tobytes(), zero_blocks.astype(_U32).tobytes()
    data_len = len(blocks) * PAGE_SIZE
    header = Header(type, RAW, round, seq, len(blocks), len(zero_blocks), data_len,
                    device=device)
    body = [fbytes, zbytes, gens.tobytes(), *parts]
    header.checksum = checksum(header, body) ^ int(corrupt)
    conn.send([header.pack(), *body])
    return Sent(len(blocks), len(zero_blocks),
                HEADER.size + len(fbytes) + len(zbytes) + 4 * len(gens) + data_len)


def read_blocks(conn: Connection, h: Header, buf: np.ndarray, nr_blocks: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A DISK or DISK_SYNC record's (blocks, zero blocks, generations, rows), checked
    against the disk's size before its data is read, and against its checksum after
    (the source sends a copy: a mismatch is damage on the way)."""
    n = h.n_frames + h.n_zero
    if n > len(buf) or h.encoding != RAW or h.data_len != h.n_frames * PAGE_SIZE:
        raise errors.InvalidArgument(
            f"disk batch {h.seq}: {h.n_frames} blocks and {h.n_zero} zero blocks in "
            f"{h.data_len} bytes (encoding {h.encoding}; at most {len(buf)} blocks, raw)")
    lists = np.empty(2 * n, _U32)
    conn.recv_into(lists)
    if n and int(lists[:n].max()) >= nr_blocks:
        raise errors.InvalidArgument(f"disk batch {h.seq}: block {int(lists[:n].max())} is "
                                     f"outside disk {h.device} ({nr_blocks} blocks)")
    rows = buf[:h.n_frames]
    conn.recv_into(rows)
    blocks, zero, gens = lists[:h.n_frames], lists[h.n_frames:n], lists[n:]
    if checksum(h, [blocks, zero, gens, rows]) != h.checksum:
        raise errors.DataLoss(f"disk {h.device} batch {h.seq}: checksum mismatch (the "
                              "source sends a copy: damaged on the way)")
    return blocks, zero, gens, rows


def send_control(conn: Connection, type: int, *, round: int = 0, n_frames: int = 0,
                 data: bytes = b"") -> None:
    header = Header(type, round=round, n_frames=n_frames, data_len=len(data))
    header.checksum = checksum(header, [data])
    conn.send([header.pack(), data] if data else [header.pack()])


def send_bitmap(conn: Connection, type: int, mask: np.ndarray) -> None:
    """A DISCARD record: one bit per frame of the domain."""
    send_control(conn, type, n_frames=len(mask),
                 data=np.packbits(mask, bitorder="little").tobytes())


def read_bitmap(conn: Connection, header: Header, nr_frames: int) -> np.ndarray:
    """The bool mask of a DISCARD record, checked against the domain."""
    if header.n_frames != nr_frames or header.data_len != (nr_frames + 7) // 8:
        raise errors.InvalidArgument(
            f"{NAMES[header.type]} record: a bitmap of {header.n_frames} frames in "
            f"{header.data_len} bytes, for a domain of {nr_frames} frames")
    bits = np.frombuffer(read_control_body(conn, header), np.uint8)
    return np.unpackbits(bits, count=nr_frames, bitorder="little").view(bool)


def send_frames(conn: Connection, type: int, frames: np.ndarray) -> None:
    """A REQUEST or MISSING record: a list of frame numbers."""
    send_control(conn, type, n_frames=len(frames), data=frames.astype(_U32).tobytes())


def read_frames(conn: Connection, header: Header, nr_frames: int) -> np.ndarray:
    """The frame list of a REQUEST or MISSING record, checked against the domain."""
    if header.data_len != header.n_frames * _U32.itemsize:
        raise errors.InvalidArgument(f"{NAMES[header.type]} record: {header.data_len} bytes "
                                     f"for {header.n_frames} frames")
    frames = np.frombuffer(read_control_body(conn, header), _U32)
    if len(frames) and int(frames.max()) >= nr_frames:
        raise errors.InvalidArgument(f"{NAMES[header.type]} record: frame {int(frames.max())} "
                                     f"is outside the domain ({nr_frames} frames)")
    return frames


def send_ack(conn: Connection, round: int, pages: int, mismatched: list[int]) -> None:
    body = np.asarray(mismatched, _U64).tobytes()
    header = Header(ACK, round=round, n_frames=pages, n_zero=len(mismatched),
                    data_len=len(body))
    header.checksum = checksum(header, [body])
    conn.send([header.pack(), body])


def send_error(conn: Connection, error: errors.PvmigError) -> None:
    send_control(conn, ERROR, data=f"{error.code}: {error}".encode()[:MAX_CONTROL])


def read_header(conn: Connection, deadline: float | None = None) -> Header:
    raw = bytearray(HEADER.size)
    conn.recv_into(raw, deadline)
    return Header.unpack(raw)


def read_control_body(conn: Connection, header: Header) -> bytes:
    if header.data_len > MAX_CONTROL:
        raise errors.InvalidArgument(f"{NAMES.get(header.type, header.type)} record of "
                                     f"{header.data_len} bytes (at most {MAX_CONTROL})")
    data = bytearray(header.data_len)
    conn.recv_into(data)
    if checksum(header, [data]) != header.checksum:
        raise errors.DataLoss(f"{NAMES.get(header.type, header.type)} record: checksum mismatch")
    return bytes(data)


def error_of(data: bytes) -> errors.PvmigError:
    code, _, message = data.decode(errors="replace").partition(": ")
    return errors.BY_CODE.get(code, errors.Unavailable)(message)


# ---- the destination's side

@dataclass
class Received:
    pages: int  # normal and zero
    landed: np.ndarray  # frames written (normal and zero)
    ok: bool  # the checksum matched


class Receiver:
    """One connection's reading of PAGES records into a domain's memory.

    place (post-copy, once the guest runs): nothing is written through this agent's
    mapping; a batch is read into the buffer and handed over as place(frames, rows,
    zero_frames), which puts each page in atomically (pvmig.hv.userfault)."""

    def __init__(self, mem: GuestMemory, batch_pages: int, place=None) -> None:
        self.mem = mem
        self.batch_pages = batch_pages
        self.buf = np.empty((batch_pages, PAGE_SIZE), np.uint8)
        self.place = place

    def check(self, h: Header) -> None:
        """Before anything of the body is read."""
        if h.n_frames + h.n_zero > self.batch_pages:
            raise errors.InvalidArgument(
                f"batch {h.seq}: {h.n_frames + h.n_zero} pages, more than the batch limit "
                f"of {self.batch_pages}")
        if h.encoding == RAW:
            if h.data_len != h.n_frames * PAGE_SIZE:
                raise errors.InvalidArgument(
                    f"batch {h.seq}: {h.data_len} bytes of data for {h.n_frames} frames")
        elif h.encoding == ZSTD:
            if not 0 < h.data_len <= self.batch_pages * PAGE_SIZE or not h.n_frames:
                raise errors.InvalidArgument(
                    f"batch {h.seq}: {h.data_len} bytes of zstd data for {h.n_frames} frames")
        else:
            raise errors.InvalidArgument(f"batch {h.seq}: unknown encoding {h.encoding} "
                                         f"(this agent reads {RAW}: raw and {ZSTD}: zstd)")

    def receive(self, conn: Connection, h: Header) -> Received:
        self.check(h)
        lists = np.empty(h.n_frames + h.n_zero, _U32)
        conn.recv_into(lists)
        frames, zero = lists[:h.n_frames], lists[h.n_frames:]
        nr = self.mem.nr_frames
        if len(lists) and int(lists.max()) >= nr:
            raise errors.InvalidArgument(
                f"batch {h.seq}: frame {int(lists.max())} is outside the domain ({nr} frames)")
        pages = self.mem.pages
        n = len(frames)
        if self.place is None and h.encoding == RAW and is_run(frames):  # straight into place
            first = int(frames[0])
            target = pages[first:first + n]
            conn.recv_into(target)
            ok = checksum(h, [frames, zero, target]) == h.checksum
            pages[zero] = 0
            return Received(n + len(zero), lists, ok)
        rows, ok = self._read_buffered(conn, h, frames, zero)
        if self.place is not None:
            if not ok:  # the guest runs: nothing damaged goes in (the source is suspended,
                # so a mismatch here is damage on the way, never a race with a write)
                raise errors.DataLoss(f"batch {h.seq}: checksum mismatch in post-copy")
            self.place(frames, rows, zero)
            return Received(n + len(zero), lists, True)
        if rows is None:  # nothing decoded from a damaged batch; it landed nowhere
            return Received(n + len(zero), lists[:0], False)
        pages[frames] = rows
        pages[zero] = 0
        return Received(n + len(zero), lists, ok)

    def _read_buffered(self, conn: Connection, h: Header, frames: np.ndarray,
                       zero: np.ndarray) -> tuple[np.ndarray | None, bool]:
        """The batch's pages read into the buffer (decoded, with zstd), and whether its
        checksum matched; no pages for zstd data that failed it (nothing is decoded)."""
        n = len(frames)
        if h.encoding == RAW:
            rows = self.buf[:n]
            conn.recv_into(rows)
            return rows, checksum(h, [frames, zero, rows]) == h.checksum
        raw = self.buf.reshape(-1)[:h.data_len]
        conn.recv_into(raw)
        if checksum(h, [frames, zero, raw]) != h.checksum:
            return None, False
        data = self._decompress(h, bytes(raw), n)
        return np.frombuffer(data, np.uint8).reshape(n, PAGE_SIZE), True

    def _decompress(self, h: Header, data: bytes, n: int) -> bytes:
        size = n * PAGE_SIZE
        out = zstd_decode(h.seq, data, size)
        if len(out) != size:
            raise errors.InvalidArgument(
                f"batch {h.seq}: {len(out)} bytes of data for {n} frames")
        return out


__all__ = ["Closed", "Header", "Receiver", "Scratch", "Sent", "send_pages", "send_blocks",
           "send_block_rows", "read_blocks", "send_control",
           "send_frames", "read_frames", "send_ack", "send_error", "read_header",
           "read_control_body", "error_of"]
