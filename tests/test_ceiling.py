"""The raw-TCP ceiling pvmig bench measures against (ceiling.py): two real processes,
real sockets, shared memory on both sides, every byte checked."""

from __future__ import annotations

from pvmig import ceiling


def test_the_ceiling_moves_every_byte(tmp_path):
    r = ceiling.measure(24 << 20, 3, tmp_path)
    assert r["identical"] is True and r["bytes"] == 24 << 20 and r["streams"] == 3
    assert r["seconds"] > 0 and r["gib_per_s"] > 0
    assert not list(tmp_path.glob("ceiling.*"))  # both memories are gone


def test_spans_cover_the_bytes_once():
    spans = ceiling._spans(10, 4)
    assert spans == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert ceiling._spans(8, 1) == [(0, 8)]
