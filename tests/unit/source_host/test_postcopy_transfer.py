"""Post-copy's transfer at the source (source_host/postcopy.py): every frame goes once
by the push or on request, the push follows the requests, and a frame a push batch
still carries goes again on the lane (counted)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from source_host.postcopy import Transfer

pytestmark = pytest.mark.timeout(60)


class _Mem:
    nr_frames = 1000


def _drain(t: Transfer) -> list[np.ndarray]:
    out = []
    while (b := t.next_batch()) is not None:
        out.append(b)
    return out


def test_the_push_sends_every_frame_to_come_once_in_order():
    frames = np.arange(0, 1000, 3, dtype=np.uint32)
    t = Transfer(_Mem(), frames, batch_pages=16)
    sent = np.concatenate(_drain(t))
    assert sent.tolist() == frames.tolist() and t.all_sent and t.pushed == len(frames)


def test_a_request_jumps_the_push_ahead_and_the_push_wraps_round():
    t = Transfer(_Mem(), np.arange(1000, dtype=np.uint32), batch_pages=10)
    assert t.next_batch().tolist() == list(range(10))
    assert t.take_requested(np.array([501, 500], np.uint32)).tolist() == [500, 501]
    rest = np.concatenate(_drain(t))
    assert rest[:3].tolist() == [502, 503, 504]  # on from just after the request
    assert sorted(rest.tolist() + list(range(10)) + [500, 501]) == list(range(1000))
    assert t.requested == 2 and t.resent == 0


def test_a_frame_asked_for_after_its_batch_left_goes_again_once():
    t = Transfer(_Mem(), np.arange(100, dtype=np.uint32), batch_pages=10)
    t.next_batch()  # frames 0..9 taken by a push batch (on their way)
    assert t.take_requested(np.array([3, 3, 50], np.uint32)).tolist() == [3, 50]
    assert t.resent == 1  # 3 goes twice: the lane's copy overtakes the batch's
    assert t.take_requested(np.array([3, 50], np.uint32)).tolist() == []  # asked again: no
    assert t.take_requested(np.array([999], np.uint32)).tolist() == []  # not one to come


def test_a_held_push_starts_with_the_first_request():
    t = Transfer(_Mem(), np.arange(10, dtype=np.uint32), batch_pages=4, push_after_fault=True)
    got = []
    pusher = threading.Thread(target=lambda: got.append(t.next_batch()))
    pusher.start()
    assert not t.push_may_start.is_set()
    t.take_requested(np.array([5], np.uint32))
    pusher.join(timeout=10)
    assert got[0].tolist() == [6, 7, 8, 9]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 199), max_size=20), max_size=30),
       st.integers(1, 32))
def test_every_frame_once_whatever_the_requests(requests, batch):
    frames = np.arange(0, 200, 2, dtype=np.uint32)
    t = Transfer(_Mem(), frames, batch_pages=batch)
    sent: list[int] = []
    for ask in requests:
        sent += t.take_requested(np.asarray(ask, np.uint32)).tolist()
        b = t.next_batch()
        sent += [] if b is None else b.tolist()
    for b in _drain(t):
        sent += b.tolist()
    # each frame to come at least once, only frames to come, and a frame twice only
    # when it was asked for after its push batch left
    assert set(sent) == set(frames.tolist())
    assert len(sent) - len(frames) == t.resent
    assert t.all_sent and t.pushed + t.requested - t.resent == len(frames)
