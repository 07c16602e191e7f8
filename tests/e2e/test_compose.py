"""End to end in containers: build the image offline (deploy/build-image.sh: a debootstrap
base, cached; this work tree's wheel), bring up deploy/docker-compose.yml under a project
of its own, move a busy guest with a disk on the shared volume and a NIC from container a
to container b and back while the net peer in the third container talks to it, and a
guest whose disk only its container has (its own storage dir) there and back with the
disk (--copy-storage); with a third agent (deploy/compose-agents.sh), evacuate a host of
four busy guests (pvmig evacuate); tear down with the volume.

Service names resolve only on the project's network, so every pvmig command runs in the
peer container (`docker-compose exec -T peer`): the coordinator is a machine on the
network like the agents, and each agent advertises its service name.
Needs root, a Docker engine, docker-compose and debootstrap; skipped without them,
failed without them in CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from support import ROOT, FleetProbe, Via, check_fleet_result, device, require, run_via

BUILD = ROOT / "deploy" / "build-image.sh"
COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"
MORE_AGENTS = ROOT / "deploy" / "compose-agents.sh"
IMAGE = "pvmig:e2e"  # not the user's pvmig:dev
RAM_MB = 64
A, B = "a:7000", "b:7000"


def _docker_problem() -> str | None:
    if os.geteuid() != 0:
        return "not root: debootstrap needs root to make the base image"
    for tool, package in (("docker", "docker.io"), ("docker-compose", "docker-compose"),
                          ("debootstrap", "debootstrap")):
        if shutil.which(tool) is None:
            return f"'{tool}' not found: install Debian's {package}"
    r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"no Docker engine answers `docker info` (start dockerd): {r.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def image():
    problem = _docker_problem()
    require(problem is None, str(problem))
    r = subprocess.run([str(BUILD), "--image", IMAGE], capture_output=True, text=True,
                       timeout=480, stdin=subprocess.DEVNULL,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, f"build-image.sh failed:\n{r.stderr[-4000:]}"
    return IMAGE


@contextlib.contextmanager
def compose_up(image, agents: int = 2):
    """The cluster under a project of its own, with `agents` agents (a, b: the compose
    file's; more from deploy/compose-agents.sh): the peer container's Via, with .hosts
    (each agent's container) and .fleet (a fleet file naming them, in the shared volume:
    /shared/fleet.toml)."""
    project = f"pvmige2e{os.getpid()}"
    files = ["-f", str(COMPOSE_FILE)]
    with tempfile.TemporaryDirectory() as tmp:
        fleet = Path(tmp) / "fleet.toml"
        more = Path(tmp) / "more.yml"
        r = subprocess.run([str(MORE_AGENTS), str(agents), "--fleet", str(fleet)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        more.write_text(r.stdout)
        if agents > 2:
            files += ["-f", str(more)]
        base = ["docker-compose", *files, "-p", project]
        env = {**os.environ, "PVMIG_IMAGE": image}
        names = "abcdefghijklmnop"[:agents]

        def dc(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
            return subprocess.run([*base, *args], capture_output=True, text=True,
                                  timeout=timeout, env=env, stdin=subprocess.DEVNULL)
        try:
            # up returns once the agents are healthy (their ready files): peer depends on it.
            up = dc("up", "-d")
            assert up.returncode == 0, f"docker-compose up failed:\n{up.stderr[-3000:]}"
            peer = Via([*base, "exec", "-T", "peer"], ("pvmig",))
            peer.hosts = {h: Via([*base, "exec", "-T", h], ()) for h in names}
            put = subprocess.run([*base, "exec", "-T", "peer", "sh", "-c",
                                  "cat > /shared/fleet.toml"], input=fleet.read_text(),
                                 capture_output=True, text=True, timeout=60, env=env)
            assert put.returncode == 0, put.stderr
            peer.fleet = "/shared/fleet.toml"
            yield peer
        finally:
            logs = dc("logs", "--no-color", "--tail", "30", *names, timeout=60)
            print(logs.stdout)  # shown when the test fails
            down = dc("down", "-v", "--remove-orphans", "--timeout", "10")
            assert down.returncode == 0, f"docker-compose down failed:\n{down.stderr}"
            left = subprocess.run(["docker", "ps", "-aq", "--filter",
                                   f"label=com.docker.compose.project={project}"],
                                  capture_output=True, text=True, timeout=30).stdout
            assert not left.strip(), f"containers left behind: {left}"


@pytest.fixture
def compose(image):
    with compose_up(image) as peer:
        yield peer


def read_shared(peer: Via, path: str) -> dict:
    r = run_via(peer.wrapper, ["cat", path], timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def numeric(peer: Via, address: str) -> str:
    """NAME:PORT as IP:PORT, resolved on the cluster's network. `pvmig peer` needs it:
    given a name it fails at its first send (uvloop's sendto takes no names)."""
    host, _, port = address.rpartition(":")
    r = run_via(peer.wrapper, ["getent", "hosts", host], timeout=30)
    assert r.returncode == 0 and r.stdout.split(), f"{host} does not resolve: {r.stderr}"
    return f"{r.stdout.split()[0]}:{port}"


def migrate(peer: Via, source: str, dest: str, report: str, *extra: str) -> dict:
    r = peer.pvmig("migrate", "--source", source, "--dest", dest, "--domain", "vm",
                   "--report", report, *extra, timeout=180)
    assert r.returncode == 0, f"migrate {source} -> {dest} failed:\n{r.stdout[-3000:]}{r.stderr}"
    data = read_shared(peer, report)
    assert data["status"] == "completed" and data["verification"]["passed"] is True, data
    assert data["verification"]["guest-checks"]["failed"] == 0, data["verification"]
    if "--postcopy" in extra:  # every frame after the resume (the info page with the switch)
        assert data["postcopy"]["total-pages"] == RAM_MB * 256 - 1, data["postcopy"]
        assert data["postcopy"]["requested-pages"] >= 1, data["postcopy"]
        assert 0 < data["downtime-ms"] < 3000, data
    else:
        assert data["rounds"][0]["pages"] == RAM_MB * 256  # round 0 sends every frame
        assert 0 < data["downtime-ms"] < 3000 and data["mbps"] > 0, data
    blk = next(d for d in data["devices"] if d["kind"] == "vbd")
    assert blk["replayed-on-dest"] == blk["inflight-at-suspend"], blk
    vif = next(d for d in data["devices"] if d["kind"] == "vif")
    # netback on the destination binds the guest's wire to that container's name.
    assert vif["address-on-dest"].startswith(dest.split(":")[0] + ":"), vif
    return data


@pytest.mark.timeout(600)
def test_compose_cluster_migrates_both_ways(compose):
    peer = compose
    r = peer.pvmig("domain", "create", "vm", "--agent", A, "--ram-mb", str(RAM_MB),
                   "--dirty-rate", "2000", "--disk", "/shared/vm.img", "--disk-blocks", "256",
                   "--disk-latency-ms", "5", "--disk-io-rate", "200", "--vif")
    assert r.returncode == 0, r.stderr
    booted = peer.wait_checking(A, "vm")
    guest_on_a = device(booted, "vif")["address"]
    assert guest_on_a.startswith("a:"), guest_on_a

    # The net peer runs in its own container; `exec` ends when it does: once it has
    # followed the guest to b and home again (--until-announced 2).
    talk = subprocess.Popen(peer.argv("peer", "--guest", numeric(peer, guest_on_a), "--rate", "100",
                                      "--duration", "0",
                                      "--until-announced", "2", "--give-up", "30"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        peer.wait_domain(A, "vm",
                         lambda d: int(device(d, "vif")["guest"].get("requests", 0)) > 0,
                         "the guest answering the peer")
        there = migrate(peer, A, B, "/shared/there.json")
        assert peer.domains(A) == []
        peer.wait_checking(B, "vm")
        # Home by post-copy (the containers have CAP_SYS_PTRACE: userfaultfd), the
        # guest's first reads after resume served on the urgent lane.
        back = migrate(peer, B, A, "/shared/back.json", "--postcopy",
                       "--inject", "push-after-fault")
        assert peer.domains(B) == []
        out, err = talk.communicate(timeout=180)
    finally:
        if talk.poll() is None:
            talk.kill()
            talk.wait()
    print(f"a -> b: {there['mbps']} Mbit/s, downtime {there['downtime-ms']} ms, "
          f"{there['dirty-sync-count']} rounds; b -> a (post-copy): downtime "
          f"{back['downtime-ms']} ms, {back['postcopy']}")

    assert talk.returncode == 0, (out, err)
    final = json.loads(out)
    assert final["sent"] > 0 and final["lost"] == 0 and final["answered"] == final["sent"]
    home = peer.wait_checking(A, "vm")
    # The peer followed the guest to b and home again, by the announcements alone.
    assert final["announcements"] >= 2, final
    assert final["target"] == numeric(peer, device(home, "vif")["address"]), final
    assert int(home["guest"].get("checks_failed", 0)) == 0


@pytest.mark.timeout(600)
def test_compose_disk_only_one_host_has_moves_there_and_back(compose):
    """Each agent's storage dir is its container's own file system: a disk there is on
    no other host. It moves with the guest, under I/O, and the source's image is removed
    once each move is complete."""
    peer = compose
    images = {h: lambda h=h: run_via(peer.hosts[h].wrapper, ["ls", "/var/lib/pvmig/storage"],
                                     timeout=30).stdout.split() for h in ("a", "b")}
    r = peer.pvmig("domain", "create", "vm", "--agent", A, "--ram-mb", str(RAM_MB),
                   "--dirty-rate", "2000", "--disk", "vm.img", "--disk-blocks", "1024",
                   "--disk-fill", "0.5", "--disk-latency-ms", "5", "--disk-io-rate", "300")
    assert r.returncode == 0, r.stderr
    peer.wait_checking(A, "vm")
    assert images["a"]() == ["vm.img"] and images["b"]() == []
    for source, dest, name in ((A, B, "b"), (B, A, "a")):
        r = peer.pvmig("migrate", "--source", source, "--dest", dest, "--domain", "vm",
                       "--report", f"/shared/disk-{name}.json", "--copy-storage",
                       "--remove-source-storage", timeout=180)
        assert r.returncode == 0, f"migrate to {name} failed:\n{r.stdout[-3000:]}{r.stderr}"
        data = read_shared(peer, f"/shared/disk-{name}.json")
        assert data["verification"]["passed"] is True, data["verification"]
        s = data["storage"]
        assert s["verdict"]["unexplained"] == 0 and s["source-image"] == "removed", s
        assert s["storage-rounds"][0]["blocks"] == 1024 and s["bytes-ratio"] >= 0.5, s
        assert images[name]() == ["vm.img"] and images["a" if name == "b" else "b"]() == []
        (vbd,) = [d for d in data["devices"] if d["kind"] == "vbd"]
        assert vbd["guest-checks"]["read-failures"] == 0 and vbd["guest-checks"]["errors"] == 0
        peer.wait_checking(dest, "vm")
    home = peer.wait_checking(A, "vm")
    blk = device(home, "vbd")["guest"]
    assert int(blk["resumes"]) == 2 and int(blk.get("read_failures", 0)) == 0
    assert int(blk.get("reads_checked", 0)) > 0 and int(home["guest"].get("checks_failed", 0)) == 0


@pytest.mark.timeout(600)
def test_compose_evacuates_a_host_of_three(image):
    """Three agents; four busy guests (memory at 2000 pages/s, a disk on the shared
    volume under I/O) leave a, at most 2 at once: each runs once and clean at the end,
    the caps held in the agents' ledgers, the metrics match the report."""
    with compose_up(image, agents=3) as peer:
        for i in range(4):
            r = peer.pvmig("domain", "create", f"vm{i}", "--agent", A, "--ram-mb",
                           str(RAM_MB), "--dirty-rate", "2000", "--disk",
                           f"/shared/vm{i}.img", "--disk-io-rate", "100")
            assert r.returncode == 0, r.stderr
        put = run_via(peer.wrapper, ["sh", "-c", "sed -i 's/^\\[fleet\\]$/[fleet]\\n"
                                     "parallel_migrations = 2\\nparallel_outbound_per_host"
                                     " = 2/' /shared/fleet.toml && cat /shared/fleet.toml"],
                      timeout=30)
        assert put.returncode == 0 and "parallel_migrations = 2" in put.stdout, put
        r = peer.pvmig("evacuate", "a", "--fleet", peer.fleet, "--report",
                       "/shared/evacuate.json", timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        result = read_shared(peer, "/shared/evacuate.json")
        assert result["status"] == "completed" and result["census-ok"], result
        assert {row["dest"] for row in result["migrations"]} == {"b", "c"}
        probe = FleetProbe(peer, {h: (f"{h}:7000", f"{h}:9100") for h in "abc"},
                           python="python3")
        check_fleet_result(result, probe, cluster_cap=2, outbound_cap=2)
