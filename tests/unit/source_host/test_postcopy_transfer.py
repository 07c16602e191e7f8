"""Post-copy's transfer at the source (source_host/postcopy.py): every frame goes once
by the push or on request, the push follows the requests, and a frame a push batch
still carries goes again on the lane (counted); after a pause, what the destination
still lacks goes again, and a held push lets go when its epoch ends."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvmig import errors
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
    pusher.join(timeout=0.2)
    assert pusher.is_alive() and not got  # held
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


def test_after_a_pause_what_the_destination_lacks_goes_again():
    t = Transfer(_Mem(), np.arange(100, dtype=np.uint32), batch_pages=10)
    t.begin_epoch()
    first = t.next_batch()  # 0..9 left; a broken connection lost 5..9
    t.take_requested(np.array([50], np.uint32))
    t.end_epoch("data connection 1 lost")
    assert t.paused and t.progress().paused_reason == "data connection 1 lost"
    t.begin_epoch()
    t.recover(np.array([*range(5, 10), *range(10, 50), *range(51, 100)], np.uint32))
    assert not t.paused and t.lost == 5 and t.left == 94
    rest = np.concatenate(_drain(t)).tolist()
    assert sorted(rest) == [f for f in range(5, 100) if f != 50]
    assert first[:5].tolist() == [0, 1, 2, 3, 4]  # those arrived: not again
    p = t.progress()
    assert p.recoveries == 1 and p.lost_pages == 5 and p.paused_ns > 0 and not p.paused


def test_a_frame_asked_for_again_after_a_pause_goes_again():
    t = Transfer(_Mem(), np.arange(100, dtype=np.uint32), batch_pages=10)
    t.begin_epoch()
    assert t.take_requested(np.array([7], np.uint32)).tolist() == [7]  # lost on the lane
    t.end_epoch("lane lost")
    t.begin_epoch()
    t.recover(np.arange(100, dtype=np.uint32))
    assert t.take_requested(np.array([7], np.uint32)).tolist() == [7]


@pytest.mark.parametrize("hold", [{"push_after_fault": True}, {"halfway": "stop"}])
def test_a_held_push_lets_go_when_its_epoch_ends(hold):
    t = Transfer(_Mem(), np.arange(100, dtype=np.uint32), batch_pages=10, **hold)
    t.begin_epoch()
    if hold.get("halfway"):
        for _ in range(5):
            t.next_batch()
    raised = []

    def push():
        try:
            t.next_batch()
        except errors.Unavailable as e:
            raised.append(e)
    pusher = threading.Thread(target=push)
    pusher.start()
    pusher.join(timeout=0.2)
    assert pusher.is_alive()  # held
    t.end_epoch("the link dropped")
    pusher.join(timeout=10)
    assert raised and not pusher.is_alive()


def test_breaks_halfway_fails_the_first_epoch_only():
    t = Transfer(_Mem(), np.arange(100, dtype=np.uint32), batch_pages=10, halfway="break")
    t.begin_epoch()
    for _ in range(5):
        t.next_batch()
    with pytest.raises(errors.Unavailable, match="injected"):
        t.next_batch()
    t.end_epoch("injected")
    t.begin_epoch()
    t.recover(np.arange(50, 100, dtype=np.uint32))
    assert np.concatenate(_drain(t)).tolist() == list(range(50, 100))


def test_frames_pushed_last_come_after_every_other_unless_asked_for():
    t = Transfer(_Mem(), np.arange(100, dtype=np.uint32), batch_pages=16,
                 last=np.arange(10, 20, dtype=np.uint32))
    assert t.take_requested(np.array([12], np.uint32)).tolist() == [12]  # asked: at once
    order = np.concatenate(_drain(t)).tolist()
    assert sorted(order) == [f for f in range(100) if f != 12]
    assert order[-9:] == [10, 11, *range(13, 20)]
