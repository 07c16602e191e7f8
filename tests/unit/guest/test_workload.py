"""The guest's self-verifying memory workload (guest/workload.py, guest/kernel.py)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

import guest.kernel as kernel_mod
from guest.kernel import VCPU_VERSION, Kernel
from guest.memapi import VcpuMemory
from guest.workload import pattern
from pvmig.hv.memory import PAGE_SIZE
from pvmig.pv import guestinfo

pytestmark = pytest.mark.timeout(60)

N = 2048                  # frames: 0 info, 1 xenstore, 2-3 generation table, 4.. workload
GEN_FIRST, GEN_FRAMES, WORK_FIRST, WORK_FRAMES = 2, 2, 4, N - 4
CONFIG = dict(dirty_rate=0.0, hot_fraction=0.1, hot_share=0.9, fill=1.0, seed=42)


@pytest.fixture
def domain(make_memory, make_log):
    """Boot a guest: boot(**config) -> (kernel, mem, log)."""

    def boot(**config):
        mem, log = make_memory(N), make_log(N)
        k = Kernel.boot(VcpuMemory(mem, log), {**CONFIG, **config})
        return k, mem, log

    return boot


def full_sweep(k: Kernel, n: int = 300) -> None:
    """Step the rolling sweep until it completes once more."""
    sweeps = int(k.work.info[0]["sweeps"])
    for _ in range(N):
        k.work.sweep_step(n)
        if int(k.work.info[0]["sweeps"]) > sweeps:
            return
    raise AssertionError("the sweep never completed")


def gen_frame(f) -> np.ndarray:
    return GEN_FIRST + np.asarray(f) * 4 // PAGE_SIZE


# ---- boot and a clean sweep


def test_boot_lays_out_the_domain(domain):
    k, mem, log = domain(fill=1.0)
    lay = guestinfo.layout(N)
    assert (lay.gen_first, lay.gen_frames, lay.work_first, lay.work_frames) == \
        (GEN_FIRST, GEN_FRAMES, WORK_FIRST, WORK_FRAMES)
    assert lay.dev_frames == 0 and lay.dev_first == WORK_FIRST
    info = guestinfo.view(mem)[0]
    assert int(info["magic"]) == guestinfo.MAGIC
    assert (int(info["nr_frames"]), int(info["work_first"]), int(info["work_frames"])) == \
        (N, WORK_FIRST, WORK_FRAMES)
    assert float(info["hot_share"]) == 0.9 and int(info["seed"]) == 42
    g = guestinfo.read(mem)
    assert g["pages_written"] == WORK_FRAMES
    assert g["checks_run"] == g["checks_failed"] == g["sweeps"] == 0
    assert g["failures"] == []
    # every workload frame holds generation 1, as the table says
    work = np.arange(WORK_FIRST, N)
    assert (k.work.gens[work] == 1).all()
    assert np.array_equal(mem.words[work], pattern(work, np.ones(len(work), np.uint32)))
    # boot went through the memory API: everything it wrote is marked dirty
    # (all but the xenstore page, which the guest has not used yet)
    assert log.read_and_clear().tolist() == [f for f in range(N) if f != guestinfo.XENSTORE_FRAME]


def test_a_full_sweep_finds_no_failure(domain):
    k, mem, _ = domain(fill=1.0)
    full_sweep(k)
    g = guestinfo.read(mem)
    assert g["sweeps"] == 1
    assert g["checks_run"] == WORK_FRAMES
    assert g["checks_failed"] == 0 and g["failures"] == []
    assert int(k.work.info[0]["sweep_cursor"]) == 0


def test_steps_sweep_all_of_memory(domain):
    k, mem, _ = domain(fill=1.0, dirty_rate=0.0)
    steps = 0
    while guestinfo.read(mem)["sweeps"] == 0:
        k.step()
        steps += 1
        assert steps <= WORK_FRAMES, "the steps never completed a sweep"
    g = guestinfo.read(mem)
    assert g["steps"] == steps
    assert g["checks_run"] == WORK_FRAMES and g["checks_failed"] == 0
    assert g["pages_written"] == WORK_FRAMES  # dirty_rate 0: only the fill


def test_a_partial_fill_leaves_the_rest_zero_and_passing(domain):
    k, mem, _ = domain(fill=0.25)
    written = int(WORK_FRAMES * 0.25)
    assert guestinfo.read(mem)["pages_written"] == written
    unwritten = np.arange(WORK_FIRST + written, N)
    assert (k.work.gens[unwritten] == 0).all()
    assert not mem.pages[unwritten].any()
    assert (k.work.gens[WORK_FIRST:WORK_FIRST + written] == 1).all()
    full_sweep(k)
    g = guestinfo.read(mem)
    assert g["checks_run"] == WORK_FRAMES and g["checks_failed"] == 0


# ---- writes


def test_a_write_marks_its_frames_and_their_generation_table_frames(domain):
    k, mem, log = domain(fill=1.0)
    log.read_and_clear()
    frames = np.array([4, 5, 1023, 1024, 2047])
    k.work.write(frames)
    # frames 4-1023 have their generation in table frame 2, 1024-2047 in frame 3;
    # the info page (frame 0) counts the write.
    assert log.read_and_clear().tolist() == [0, 2, 3, 4, 5, 1023, 1024, 2047]
    assert (k.work.gens[frames] == 2).all()
    assert np.array_equal(mem.words[frames], pattern(frames, np.full(5, 2, np.uint32)))
    assert guestinfo.read(mem)["pages_written"] == WORK_FRAMES + 5

    k.work.write(np.array([500]))
    assert log.read_and_clear().tolist() == [0, 2, 500]
    full_sweep(k)
    assert guestinfo.read(mem)["checks_failed"] == 0


def test_writes_store_the_data_before_the_mark(domain):
    """At the moment a frame is marked, what it must hold is already in memory."""
    k, mem, log = domain(fill=1.0)
    frames = np.array([10, 11, 1500])
    seen = []
    real_mark = log.mark

    def mark(marked):
        marked = np.atleast_1d(marked)
        for f in marked.tolist():
            if f >= WORK_FIRST:   # a workload page: its next generation is in place
                seen.append(("page", f, np.array_equal(mem.words[f], pattern(
                    np.array([f]), np.array([2], np.uint32))[0])))
            elif f >= GEN_FIRST:  # a table frame: its entries are updated
                mine = frames[gen_frame(frames) == f]
                seen.append(("table", f, bool((k.work.gens[mine] == 2).all())))
        real_mark(marked)

    log.mark = mark
    k.work.write(frames)
    assert ("page", 10, True) in seen and ("page", 1500, True) in seen
    assert ("table", 2, True) in seen and ("table", 3, True) in seen
    assert all(ok for _, _, ok in seen), seen


def test_steps_write_what_the_dirty_rate_owes(domain, monkeypatch):
    k, mem, log = domain(fill=1.0, dirty_rate=2500.0)
    clock = [1024.0]  # times in powers of two: the owed pages come out exact
    monkeypatch.setattr(kernel_mod, "time", type("T", (), {
        "monotonic": staticmethod(lambda: clock[0])}))
    k.last = clock[0]
    k.owed = 0.0
    twin = np.random.Generator(np.random.PCG64())
    twin.bit_generator.state = k.rng.bit_generator.state
    log.read_and_clear()
    before = guestinfo.read(mem)["pages_written"]

    clock[0] += 1 / 64  # 39.0625 pages owed
    k.step()
    expected = k.work.pick(twin, 39)
    assert 1 < len(expected) <= 39
    assert guestinfo.read(mem)["pages_written"] == before + len(expected)
    assert (k.work.gens[expected] == 2).all()
    assert set(expected.tolist()) <= set(log.read_and_clear().tolist())
    assert k.owed == pytest.approx(0.0625)

    clock[0] += 1 / 8192  # 0.305 more: nothing written yet
    k.step()
    assert guestinfo.read(mem)["pages_written"] == before + len(expected)
    assert k.owed == pytest.approx(0.0625 + 2500 / 8192)

    # Time the vCPU did not run (a throttle, a busy host) is not made up afterwards:
    # half a second off owes what MAX_STEP_S of running would.
    written = guestinfo.read(mem)["pages_written"]
    clock[0] += 0.5
    k.step()
    again = k.work.pick(twin, 50)  # 50.37 owed, not 1250.37
    assert guestinfo.read(mem)["pages_written"] == written + len(again)
    assert k.owed == pytest.approx(0.0625 + 2500 / 8192)


# ---- corruption is observed


@pytest.mark.parametrize("byte", [0, 8, 100, PAGE_SIZE - 1])
def test_a_corrupt_byte_is_one_failure(domain, byte):
    k, mem, _ = domain(fill=1.0)
    f = 777
    mem.pages[f, byte] ^= 0xFF  # behind the guest's back, not through its memory API
    full_sweep(k)
    g = guestinfo.read(mem)
    assert g["checks_run"] == WORK_FRAMES
    assert g["checks_failed"] == 1
    # word 1 of a page is its generation: the failure reports what the page holds
    found = 1 ^ 0xFF if byte == 8 else 1
    assert g["failures"] == [{"frame": f, "expected": 1, "found": found}]
    # a check over frames that do not include it passes, one that does fails
    assert k.work.check(np.arange(WORK_FIRST, f)) == 0
    assert k.work.check(np.array([5, f, 900])) == 1


def test_a_stale_page_is_caught_with_its_generations(domain):
    k, mem, _ = domain(fill=1.0)
    f = 1234
    gen1 = mem.pages[f].copy()
    k.work.write(np.array([f]))
    gen2 = mem.pages[f].copy()
    k.work.write(np.array([f]))
    assert k.work.gens[f] == 3
    full_sweep(k)
    assert guestinfo.read(mem)["checks_failed"] == 0

    mem.pages[f] = gen2  # the destination got the previous generation
    assert k.work.check(np.array([f])) == 1
    mem.pages[f] = gen1  # or an older one
    assert k.work.check(np.array([f])) == 1
    g = guestinfo.read(mem)
    assert g["checks_failed"] == 2
    assert g["failures"] == [{"frame": f, "expected": 3, "found": 2},
                             {"frame": f, "expected": 3, "found": 1}]


def test_a_stale_generation_table_is_caught(domain):
    """The table frame missed: the pages are newer than the table says."""
    k, mem, _ = domain(fill=1.0)
    table = mem.pages[GEN_FIRST].copy()
    k.work.write(np.array([10, 20]))
    mem.pages[GEN_FIRST] = table
    full_sweep(k)
    g = guestinfo.read(mem)
    assert g["checks_failed"] == 2
    assert g["failures"] == [{"frame": 10, "expected": 1, "found": 2},
                             {"frame": 20, "expected": 1, "found": 2}]


def test_a_page_never_written_must_stay_zero(domain):
    k, mem, _ = domain(fill=0.5)
    f = N - 10
    assert k.work.gens[f] == 0
    mem.pages[f, 4000] = 1
    full_sweep(k)
    g = guestinfo.read(mem)
    assert g["checks_failed"] == 1
    assert g["failures"] == [{"frame": f, "expected": 0, "found": 0}]


def test_failures_are_counted_all_and_recorded_up_to_the_limit(domain):
    k, mem, _ = domain(fill=1.0)
    bad = np.arange(100, 100 + 3 * guestinfo.MAX_FAILURES, 3)
    mem.pages[bad, 2000] ^= 1
    full_sweep(k)
    g = guestinfo.read(mem)
    assert g["checks_failed"] == len(bad)
    assert [x["frame"] for x in g["failures"]] == bad[:guestinfo.MAX_FAILURES].tolist()


def test_guestinfo_read_of_a_domain_never_booted(make_memory):
    assert guestinfo.read(make_memory(8)) == {}


# ---- vCPU context: suspend here, resume there


def _migrate_memory(mem, make_memory, make_log):
    mem2, log2 = make_memory(N, "ram2"), make_log(N, "log2")
    mem2.pages[:] = mem.pages
    return VcpuMemory(mem2, log2)


def test_restore_continues_the_same_random_sequence(domain, make_memory, make_log):
    k1, mem, _ = domain(fill=1.0, dirty_rate=300.0)
    for _ in range(3):
        k1.work.write(k1.work.pick(k1.rng, 40))
    k1.rng.random(dtype=np.float32)  # leaves half a 64-bit draw buffered in the state
    assert k1.rng.bit_generator.state["has_uint32"] == 1
    k1.owed = 0.625
    ctx = k1.vcpu_context()

    vm2 = _migrate_memory(mem, make_memory, make_log)
    k2 = Kernel.restore(vm2, ctx)
    assert k2.rng.bit_generator.state == k1.rng.bit_generator.state
    assert k2.owed == 0.625

    picks1 = [k1.work.pick(k1.rng, 64).tolist() for _ in range(5)]
    floats1 = k1.rng.random(3, dtype=np.float32).tolist()
    picks2 = [k2.work.pick(k2.rng, 64).tolist() for _ in range(5)]
    floats2 = k2.rng.random(3, dtype=np.float32).tolist()
    assert picks1 == picks2
    assert floats1 == floats2
    assert picks1[0] != picks1[1]  # the picks do move on

    g = guestinfo.read(vm2.mem)
    assert g["resumes"] == 1
    assert g["sweeps_since_resume"] == g["checks_since_resume"] == 0
    assert g["failed_since_resume"] == 0
    full_sweep(k2)
    assert guestinfo.read(vm2.mem)["failed_since_resume"] == 0


def test_the_vcpu_context_is_small_msgpack(domain):
    k, _, _ = domain(fill=0.1)
    ctx = msgpack.unpackb(k.vcpu_context(), raw=False)
    assert ctx["version"] == VCPU_VERSION
    assert ctx["rng"]["bit_generator"] == "PCG64"
    assert len(k.vcpu_context()) < 512


@pytest.mark.parametrize("version", [VCPU_VERSION + 1, 0, None, "1"])
def test_restore_rejects_a_wrong_vcpu_version(domain, version):
    k, mem, log = domain(fill=0.1)
    ctx = msgpack.unpackb(k.vcpu_context(), raw=False)
    if version is None:
        del ctx["version"]
    else:
        ctx["version"] = version
    with pytest.raises(ValueError, match="version"):
        Kernel.restore(VcpuMemory(mem, log), msgpack.packb(ctx))
    assert guestinfo.read(mem)["resumes"] == 0


def test_restore_rejects_ram_without_an_info_page(domain, make_memory, make_log):
    k, _, _ = domain(fill=0.1)
    empty = VcpuMemory(make_memory(N, "blank"), make_log(N, "blank-log"))
    with pytest.raises(ValueError, match="no info page"):
        Kernel.restore(empty, k.vcpu_context())


def test_the_first_sweep_after_a_resume_checks_every_frame(domain, make_memory, make_log):
    k1, mem, _ = domain(fill=1.0, dirty_rate=0.0)
    k1.work.sweep_step(WORK_FRAMES * 3 // 4)  # suspended three quarters into a sweep
    vm2 = _migrate_memory(mem, make_memory, make_log)
    vm2.mem.pages[WORK_FIRST + 5, 99] ^= 1  # a page the migration got wrong
    k2 = Kernel.restore(vm2, k1.vcpu_context())
    for _ in range(WORK_FRAMES):
        if guestinfo.read(vm2.mem)["sweeps_since_resume"] >= 1:
            break
        k2.step()
    g = guestinfo.read(vm2.mem)
    assert g["sweeps_since_resume"] == 1
    assert g["checks_since_resume"] >= WORK_FRAMES, (
        f"a 'full sweep since resume' checked {g['checks_since_resume']} of "
        f"{WORK_FRAMES} frames")
    assert g["failed_since_resume"] == 1


def test_a_workload_change_is_written_in_the_guests_own_memory_and_moves_with_it(
        domain, make_memory, make_log):
    k1, mem, log = domain(dirty_rate=300.0)
    log.read_and_clear()
    assert k1.set_workload({"dirty_rate": 5000.0, "io_rate": 9.0}) == {
        "dirty_rate": 5000.0, "io_rate": 0.0}  # (no disk: no I/O rate to set)
    assert 0 in log.read_and_clear(), "the info page was written through the dirty log"
    assert guestinfo.workload(mem)["dirty_rate"] == 5000.0
    assert k1.set_workload({"io_rate": None})["dirty_rate"] == 5000.0  # unset: unchanged

    k2 = Kernel.restore(_migrate_memory(mem, make_memory, make_log), k1.vcpu_context())
    assert float(k2.work.info[0]["dirty_rate"]) == 5000.0
