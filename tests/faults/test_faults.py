"""End to end: faults around a migration. After each, the guest runs in exactly one
place, checking itself, and no agent is left holding a half-done migration."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import msgpack
import pytest
from support import (
    create,
    domains,
    eventually,
    local_cluster,
    migrate,
    peer_stats,
    pvmig,
    query,
    start_peer,
    tmpfs,
    wait_running_and_checking,
)

from pvmig import faults
from pvmig._proto import pvmig_pb2 as pb
from pvmig._proto import pvmig_pb2_grpc as pb_grpc
from pvmig.tools.cluster import LocalAgent


@pytest.fixture
def cluster(make_cluster):
    """Agents whose leases run out after 3 s of silence: their watchdogs act at once."""
    return make_cluster(session_timeout_s=3)


def _only_on(home: str, other: str, name: str) -> pb.DomainInfo:
    """The guest runs on `home`, checking itself, and `other` has nothing of it."""
    info = wait_running_and_checking(home, name)
    assert info.state == "running" and info.migration_id == ""
    assert info.guest.checks_failed == 0, list(info.guest.failures)
    assert name not in domains(other)
    return info


def _start_migrate(a: str, b: str, name: str, report: Path, *extra: str) -> subprocess.Popen:
    """A migration that iterates (a downtime limit no round meets) until told otherwise."""
    return subprocess.Popen(
        [sys.executable, "-m", "pvmig", "migrate", "--source", a, "--dest", b, "--domain", name,
         "--downtime-limit", "0.001", "--max-rounds", "100000", "--no-progress-rounds", "0",
         "--report", str(report), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_round(proc: subprocess.Popen, n: int) -> None:
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "round" and event["round"] >= n:
            return
    raise AssertionError(f"migration ended before round {n}: {proc.stderr.read()}")


def _drain(proc: subprocess.Popen) -> None:
    threading.Thread(target=proc.stdout.read, daemon=True).start()


def _prepare(dest: str, mid: str, domain: str) -> None:
    with grpc.insecure_channel(dest) as ch:
        pb_grpc.MigrationDestStub(ch).Prepare(pb.PrepareRequest(
            migration_id=mid, domain=domain, ram_bytes=16 << 20, source_agent="a"),
            timeout=60)


def test_two_migrations_of_one_domain_at_once(cluster):
    """Two Begins race for one domain: exactly one gets it."""
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=16)
    results = {}
    for mid in ("m1", "m2"):  # (each prepared at the destination, as a coordinator does)
        _prepare(b, mid, f"vm-{mid}")

    def begin(mid):
        with grpc.insecure_channel(a) as ch:
            try:
                pb_grpc.MigrationSourceStub(ch).Begin(
                    pb.BeginRequest(migration_id=mid, domain="vm", dest_address=b), timeout=30)
                results[mid] = "ok"
            except grpc.RpcError as e:
                results[mid] = e.code()
    threads = [threading.Thread(target=begin, args=(m,)) for m in ("m1", "m2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(str, results.values())) == sorted(
        ["ok", str(grpc.StatusCode.FAILED_PRECONDITION)]), results
    winner = next(m for m, r in results.items() if r == "ok")
    assert query(a, "vm").migration_id == winner
    r = pvmig("cancel", "--migration", winner, "--agent", a)
    assert r.returncode == 0, r.stderr
    _only_on(a, b, "vm")


def test_a_slow_suspend_is_resumed_by_abort(cluster):
    """The coordinator gives up on a suspend the guest acknowledges late: abort must
    find the guest suspended and resume it, not leave it frozen."""
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=16)
    pid = query(a, "vm").guest_pid
    _prepare(b, "m", "vm-in")  # (prepared at the destination, as a coordinator does)
    with grpc.insecure_channel(a) as ch:
        src = pb_grpc.MigrationSourceStub(ch)
        src.Begin(pb.BeginRequest(migration_id="m", domain="vm", dest_address=b), timeout=30)
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(grpc.RpcError) as info:
                src.Suspend(pb.MigrationRef(migration_id="m"), timeout=1)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            os.kill(pid, signal.SIGCONT)  # the guest now acknowledges, late
        src.Abort(pb.MigrationRef(migration_id="m", reason="test"), timeout=90)
    info = _only_on(a, b, "vm")
    assert info.guest.resumes == 1  # the cancelled suspend resumed it in place


def test_destination_guest_and_coordinator_die(cluster, tmp_path):
    """The waiting guest on the destination dies, and so does the coordinator: the
    leases (3 s here) end the abandoned migration on both agents, then a new one works."""
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=32, dirty_rate=20000)
    proc = _start_migrate(a, b, "vm", tmp_path / "r.json")
    _wait_round(proc, 1)
    os.kill(query(b, "vm").guest_pid, signal.SIGKILL)
    proc.kill()
    proc.wait()
    eventually(lambda: "vm" not in domains(b), what="the destination discards")
    _only_on(a, b, "vm")
    r, data = migrate(a, b, "vm", tmp_path / "r2.json")
    assert r.returncode == 0, r.stderr
    assert data["verification"]["passed"] is True


def test_destination_not_ready_aborts_before_commit(cluster, tmp_path):
    """The waiting guest on the destination dies during pre-copy: the destination is
    not ready, the source never records a commit, the guest goes on at home."""
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=32, dirty_rate=20000)
    proc = _start_migrate(a, b, "vm", tmp_path / "r.json", "--max-rounds", "6")
    _wait_round(proc, 1)
    os.kill(query(b, "vm").guest_pid, signal.SIGKILL)
    _drain(proc)
    assert proc.wait(timeout=120) == 1
    err = proc.stderr.read()
    assert "the guest process waiting to resume it is gone" in err, err
    assert "aborted, the guest runs on the source" in err
    assert not list((Path(cluster["a"].dir) / "data" / "migrations").glob("*.json"))
    _only_on(a, b, "vm")


def _migrate_unrecordable(agent: LocalAgent, a: str, b: str, tmp_path: Path):
    """Migrate vm a -> b while `agent` cannot write its commit records (a file where
    their directory was)."""
    records = Path(agent.dir) / "data" / "migrations"
    shutil.rmtree(records)
    records.write_text("not a directory")
    try:
        return migrate(a, b, "vm", tmp_path / "r.json")
    finally:
        records.unlink()
        records.mkdir()


def test_failed_commit_aborts(cluster, tmp_path):
    """The source cannot record its commit: nothing is committed, the guest stays home."""
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=16)
    r, data = _migrate_unrecordable(cluster["a"], a, b, tmp_path)
    assert r.returncode == 1
    assert "cannot record the commit" in r.stderr and "aborted" in r.stderr
    assert data["committed"] is False if "committed" in data else True
    _only_on(a, b, "vm")


def test_cancel_mid_migration(cluster, tmp_path):
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=32, dirty_rate=20000)
    proc = _start_migrate(a, b, "vm", tmp_path / "r.json")
    _wait_round(proc, 2)
    mid = query(a, "vm").migration_id
    r = pvmig("cancel", "--migration", mid, "--agent", b, "--agent", a)
    assert r.returncode == 0, r.stderr
    _drain(proc)
    assert proc.wait(timeout=60) == 1
    _only_on(a, b, "vm")


@pytest.mark.quick
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_coordinator_killed_before_commit(cluster, tmp_path, sig):
    """SIGTERM: the coordinator aborts on its way out. SIGKILL: the agents' leases run
    out (3 s here) and they abort by themselves."""
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=32, dirty_rate=20000)
    proc = _start_migrate(a, b, "vm", tmp_path / "r.json")
    _wait_round(proc, 1)
    proc.send_signal(sig)
    _drain(proc)
    code = proc.wait(timeout=60)
    if sig == signal.SIGTERM:
        assert code == 1
        assert json.loads((tmp_path / "r.json").read_text())["error"].startswith("interrupted")
    else:
        eventually(lambda: "vm" not in domains(b), what="the destination discards")
    _only_on(a, b, "vm")


@pytest.fixture
def lone_agent(tmp_path):
    """One agent, started, whose memory directory outlives its restarts (the test's)."""
    mem = Path("/dev/shm") / f"pvmig-test-{os.getpid()}"
    agent = LocalAgent("a", tmp_path, mem_dir=mem)
    try:
        yield agent.start(), mem
    finally:
        agent.stop()
        shutil.rmtree(mem, ignore_errors=True)


def test_host_crash_clears_stale_memory(lone_agent):
    agent, mem = lone_agent
    create(agent.address, "vm", ram_mb=8)
    agent.kill_host()  # its guest dies with it, its files stay
    assert list(mem.glob("*.ram"))
    agent.start()
    assert not list(mem.glob("*.ram")) and domains(agent.address) == {}
    assert "domain vm not revived: its guest left no vCPU context" in agent.log_file.read_text()
    create(agent.address, "vm", ram_mb=8)  # the same name and domid again
    wait_running_and_checking(agent.address, "vm")


@pytest.mark.quick
def test_agent_crash_revives_its_domains(lone_agent, tmp_path):
    """SIGKILL of the agent alone (dom0 crashes, the hypervisor does not): each guest
    sees its channel close, quiesces and leaves its vCPU context beside its RAM; the
    next start resumes it from there, its memory, counters and disk intact, the block
    requests in flight at the crash replayed, and its net peer told where it is now."""
    agent, mem = lone_agent
    _create_with_disk_and_nic(agent.address, tmp_path, io_rate=200)
    create(agent.address, "busy", ram_mb=8, dirty_rate=20000)
    before = wait_running_and_checking(agent.address, "vm")
    # The peer sends until told to stop, and retransmits each request for as long as a
    # revival can take: however slow the machine, it loses only what the guest does.
    stats = tmp_path / "peer.json"
    peer = start_peer(_vif(agent.address).address, stats, "--duration", "0")
    try:
        # answered: netback has learnt the peer, and the revival has it to announce to
        eventually(lambda: peer_stats(stats).get("answered", 0) >= 100, what="the peer answered")
        at_kill = peer_stats(stats)["answered"]
        agent.kill()
        eventually(lambda: len(list(mem.glob("*.vcpu"))) == 2, what="both guests preserved")
        agent.start()
        after = wait_running_and_checking(agent.address, "vm")
        address = _vif(agent.address).address
        eventually(lambda: peer_stats(stats).get("target") == address
                   and peer_stats(stats)["answered"] >= at_kill + 100,
                    what="the peer answered at the guest's new address")
        peer.send_signal(signal.SIGTERM)  # it stops sending and waits for what is outstanding
        out, err = peer.communicate(timeout=60)
    finally:
        if peer.poll() is None:
            peer.kill()
    assert after.guest.steps > before.guest.steps  # went on, not booted afresh
    assert after.guest.resumes == before.guest.resumes + 1
    assert after.guest.checks_failed == 0 and after.guest.pages_written >= before.guest.pages_written
    eventually(lambda: _vbd(agent.address).served > 0, what="the disk served again")
    _disk_intact(query(agent.address, "vm"))
    final = json.loads(out)
    assert peer.returncode == 0, (out, err)
    assert final["lost"] == 0 and final["answered"] == final["sent"] > 100, final
    assert final["announcements"] >= 1 and final["target"] == _vif(agent.address).address
    busy = wait_running_and_checking(agent.address, "busy")
    assert busy.guest.checks_failed == 0
    assert not list(mem.glob("*.vcpu")) and len(list(mem.glob("*.ram"))) == 2
    assert "revived domains left by a crash: busy, vm" in agent.log_file.read_text()


def test_agent_crash_while_its_guest_is_throttled(lone_agent):
    """A crash during an auto-converge throttle's off-slice leaves the guest stopped
    (SIGSTOP): the next start wakes it to preserve itself, then revives it."""
    agent, mem = lone_agent
    create(agent.address, "vm", ram_mb=8)
    before = wait_running_and_checking(agent.address, "vm")
    os.kill(before.guest_pid, signal.SIGSTOP)
    agent.kill()
    time.sleep(0.5)
    assert not list(mem.glob("*.vcpu"))  # stopped: it cannot have noticed
    agent.start()
    after = wait_running_and_checking(agent.address, "vm")
    assert after.guest_pid != before.guest_pid and after.guest.resumes == 1
    assert after.guest.checks_failed == 0


@pytest.mark.parametrize("point,resumes", [("unpark", 1), ("unparked", 2)])
def test_agent_crashes_again_while_reviving(lone_agent, monkeypatch, point, resumes):
    """A second crash in the middle of a revival loses nothing. Before the new guest
    resumes: its record holds the context and the RAM has not run since. After: the
    record names the new guest, the next start waits for it to preserve itself and
    takes the context it left, never the older one that no longer goes with the RAM."""
    agent, mem = lone_agent
    create(agent.address, "vm", ram_mb=8)
    before = wait_running_and_checking(agent.address, "vm")
    agent.kill()
    monkeypatch.setenv(faults.AGENT_CRASHES_AT.env, point)
    with pytest.raises(RuntimeError, match="exited with -9"):
        agent.start()
    monkeypatch.delenv(faults.AGENT_CRASHES_AT.env)
    agent.start()
    after = wait_running_and_checking(agent.address, "vm")
    assert after.guest.resumes == resumes and after.guest.steps > before.guest.steps
    assert after.guest.checks_failed == 0
    assert len(list(mem.glob("*.ram"))) == 1 and not list(mem.glob("*.vcpu"))


def _create_with_disk_and_nic(address: str, tmp_path: Path, io_rate: int) -> None:
    """Domain vm: 16 MiB, a disk at work (`io_rate` requests/s) and a NIC."""
    r = pvmig("domain", "create", "vm", "--agent", address, "--ram-mb", "16",
              "--disk", str(tmp_path / "vm.img"), "--disk-blocks", "128",
              "--disk-io-rate", str(io_rate), "--vif")
    assert r.returncode == 0, r.stderr


def _vbd(address: str):
    (vbd,) = [d for d in query(address, "vm").device_stats if d.kind == "vbd"]
    return vbd


def _vif(address: str):
    (vif,) = [d for d in query(address, "vm").device_stats if d.kind == "vif"]
    return vif


def test_clean_restart_keeps_idle_domains(lone_agent, tmp_path):
    """SIGTERM parks each idle domain (suspended, its RAM file kept, a record written);
    the next start resumes it where it stopped: its memory, counters and disk intact."""
    agent, mem = lone_agent
    _create_with_disk_and_nic(agent.address, tmp_path, io_rate=100)
    create(agent.address, "quiet", ram_mb=8, dirty_rate=0)
    before = wait_running_and_checking(agent.address, "vm")
    agent.stop()
    assert agent.proc.returncode == 0
    assert len(list(mem.glob("*.ram"))) == 2 and not list(mem.glob("*.dirty"))
    assert sorted(p.name for p in (tmp_path / "a" / "data" / "parked").iterdir()) == [
        "quiet.park", "vm.park"]
    agent.start()
    after = wait_running_and_checking(agent.address, "vm")
    assert after.guest.steps > before.guest.steps  # went on, not booted afresh
    assert after.guest.checks_failed == 0 and after.guest.pages_written >= before.guest.pages_written
    _disk_intact(after)
    assert _vbd(agent.address).served > 0
    wait_running_and_checking(agent.address, "quiet")
    assert not list((tmp_path / "a" / "data" / "parked").iterdir())
    assert len(list(mem.glob("*.ram"))) == 2  # the same two, taken over where they were


def test_a_parked_domain_without_its_ram_is_set_aside(lone_agent, tmp_path):
    agent, mem = lone_agent
    create(agent.address, "vm", ram_mb=8)
    agent.stop()
    for ram in mem.glob("*.ram"):  # a reboot empties /dev/shm
        ram.unlink()
    agent.start()
    assert domains(agent.address) == {}
    parked = tmp_path / "a" / "data" / "parked"
    assert [p.name for p in parked.iterdir()] == ["vm.broken"]
    assert "parked domain vm not resumed" in agent.log_file.read_text()
    create(agent.address, "vm", ram_mb=8)  # the name is free again


def test_a_parked_context_that_does_not_go_with_its_ram_is_set_aside(lone_agent, tmp_path):
    """A parked record whose context was taken before the RAM last ran is never resumed
    (the guest would go on from an older vCPU over newer memory): set aside, its RAM
    kept under its name, which a new domain of the same name does not collide with."""
    agent, mem = lone_agent
    create(agent.address, "vm", ram_mb=8)
    agent.stop()
    record = tmp_path / "a" / "data" / "parked" / "vm.park"
    fields = msgpack.unpackb(record.read_bytes())
    record.write_bytes(msgpack.packb({**fields, "resumes": fields["resumes"] + 1}))
    agent.start()
    assert domains(agent.address) == {}
    assert [p.name for p in record.parent.iterdir()] == ["vm.broken"]
    assert "no vCPU context goes with its RAM" in agent.log_file.read_text()
    create(agent.address, "vm", ram_mb=8)
    wait_running_and_checking(agent.address, "vm")
    assert len(list(mem.glob("*.ram"))) == 2


@pytest.mark.parametrize("args,expected", [
    (("domain", "create", "x", "--ram-mb", "-1"), "--ram-mb must be > 0"),
    (("domain", "create", "x", "--seed", "-1"), "--seed must be >= 0"),
    (("domain", "create", "x", "--dirty-rate", "nan"), "dirty_rate must be a finite number"),
    (("domain", "create", "x", "--fill", "inf"), "fill must be a finite number"),
])
def test_bad_domain_settings(cluster, args, expected):
    r = pvmig(*args[:3], "--agent", cluster["a"].address, *args[3:])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert expected in r.stderr
    assert domains(cluster["a"].address) == {}


def test_unwritable_report_is_refused_before_migrating(cluster, tmp_path):
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=8)
    r = pvmig("migrate", "--source", a, "--dest", b, "--domain", "vm",
              "--report", "/nonexistent/dir/r.json")
    assert r.returncode == 1 and "cannot write the report to /nonexistent/dir/r.json" in r.stderr
    _only_on(a, b, "vm")


