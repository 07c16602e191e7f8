"""Differing frames placed, classified and explained (verify.py), and pages copied torn."""

from __future__ import annotations

import numpy as np
import pytest

from pvmig import errors
from pvmig._proto import pvmig_pb2 as pb
from pvmig.hv.foreign_writes import COPY_RACE, GRANT_MAP, POST_SUSPEND, XENSTORE_RING
from pvmig.hv.memory import PAGE_SIZE, GuestMemory
from pvmig.migration import pages
from pvmig.migration.verify import (
    by_area,
    chunks,
    classify,
    differing,
    load_causes,
    place,
    save_causes,
)

AREAS = [("xenstore", 1, 1), ("vbd0-ring", 10, 1), ("vbd0-buffers", 12, 4)]


def test_place_and_by_area():
    frames = np.array([1, 5, 10, 12, 15, 16])
    assert place(frames, AREAS).tolist() == [0, -1, 1, 2, 2, -1]
    assert by_area(frames, AREAS) == {"xenstore": 1, "vbd0-ring": 1, "vbd0-buffers": 2,
                                      "guest-only": 2}


def test_classes_and_causes():
    causes = np.zeros(32, np.uint8)
    causes[[1, 10, 12, 13, 14]] = [XENSTORE_RING, POST_SUSPEND, GRANT_MAP, COPY_RACE,
                                   COPY_RACE]
    v = classify(np.array([1, 10, 12, 13, 14, 20]), causes, AREAS, observed={12, 14})
    by_frame = {f["frame"]: (f["area"], f["class"], f["cause"]) for f in v["frames"]}
    assert by_frame == {1: ("xenstore", "undefined", "xenstore-ring"),
                        10: ("vbd0-ring", "undefined", "post-suspend-write"),
                        12: ("vbd0-buffers", "observed", "grant-map"),
                        13: ("vbd0-buffers", "torn", "copy-race"),
                        14: ("vbd0-buffers", "observed", "copy-race"),
                        20: ("guest-only", "lost", "unexplained")}
    assert v["by-class"] == {"undefined": 2, "observed": 2, "torn": 1, "lost": 1}
    assert v["by-cause"] == {"xenstore-ring": 1, "post-suspend-write": 1, "grant-map": 1,
                             "copy-race": 2, "unexplained": 1}


def test_without_causes_classes_still_come_from_areas():
    v = classify(np.array([10, 20]), None, AREAS)
    assert [(f["class"], f["cause"]) for f in v["frames"]] == [("undefined", "unknown"),
                                                               ("lost", "unknown")]
    assert v["by-cause"] == {}


def test_hash_chunks_carry_causes():
    hashes = np.arange(70000, dtype=np.uint64)
    causes = (np.arange(70000) % 3).astype(np.uint8)
    parts = list(chunks(hashes, causes))
    assert len(parts) == 2 and parts[1].first_frame == 1 << 16
    assert np.concatenate([np.frombuffer(p.causes, np.uint8) for p in parts]).tolist() \
        == causes.tolist()
    assert differing(hashes, hashes).tolist() == []
    assert differing(hashes, hashes[:5]) is None


def test_causes_beside_an_image(tmp_path):
    image = tmp_path / "x.ram"
    save_causes(np.array([0, 4, 1], np.uint8), image)
    assert load_causes(image, 3).tolist() == [0, 4, 1]
    assert load_causes(tmp_path / "other.ram", 3) is None
    with pytest.raises(errors.InvalidArgument, match="3 causes for 8 frames"):
        load_causes(image, 8)


def test_a_torn_copy_keeps_the_head_of_before_and_the_tail_of_after(tmp_path):
    mem = GuestMemory.create(tmp_path / "m.ram", 8)
    mem.pages[:] = 7
    head = mem.pages[5, :PAGE_SIZE // 2].copy()
    mem.pages[5] = 9  # the backend's write lands mid-copy
    out = pb.PageBatch()
    pages.pack(mem, np.arange(8, dtype=np.uint32), seq=0, round=1, out=out, torn=(5, head))
    sent = np.frombuffer(out.data, np.uint8).reshape(8, PAGE_SIZE)
    assert (sent[5, :PAGE_SIZE // 2] == 7).all() and (sent[5, PAGE_SIZE // 2:] == 9).all()
    assert (sent[4] == 7).all() and (mem.pages[5] == 9).all()
