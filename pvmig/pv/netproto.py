"""The guest's network service, on the wire: what the net peer and the guest exchange
(as UDP payloads bridged by netback), and netback's announcement after a move.

A request carries a sequence number; the guest answers each with a response of the
same number. The peer retransmits a request that gets no answer; both ends count
loss, duplicates and the longest gap. ANNOUNCE is the gratuitous-ARP step: the
destination's netback tells the peers it knows that the guest now lives at the
announcement's source address.
"""

from __future__ import annotations

import struct

MAGIC = 0x70766E74  # "pvnt"
REQUEST, RESPONSE, ANNOUNCE = 1, 2, 3
HEADER = struct.Struct("<IBxxxQ")  # magic, type, seq
MAX_PACKET = 1400


def encode(kind: int, seq: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, kind, seq) + payload


def decode(data: bytes) -> tuple[int, int, bytes] | None:
    """(type, seq, payload), or None for anything that is not ours."""
    if len(data) < HEADER.size:
        return None
    magic, kind, seq = HEADER.unpack_from(data)
    if magic != MAGIC or kind not in (REQUEST, RESPONSE, ANNOUNCE):
        return None
    return kind, seq, data[HEADER.size:]