# ---- a coordinator that dies around the commit: recovery from the durable decision

def _migrate_dying_at(a: str, b: str, name: str, phase: str, tmp_path: Path) -> str:
    """A migration whose coordinator is SIGKILLed as it enters `phase`; its id."""
    env = {**os.environ, faults.COORDINATOR_DIES_AT.env: phase}
    proc = subprocess.run(
        [sys.executable, "-m", "pvmig", "migrate", "--source", a, "--dest", b, "--domain", name,
         "--report", str(tmp_path / f"{phase}.json")],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[-1] == {**events[-1], "event": "phase", "phase": phase}
    (mid,) = {e["migration"] for e in events if e.get("phase") == "begin"}
    return mid


def _record(agent: LocalAgent, mid: str) -> dict:
    return json.loads((Path(agent.dir) / "data" / "migrations" / f"{mid}.json").read_text())


def test_coordinator_dies_after_commit_the_agents_finish_it(cluster, tmp_path):
    """Killed between the source's commit and the destination's: the source has decided,
    so when the leases run out (3 s) the destination asks it, resumes the guest and the
    source copy goes. Before recovery existed, the destination discarded its copy and
    the guest ran nowhere."""
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=32)
    mid = _migrate_dying_at(a, b, "vm", "committed", tmp_path)
    assert query(a, "vm").state == "suspended"  # committed: it will not run here again
    eventually(lambda: "vm" not in domains(a), what="the source copy is destroyed")
    _only_on(b, a, "vm")
    assert _record(cluster["a"], mid)["state"] == "committed"
    assert _record(cluster["b"], mid)["role"] == "destination"


