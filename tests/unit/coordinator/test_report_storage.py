"""The report's storage section (pvmig/coordinator/report.py): the disks' rounds, a
memory round's blocks counted apart from its pages, the verdict on the two images, and
what to_dict says of them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pvmig._proto import pvmig_pb2 as pb
from pvmig.coordinator.report import Report
from pvmig.hv.memory import PAGE_SIZE
from pvmig.migration.precopy import RoundStats

pytestmark = pytest.mark.timeout(30)

DEVICES = [SimpleNamespace(kind="vbd", devid=0, disk="a.img", blocks=256),
           SimpleNamespace(kind="vif", devid=0, disk="", blocks=0),
           SimpleNamespace(kind="vbd", devid=1, disk="/srv/b.img", blocks=768)]
SIZE = (256 + 768) * PAGE_SIZE


def _report(**kw) -> Report:
    return Report("m-1", "dom", "a", "b", **kw)


def _passing(r: Report) -> Report:
    """Everything but storage verified: the guest ran, memory identical."""
    r.memory = "identical"
    r.guest = {"failed": 0, "sweeps": 3}
    return r


def _blocks(round, dirty, sent, zero, remaining=0, **kw) -> pb.RoundStats:
    return pb.RoundStats(round=round, dirty_blocks=dirty, sent_blocks=sent, zero_blocks=zero,
                         block_bytes=sent * PAGE_SIZE + 8 * (sent + zero),
                         remaining_blocks=remaining, **kw)


def test_start_storage_lists_the_disks_and_starts_from_nothing():
    r = _report()
    s = r.start_storage("write-blocking", DEVICES)
    assert s is r.storage
    assert s["mode"] == "write-blocking"
    assert s["disks"] == [{"devid": 0, "disk": "a.img", "size-bytes": 256 * PAGE_SIZE},
                          {"devid": 1, "disk": "/srv/b.img", "size-bytes": 768 * PAGE_SIZE}]
    assert s["size-bytes"] == SIZE
    assert (s["bytes"], s["blocks-sent"], s["rounds"], s["storage-rounds"]) == (0, 0, 0, [])
    assert s["verdict"] is None and s["final-blocks"] is None


def test_storage_rounds_are_listed_and_summed():
    r = _report()
    r.start_storage("background", DEVICES)
    first = _blocks(0, 1024, 900, 124, remaining=40, duration_ns=200_000_000)
    r.add_storage_round(first, started_ms=10.0)
    second = _blocks(1, 40, 40, 0, remaining=3, duration_ns=5_000_000,
                     interrupted="connection reset")
    r.add_storage_round(second, started_ms=215.0)
    rounds = r.storage["storage-rounds"]
    assert rounds[0] == {"round": 0, "storage": True, "pages": 1024, "blocks": 1024,
                         "normal-blocks": 900, "zero-blocks": 124,
                         "bytes": first.block_bytes, "remaining": 40,
                         "duration-ms": 200.0, "started-ms": 10.0}
    assert "interrupted" not in rounds[0]
    assert rounds[1]["interrupted"] == "connection reset" and rounds[1]["duration-ms"] == 5.0
    s = r.storage
    assert s["bytes"] == first.block_bytes + second.block_bytes
    assert s["blocks-sent"] == 1024 + 40
    assert s["rounds"] == 2
    assert s["dirty-blocks-after-first"] == 40  # the first's blocks are the whole disk
    assert r.rounds == [] and r.transferred_bytes == 0  # memory's rounds only


def test_a_storage_round_with_nothing_to_send_is_not_counted_unless_first():
    r = _report()
    r.start_storage("background", DEVICES)
    r.add_storage_round(_blocks(0, 0, 0, 0), started_ms=0.0)  # (an empty disk)
    r.add_storage_round(_blocks(1, 0, 0, 0), started_ms=1.0)
    assert r.storage["rounds"] == 1 and len(r.storage["storage-rounds"]) == 2


def test_a_memory_round_keeps_its_pages_and_bytes_apart_from_the_disk_s():
    r = _report(ram_bytes=1000 * PAGE_SIZE)
    r.start_storage("background", DEVICES)
    b = _blocks(3, 30, 25, 5, remaining=7, writes=10, write_p50_ns=1_500_000,
                write_p99_ns=9_000_000, mirrored_writes=4)
    mem_bytes = 90 * PAGE_SIZE + 400
    # as the coordinator's _stats makes it: memory's and the disk's summed, for the policy
    s = RoundStats(round=3, dirty_pages=100 + 30, sent_pages=90 + 25, zero_pages=10 + 5,
                   bytes=mem_bytes + b.block_bytes, duration_s=0.5, dirty_rate=12.0,
                   remaining_pages=20 + 7)
    r.add_round(s, final=False, blocks=b)
    row = r.rounds[0]
    assert (row["pages"], row["normal-pages"], row["zero-pages"]) == (100, 90, 10)
    assert row["bytes"] == mem_bytes and row["remaining"] == 20
    assert row["disk"] == {"blocks": 30, "normal-blocks": 25, "zero-blocks": 5,
                           "bytes": b.block_bytes, "remaining": 7}
    assert row["mbps"] == round(s.bytes * 8 / 1e6 / 0.5, 1)  # the link carried both
    st = r.storage
    assert st["bytes"] == b.block_bytes and st["blocks-sent"] == 30 and st["rounds"] == 1
    assert st["dirty-blocks-after-first"] == 30 and st["final-blocks"] is None
    assert st["write-latency-ms"] == {"p50": 1.5, "p99": 9.0, "writes": 10}
    assert st["mirrored-writes"] == 4
    d = r.to_dict()
    assert d["transferred-bytes"] == mem_bytes  # memory's; the disk's are storage's
    assert (d["normal-pages"], d["zero-pages"]) == (90, 10)
    assert d["storage"]["bytes"] == b.block_bytes


def test_the_final_pass_s_blocks_are_the_final_blocks():
    r = _report()
    r.start_storage("background", DEVICES)
    s = RoundStats(round=4, dirty_pages=12, sent_pages=12, zero_pages=0, bytes=12 * PAGE_SIZE,
                   duration_s=0.01, dirty_rate=0.0, remaining_pages=0)
    r.add_round(s, final=True, blocks=_blocks(4, 2, 2, 0))
    assert r.storage["final-blocks"] == 2 and r.rounds[0]["final"] is True
    assert r.rounds[0]["pages"] == 10


def test_a_memory_round_without_blocks_is_as_before():
    r = _report()
    s = RoundStats(round=1, dirty_pages=50, sent_pages=45, zero_pages=5, bytes=46 * PAGE_SIZE,
                   duration_s=0.1, dirty_rate=3.0, remaining_pages=8)
    r.add_round(s, final=False)
    assert "disk" not in r.rounds[0]
    assert (r.rounds[0]["pages"], r.rounds[0]["bytes"], r.rounds[0]["remaining"]) == (
        50, 46 * PAGE_SIZE, 8)
    assert r.storage is None and r.to_dict()["storage"] is None


def test_to_dict_gives_the_bytes_ratio_and_the_dirty_rate_from_the_first_read():
    r = _report()
    r.start_storage("background", DEVICES)
    first = pb.RoundStats(round=0, dirty_blocks=1024, sent_blocks=1024,
                          block_bytes=SIZE + 8192, duration_ns=20_000_000)
    r.add_storage_round(first, started_ms=10.0)
    r.add_storage_round(_blocks(1, 300, 300, 0), started_ms=30.0)
    # 1 s after the first copy read the log (its round began at 10 ms): what the rounds
    # after it sent was written from then on
    r.phases["final"] = 1010.0
    st = r.to_dict()["storage"]
    assert st["bytes-ratio"] == round((SIZE + 8192 + 300 * PAGE_SIZE + 8 * 300) / SIZE, 4)
    assert st["bytes-ratio"] > 1
    assert st["dirty-rate"] == 300.0
    assert r.storage.get("bytes-ratio") is None  # to_dict adds it to its copy only


def test_no_dirty_rate_before_the_final_pass():
    r = _report()
    r.start_storage("background", DEVICES)
    r.add_storage_round(_blocks(0, 1024, 1024, 0, duration_ns=1_000_000), started_ms=0.0)
    assert "dirty-rate" not in r.to_dict()["storage"]


def test_a_domain_without_disk_bytes_has_no_ratio():
    r = _report()
    r.start_storage("background", [DEVICES[1]])
    assert r.to_dict()["storage"]["bytes-ratio"] is None


# ---- the verdict


def test_identical_images_verify():
    r = _passing(_report())
    r.start_storage("background", DEVICES)
    assert not r.verified  # no verdict yet: not verified
    r.set_storage_verdict(np.empty(0, np.int64), np.zeros(1024, np.uint8), removed=False)
    v = r.storage["verdict"]
    assert v["disks"] == "identical" and v["unexplained"] == 0
    assert r.storage["source-image"] == "kept"
    assert r.verified and r.to_dict()["verification"]["passed"] is True


def test_blocks_written_after_the_final_pass_explain_their_differences():
    r = _passing(_report())
    r.start_storage("write-blocking", DEVICES)
    causes = np.zeros(1024, np.uint8)
    causes[[3, 700]] = 1
    r.set_storage_verdict(np.array([3, 700]), causes, removed=True)
    v = r.storage["verdict"]
    assert v == {"disks": 2, "differing-blocks": [3, 700], "written-after-final": 2,
                 "unexplained": 0, "unexplained-blocks": []}
    assert r.storage["source-image"] == "removed"
    assert r.verified


def test_one_block_not_written_after_the_final_pass_is_unexplained():
    r = _passing(_report())
    r.start_storage("background", DEVICES)
    causes = np.zeros(1024, np.uint8)
    causes[[3, 700]] = 1
    r.set_storage_verdict(np.array([3, 512, 700]), causes, removed=False)
    v = r.storage["verdict"]
    assert v["disks"] == 3 and v["written-after-final"] == 2
    assert v["unexplained"] == 1 and v["unexplained-blocks"] == [512]
    assert not r.verified and r.to_dict()["verification"]["passed"] is False


def test_differing_blocks_with_no_causes_are_all_unexplained():
    r = _passing(_report())
    r.start_storage("background", DEVICES)
    r.set_storage_verdict(np.array([1, 2]), np.empty(0, np.uint8), removed=False)
    assert r.storage["verdict"]["unexplained"] == 2 and not r.verified


def test_images_of_different_sizes_do_not_verify():
    r = _passing(_report())
    r.start_storage("background", DEVICES)
    r.set_storage_verdict(None, np.zeros(1024, np.uint8), removed=False)
    assert r.storage["verdict"] == {"disks": "size-mismatch", "unexplained": None}
    assert not r.verified


def test_the_listed_blocks_are_capped():
    r = _passing(_report())
    r.start_storage("background", DEVICES)
    differing = np.arange(0, 200)
    r.set_storage_verdict(differing, np.zeros(1024, np.uint8), removed=False)
    v = r.storage["verdict"]
    assert v["disks"] == 200 and v["unexplained"] == 200
    assert v["differing-blocks"] == list(range(32)) and v["unexplained-blocks"] == list(range(32))


def test_without_storage_the_verdict_is_memory_s():
    r = _passing(_report())
    assert r.verified and r.to_dict()["storage"] is None
