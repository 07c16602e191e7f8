"""The ceilings pvmig bench measures against (ceiling.py): raw TCP, TLS and a bare gRPC
stream, two real processes, real sockets, shared memory on both sides, every byte
checked."""

from __future__ import annotations

import pytest

from pvmig.tools import ceiling


@pytest.mark.parametrize("transport", ceiling.TRANSPORTS)
def test_the_ceiling_moves_every_byte(tmp_path, transport):
    # not a multiple of the 1 MiB chunk: the last chunk of each stream is short
    r = ceiling.measure((24 << 20) + 4096 * 3, 3, tmp_path, transport=transport)
    assert r["identical"] is True and r["bytes"] == (24 << 20) + 4096 * 3
    assert r["streams"] == 3 and r["transport"] == transport
    assert r["seconds"] > 0 and r["gib_per_s"] > 0
    assert not list(tmp_path.glob("ceiling.*"))  # both memories are gone


def test_an_unknown_transport_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown transport 'udp'"):
        ceiling.measure(4096, 1, tmp_path, transport="udp")


def test_spans_cover_the_bytes_once():
    spans = ceiling._spans(10, 4)
    assert spans == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert ceiling._spans(8, 1) == [(0, 8)]