@pytest.fixture
def patient_cluster(make_cluster):
    """Agents that wait 10 minutes for a silent coordinator: only pvmig recover acts."""
    return make_cluster(session_timeout_s=600)


def _recover(a: str, b: str, mid: str) -> dict:
    r = pvmig("recover", "--migration", mid, "--source", a, "--dest", b, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.quick
def test_recover_after_commit_resumes_on_the_destination(patient_cluster, tmp_path):
    a, b = patient_cluster["a"].address, patient_cluster["b"].address
    create(a, "vm", ram_mb=32, dirty_rate=5000)
    mid = _migrate_dying_at(a, b, "vm", "committed", tmp_path)
    assert query(b, "vm").state == "incoming" and query(a, "vm").state == "suspended"
    out = _recover(a, b, mid)
    assert out == {"migration_id": mid, "decision": "committed", "runs_on": "destination",
                   "domain": "vm", "postcopy": ""}
    _only_on(b, a, "vm")
    assert _recover(a, b, mid) == out  # again: nothing changes
    _only_on(b, a, "vm")


@pytest.mark.parametrize("phase,decision", [
    ("begin", "unknown"),     # prepared on the destination, nothing begun at the source
    ("suspend", "aborted"),   # pre-copy done, the guest about to suspend
    ("final", "aborted"),     # suspended: the abort resumes it
])
def test_recover_before_commit_resumes_on_the_source(patient_cluster, tmp_path, phase,
                                                     decision):
    """No commit recorded: recovery aborts at the source (so that no late commit can
    land) and the destination discards."""
    a, b = patient_cluster["a"].address, patient_cluster["b"].address
    create(a, "vm", ram_mb=32, dirty_rate=5000)
    mid = _migrate_dying_at(a, b, "vm", phase, tmp_path)
    out = _recover(a, b, mid)
    assert out["decision"] == decision and out["runs_on"] == "source"
    _only_on(a, b, "vm")
    assert _recover(a, b, mid)["decision"] == "unknown"  # nothing left of it anywhere
    r = pvmig("recover", "--migration", "../etc", "--source", a, "--dest", b)
    assert r.returncode == 1 and "bad migration id '../etc'" in r.stderr


def test_destination_lost_after_commit_the_source_rolls_back(patient_cluster, tmp_path):
    """Committed, then the destination's agent dies and its waiting guest with it: the
    suspended source copy is the only one left, so recovery resumes it there."""
    a = patient_cluster["a"].address
    create(a, "vm", ram_mb=32, dirty_rate=5000)
    mid = _migrate_dying_at(a, patient_cluster["b"].address, "vm", "committed", tmp_path)
    patient_cluster["b"].kill()
    patient_cluster["b"].start()
    b = patient_cluster["b"].address
    out = _recover(a, b, mid)
    assert out["decision"] == "rolled-back" and out["runs_on"] == "source"
    _only_on(a, b, "vm")
    assert _record(patient_cluster["a"], mid)["state"] == "rolled-back"


@pytest.mark.parametrize("point,decision", [
    ("commit", "lost"),         # dies before its record: never committed, guest gone
    ("committed", "committed"),  # dies after it: the decision stands
])
def test_source_host_dies_at_commit_the_destination_copy_lives(tmp_path, monkeypatch,
                                                               point, decision):
    """The source's host crashes while committing (its guest, suspended, dies with it).
    The coordinator cannot know whether the commit was recorded, so it does not abort
    the destination: the destination's copy, whole, is the only one. Once the source's
    agent is back, recovery resumes that copy either way."""
    monkeypatch.setenv(faults.AGENT_DIES_AT.env, point)
    with local_cluster(tmp_path, session_timeout_s=600) as c:
        monkeypatch.delenv(faults.AGENT_DIES_AT.env)
        a, b = c["a"].address, c["b"].address
        create(a, "vm", ram_mb=32, dirty_rate=5000)
        r, data = migrate(a, b, "vm", tmp_path / "r.json")
        assert r.returncode == 1
        assert "not settled: run pvmig recover" in r.stderr, r.stderr
        assert "pvmig recover --migration" in data["abort-errors"][-1]
        assert query(b, "vm").state == "incoming"  # kept, not discarded
        c["a"].proc.wait(timeout=10)
        c["a"].start()
        out = _recover(c["a"].address, b, data["migration-id"])
        assert out["decision"] == decision and out["runs_on"] == "destination"
        _only_on(b, c["a"].address, "vm")


@contextmanager
def _agent_crashing_at(point: str, tmp_path: Path, monkeypatch):
    """Two agents that crash (alone: their guests live on) at `point`, and a migration
    of vm a -> b that ran into it, left for `pvmig recover`: the cluster and its report."""
    monkeypatch.setenv(faults.AGENT_CRASHES_AT.env, point)
    with local_cluster(tmp_path, session_timeout_s=600) as c:
        monkeypatch.delenv(faults.AGENT_CRASHES_AT.env)
        create(c["a"].address, "vm", ram_mb=32, dirty_rate=5000,
               disk=str(tmp_path / "vm.img"), disk_blocks=128, disk_io_rate=100)
        r, data = migrate(c["a"].address, c["b"].address, "vm", tmp_path / "r.json")
        assert r.returncode == 1 and "not settled: run pvmig recover" in r.stderr, r.stderr
        assert "pvmig recover --migration" in data["abort-errors"][-1]
        yield c, data


def _disk_intact(info: pb.DomainInfo) -> None:
    (vbd,) = [d for d in info.device_stats if d.kind == "vbd"]
    assert vbd.guest.get("read-failures", 0) == 0 and vbd.guest.get("errors", 0) == 0, vbd


def test_destination_agent_crashes_after_its_commit_the_guest_resumes_there(tmp_path,
                                                                             monkeypatch):
    """The destination's agent alone crashes between its commit record and the resume:
    its waiting guest has nothing to keep and ends, but the record it wrote first holds
    the migrated vCPU context, so its next start resumes the guest from the migrated
    RAM; recovery finds it running there and destroys the source copy."""
    with _agent_crashing_at("dest-committed", tmp_path, monkeypatch) as (c, data):
        c["b"].proc.wait(timeout=10)
        c["b"].start()
        assert "domain vm revived" in c["b"].log_file.read_text()
        a, b = c["a"].address, c["b"].address
        out = _recover(a, b, data["migration-id"])
        assert out["decision"] == "committed" and out["runs_on"] == "destination"
        info = _only_on(b, a, "vm")
        assert info.guest.resumes == 1
        _disk_intact(info)


def test_source_agent_crashes_after_its_commit_its_copy_is_held_for_a_rollback(
        tmp_path, monkeypatch):
    """The source's agent alone crashes just after recording the commit: its suspended
    guest preserves itself, and the restart holds that copy (the migration belongs to
    the destination now) instead of throwing it away. The destination then cannot
    commit (its disk refuses the record): recover discards it and rolls back to the
    held copy, which resumes at home."""
    with _agent_crashing_at("committed", tmp_path, monkeypatch) as (c, data):
        c["a"].proc.wait(timeout=10)
        c["a"].start()
        parked = Path(c["a"].dir) / "data" / "parked"
        assert [p.name for p in parked.iterdir()] == [f"{data['migration-id']}.held"]
        a, b = c["a"].address, c["b"].address
        assert "vm" not in domains(a)
        records = Path(c["b"].dir) / "data" / "migrations"
        shutil.rmtree(records)
        records.write_text("not a directory")
        try:
            out = _recover(a, b, data["migration-id"])
        finally:
            records.unlink()
            records.mkdir()
        assert out["decision"] == "rolled-back" and out["runs_on"] == "source", out
        info = _only_on(a, b, "vm")
        assert info.guest.resumes == 1
        _disk_intact(info)
        assert not list(parked.iterdir())
        assert _record(c["a"], data["migration-id"])["state"] == "rolled-back"


def test_source_agent_crashes_on_complete_its_held_copy_goes_by_itself(tmp_path,
                                                                          monkeypatch):
    """The source's agent alone crashes as it is told to destroy its copy (the guest
    runs at the destination already). Its restart holds the suspended copy, and with
    nobody running `pvmig recover` its watchdog asks the destination within a lease
    and frees the copy: nothing is left on the source."""
    monkeypatch.setenv(faults.AGENT_CRASHES_AT.env, "complete")
    with local_cluster(tmp_path, session_timeout_s=3) as c:
        monkeypatch.delenv(faults.AGENT_CRASHES_AT.env)
        create(c["a"].address, "vm", ram_mb=16, dirty_rate=2000)
        _, data = migrate(c["a"].address, c["b"].address, "vm", tmp_path / "r.json")
        assert data["committed"] is True
        c["a"].proc.wait(timeout=10)
        c["a"].start()
        assert "its copy is held until the migration settles" in c["a"].log_file.read_text()
        parked = Path(c["a"].dir) / "data" / "parked"
        eventually(lambda: not list(parked.glob("*.held")), what="the held copy freed")
        _only_on(c["b"].address, c["a"].address, "vm")
        assert not list(c["a"].mem_dir.glob("*.ram"))
        assert "settled by the source" in c["a"].log_file.read_text()


def test_destination_cannot_record_its_commit_the_source_rolls_back(cluster, tmp_path):
    """The destination's disk refuses its commit record after the source committed: it
    never resumed the guest, so the coordinator undoes the commit at once and the guest
    resumes at home, instead of staying suspended with nowhere to run."""
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=16)
    r, data = _migrate_unrecordable(cluster["b"], a, b, tmp_path)
    assert r.returncode == 1
    assert "cannot record the commit" in r.stderr and "settled" in r.stderr, r.stderr
    assert data["committed"] is False and "rolled-back" in data["recovered"]
    _only_on(a, b, "vm")
    (mid_record,) = (Path(cluster["a"].dir) / "data" / "migrations").glob("*.json")
    assert json.loads(mid_record.read_text())["state"] == "rolled-back"


