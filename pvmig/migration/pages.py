"""Page batches: how frames travel on the migration stream.

A batch is about 1 MiB: the pages' bytes in one field, their frame numbers packed as
little-endian u32, all-zero pages as their number only, and an xxh3-64 over the lot. The
sender gathers and the receiver scatters with numpy, straight between the shared RAM
files and the message, never a Python loop per page.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import xxhash

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig.hv.memory import PAGE_SIZE, GuestMemory, is_run, zero_rows

ZSTD = "zstd"  # a batch's encoding (policy.Compression.ZSTD compresses each batch)
_FRAME = np.dtype("<u4")


_HEADER = struct.Struct("<QIII")


def checksum(seq: int, round: int, frames: bytes, zero_frames: bytes, data: bytes,
             encoding: str = "") -> int:
    """xxh3-64 over the batch's header (sequence, round, field lengths, encoding) and its
    fields, so that neither a field boundary nor the batch's place in the stream can
    shift. xxh3 runs at tens of GiB/s here, crc32 at about 2: a third of a round."""
    h = xxhash.xxh3_64(_HEADER.pack(seq, round, len(frames), len(zero_frames)))
    for part in (encoding.encode(), frames, zero_frames, data):
        h.update(part)
    return h.intdigest()


@dataclass(frozen=True)
class Packed:
    normal: int
    zero: int
    wire_bytes: int


def pack(mem: GuestMemory, frames: np.ndarray, *, seq: int, round: int,
         out: pb.PageBatch, torn: tuple[int, np.ndarray] | None = None,
         compressor=None) -> Packed:
    """Copy `frames` out of guest memory into the batch `out` (in place: a batch built
    apart and then set into its record would be copied whole once more).

    compressor: a zstandard.ZstdCompressor; the data travels compressed when that makes
    it smaller (random pages do not shrink: they go as they are).

    torn (an injection point): (frame, head), the head of that frame as the copy found
    it before a write landed in the middle of the copy."""
    block = _rows(mem.pages, frames)
    if torn is not None:
        frame, head = torn
        block = block.copy()  # never into guest memory itself
        block[frames == frame, :len(head)] = head
    zero = zero_rows(block)
    if zero.any():
        zero_frames, frames, block = frames[zero], frames[~zero], block[~zero]
    else:
        zero_frames = frames[:0]
    fbytes = frames.astype(_FRAME).tobytes()
    zbytes = zero_frames.astype(_FRAME).tobytes()
    data = block.tobytes()
    encoding = ""
    if compressor is not None and data:
        packed = compressor.compress(data)
        if len(packed) < len(data):
            data, encoding = packed, ZSTD
    out.seq, out.round, out.frames, out.zero_frames, out.data = seq, round, fbytes, zbytes, data
    out.encoding = encoding
    out.checksum = checksum(seq, round, fbytes, zbytes, data, encoding)
    return Packed(len(frames), len(zero_frames), len(fbytes) + len(zbytes) + len(data))


@dataclass(frozen=True)
class Unpacked:
    frames: np.ndarray
    zero_frames: np.ndarray
    data: np.ndarray  # (len(frames), PAGE_SIZE) uint8, a view of the message

    @property
    def pages(self) -> int:
        return len(self.frames) + len(self.zero_frames)


def unpack(batch: pb.PageBatch, nr_frames: int) -> Unpacked:
    """Check a received batch against a domain of `nr_frames`; raise before any write."""
    # each read of a bytes field is a copy of it (upb): one of each, used throughout
    fbytes, zbytes, data = batch.frames, batch.zero_frames, batch.data
    if len(fbytes) % 4 or len(zbytes) % 4:
        raise errors.InvalidArgument(f"batch {batch.seq}: frame list is not a whole number of u32")
    frames = np.frombuffer(fbytes, dtype=_FRAME)
    zero = np.frombuffer(zbytes, dtype=_FRAME)
    if checksum(batch.seq, batch.round, fbytes, zbytes, data, batch.encoding) != batch.checksum:
        raise errors.DataLoss(f"batch {batch.seq}: checksum mismatch")
    data = _decode(batch, data, len(frames) * PAGE_SIZE)
    if len(data) != len(frames) * PAGE_SIZE:
        raise errors.InvalidArgument(
            f"batch {batch.seq}: {len(data)} bytes of data for {len(frames)} frames")
    for name, arr in (("frame", frames), ("zero frame", zero)):
        if len(arr) and int(arr.max()) >= nr_frames:
            raise errors.InvalidArgument(
                f"batch {batch.seq}: {name} {int(arr.max())} is outside the domain "
                f"({nr_frames} frames)")
    data = np.frombuffer(data, dtype=np.uint8).reshape(len(frames), PAGE_SIZE)
    return Unpacked(frames, zero, data)


def _decode(batch: pb.PageBatch, data: bytes, size: int) -> bytes:
    if batch.encoding == "":
        return data
    if batch.encoding != ZSTD:
        raise errors.InvalidArgument(
            f"batch {batch.seq}: unknown encoding {batch.encoding!r} (this agent reads "
            f"'' and {ZSTD!r})")
    return zstd_decode(batch.seq, data, size)


def zstd_decode(seq: int, data: bytes, size: int) -> bytes:
    """A batch's zstd data, at most `size` bytes of pages (both transports)."""
    import zstandard  # (only with migrate --compress zstd)
    try:
        # max_output_size holds only for frames that do not state their size: a frame
        # that claims more than the batch can hold is refused before anything is made
        claimed = zstandard.frame_content_size(data)
        if claimed > size:
            raise errors.InvalidArgument(f"batch {seq}: zstd data claims {claimed} "
                                         f"bytes for {size // PAGE_SIZE} frames")
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as e:
        raise errors.InvalidArgument(f"batch {seq}: bad zstd data: {e}") from None


def newer(batch: Unpacked, applied: np.ndarray, generation: int) -> Unpacked:
    """The batch without the frames whose copy in memory is of a later generation (a
    round) than this batch's: `applied` holds each frame's generation."""
    stale = applied[batch.frames] > generation
    stale_zero = applied[batch.zero_frames] > generation
    if not stale.any() and not stale_zero.any():
        return batch
    keep = ~stale
    return Unpacked(batch.frames[keep], batch.zero_frames[~stale_zero], batch.data[keep])


def apply(mem: GuestMemory, batch: Unpacked) -> None:
    if is_run(batch.frames):  # one memcpy
        first = int(batch.frames[0])
        mem.pages[first:first + len(batch.frames)] = batch.data
    else:
        mem.pages[batch.frames] = batch.data
    mem.pages[batch.zero_frames] = 0


def _rows(pages: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """The frames' pages: a view of guest memory for a run (its bytes are copied once,
    into the message), a gathered copy otherwise."""
    if is_run(frames):
        first = int(frames[0])
        return pages[first:first + len(frames)]
    return pages[frames]