@pytest.mark.parametrize("phase", ["begin", "stop-and-copy", "suspend", "final", "commit"])
def test_cancel_at_each_phase_before_commit(cluster, tmp_path, phase):
    """`pvmig cancel` while the coordinator is in `phase` (it stalls there 2 s): the
    migration ends aborted, the guest goes on at home, the destination has nothing."""
    a, b = cluster["a"].address, cluster["b"].address
    create(a, "vm", ram_mb=16, dirty_rate=3000)
    env = {**os.environ, faults.COORDINATOR_STALLS_AT.env: f"{phase}:2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvmig", "migrate", "--source", a, "--dest", b, "--domain", "vm",
         "--report", str(tmp_path / "r.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    mid = ""
    for line in proc.stdout:
        event = json.loads(line)
        mid = event.get("migration", mid)
        if event.get("phase") == phase:
            break
    _drain(proc)
    r = pvmig("cancel", "--migration", mid, "--agent", a, "--agent", b)
    assert r.returncode == 0, r.stderr
    assert proc.wait(timeout=60) == 1
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["status"] == "failed" and data["committed"] is False, data["error"]
    _only_on(a, b, "vm")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 24 MiB tmpfs: a destination whose memory file system is (nearly) full."""
    with tmpfs(tmp_path / "small", "24m") as where:
        yield where


def test_destination_memory_full(tmp_path, small_tmpfs):
    """The destination's memory file system has no room: refused at prepare, named;
    filled by something else after a first guest arrived, the next one is refused too,
    never a SIGBUS in the agent. The guest runs on at home each time."""
    a = LocalAgent("a", tmp_path).start()
    b = LocalAgent("b", tmp_path, mem_dir=small_tmpfs / "mem").start()
    try:
        create(a.address, "big", ram_mb=32)
        r, data = migrate(a.address, b.address, "big", tmp_path / "big.json")
        assert r.returncode == 1 and "MiB free, not 32 MiB for the guest's RAM" in r.stderr
        _only_on(a.address, b.address, "big")

        create(a.address, "small", ram_mb=8)
        r, data = migrate(a.address, b.address, "small", tmp_path / "small.json")
        assert r.returncode == 0, r.stderr
        (small_tmpfs / "filler").write_bytes(b"\0" * (14 << 20))  # the rest, nearly
        create(a.address, "next", ram_mb=8)
        r, data = migrate(a.address, b.address, "next", tmp_path / "next.json")
        assert r.returncode == 1 and "MiB free, not 8 MiB" in r.stderr, r.stderr
        _only_on(a.address, b.address, "next")
        _only_on(b.address, a.address, "small")
        assert b.running
    finally:
        a.stop()
        b.stop()
