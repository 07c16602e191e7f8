"""Helpers for the end-to-end tests: agents as real processes, the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pvmig._proto import pvmig_pb2 as pb
from pvmig._proto import pvmig_pb2_grpc as pb_grpc
from pvmig.tools.cluster import LocalCluster


def send_in_thread(fn):
    """Run a sender beside the receiver (a socket pair's buffer is smaller than a
    batch): (its thread, a box that gets its "result" or its "error")."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:
            box["error"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, box


def pvmig(*args: str, timeout: float = 180.0) -> subprocess.CompletedProcess:
    """Run the real `pvmig` command line and capture what it says."""
    return subprocess.run([sys.executable, "-m", "pvmig", *args], capture_output=True,
                          text=True, timeout=timeout)


def create(address: str, name: str, ram_mb: int = 64, dirty_rate: float = 2000,
           fill: float = 0.75, **more) -> None:
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in more.items()]
    r = pvmig("domain", "create", name, "--agent", address, "--ram-mb", str(ram_mb),
              "--dirty-rate", str(dirty_rate), "--fill", str(fill), *extra)
    assert r.returncode == 0, r.stderr


def query(address: str, name: str, security=None) -> pb.DomainInfo:
    """The domain's info, asked as a client holding `security` (a pvmig Security)."""
    creds = security.channel_credentials() if security is not None else None
    metadata = [("authorization", f"Bearer {security.token}")] if security and security.token else None
    with (grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)) as ch:
        return pb_grpc.AgentStub(ch).QueryDomain(pb.DomainRef(name=name), timeout=10,
                                                 metadata=metadata)


def domains_as(address: str, security) -> dict[str, pb.DomainInfo]:
    creds = security.channel_credentials()
    with grpc.secure_channel(address, creds) as ch:
        reply = pb_grpc.AgentStub(ch).ListDomains(pb.ListDomainsRequest(), timeout=10)
    return {d.name: d for d in reply.domains}


def domains(address: str) -> dict[str, pb.DomainInfo]:
    with grpc.insecure_channel(address) as ch:
        reply = pb_grpc.AgentStub(ch).ListDomains(pb.ListDomainsRequest(), timeout=10)
    return {d.name: d for d in reply.domains}


def wait_running_and_checking(address: str, name: str, timeout: float = 30.0,
                              security=None) -> pb.DomainInfo:
    """Wait until the guest has made progress (steps and checks grow); return its info."""
    first = query(address, name, security)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = query(address, name, security)
        if (now.state == "running" and now.guest.steps > first.guest.steps
                and now.guest.checks_run > first.guest.checks_run):
            return now
    raise AssertionError(f"guest {name} on {address} made no progress: {now}")


def migrate(source: str, dest: str, domain: str, report: Path, *extra: str,
            timeout: float = 240.0) -> tuple[subprocess.CompletedProcess, dict | None]:
    r = pvmig("migrate", "--source", source, "--dest", dest, "--domain", domain,
              "--report", str(report), *extra, timeout=timeout)
    data = json.loads(report.read_text()) if report.exists() else None
    return r, data


def eventually(cond, timeout: float = 30.0, what: str = "") -> None:
    """Wait for a condition the test cannot be told of otherwise (polled, 5 times a second)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.2)


def start_peer(guest: str, stats: Path, *extra: str, rate: int = 100) -> subprocess.Popen:
    """`pvmig peer` against `guest`, keeping its figures in `stats`. It sends until it has
    followed the guest as many times as `--until-announced` says (or until SIGTERM with
    `--duration 0`), retransmits each request for 30 s (however slow the machine, it loses
    only what the guest does), then waits for what is outstanding and ends."""
    argv = [sys.executable, "-m", "pvmig", "peer", "--guest", guest,
            "--rate", str(rate), "--give-up", "30", "--stats", str(stats), *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def peer_stats(path: Path) -> dict:
    """A running `pvmig peer --stats`'s figures ({} until it has written any)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def scrape(address: str) -> dict:
    """An agent's Prometheus metrics: {(name, sorted labels): value}."""
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# ---- clusters beyond loopback (network namespaces, containers)

ROOT = Path(__file__).resolve().parent.parent


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def require(ok: bool, reason: str) -> None:
    """Skip a test whose needs (root, a Docker engine ...) this machine lacks; but in CI,
    where .ci/run installs them, a skip would hide a broken set-up, so fail there."""
    if ok:
        return
    if in_ci():
        pytest.fail(f"{reason} (CI=true: .ci/run should have provided it)", pytrace=False)
    pytest.skip(reason)


def interrupted(args: list[str], when: str, timeout: float = 120.0):
    """Run `pvmig ARGS`, send it SIGINT once its stderr has a line holding `when` (a
    fleet's line log: "t vm0 a->b migrating precopy"), and return (returncode, stdout,
    stderr): the event it waits on is the line, never a sleep."""
    proc = subprocess.Popen([sys.executable, "-m", "pvmig", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if when in line:
                break
        else:
            raise AssertionError(f"no line with {when!r} came: {''.join(seen)[-3000:]}")
        proc.send_signal(signal.SIGINT)
        err = "".join(seen) + proc.stderr.read()
        out = proc.stdout.read()
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def pvmig_command() -> str:
    """The pvmig of this interpreter, as one word for the deploy scripts' PVMIG."""
    script = Path(sys.executable).with_name("pvmig")
    return str(script) if script.exists() else f"{sys.executable} -m pvmig"


def run_via(wrapper: list[str], argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run argv through wrapper (`ip netns exec NS`, `docker exec C`), capturing output;
    a timeout says which command hung instead of a bare TimeoutExpired."""
    try:
        return subprocess.run([*wrapper, *argv], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{' '.join([*wrapper, *argv])} did not finish in {timeout:.0f} s; "
                             f"it said: {e.stdout!r} {e.stderr!r}") from None


class Via:
    """pvmig's command line run on another host: through a wrapper such as
    `ip netns exec NS` or `docker-compose exec -T SERVICE`, for agents this process
    cannot reach itself."""

    def __init__(self, wrapper: list[str], command: tuple[str, ...] | None = None) -> None:
        self.wrapper = list(wrapper)
        self.command = list(command or (sys.executable, "-m", "pvmig"))

    def argv(self, *args: str) -> list[str]:
        return [*self.wrapper, *self.command, *args]

    def pvmig(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return run_via(self.wrapper, [*self.command, *args], timeout)

    def domains(self, agent: str) -> list[dict]:
        r = self.pvmig("status", "--json", "--agent", agent, timeout=30)
        assert r.returncode == 0, f"pvmig status --agent {agent}: {r.stderr}"
        return json.loads(r.stdout)[agent]["domains"]

    def wait_domain(self, agent: str, name: str, ready, what: str,
                    timeout: float = 30.0) -> dict:
        """Poll the agent until ready(domain) holds; return the domain (status --json)."""
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            seen = next((d for d in self.domains(agent) if d["name"] == name), None)
            if seen is not None and ready(seen):
                return seen
            time.sleep(0.2)
        raise AssertionError(f"{name} on {agent}: {what} not seen in {timeout:.0f} s: {seen}")

    def wait_checking(self, agent: str, name: str, timeout: float = 30.0) -> dict:
        """Wait until the guest runs and its steps and checks grow; return the domain."""
        first = self.wait_domain(agent, name, lambda d: d["state"] == "running", "running",
                                 timeout)
        return self.wait_domain(agent, name, lambda d: (
            d["state"] == "running"
            and _counter(d, "steps") > _counter(first, "steps")
            and _counter(d, "checks_run") > _counter(first, "checks_run")),
            "steps and checks growing", timeout)


def _counter(domain: dict, key: str) -> int:
    return int(domain.get("guest", {}).get(key, 0))  # uint64 comes as a string in JSON


def device(domain: dict, kind: str) -> dict:
    """The domain's one device of this kind (vbd, vif), from status --json."""
    (d,) = [s for s in domain.get("device_stats", []) if s["kind"] == kind]
    return d


# ---- a two-host cluster in network namespaces (deploy/netns-cluster.sh)

NETNS_SCRIPT = ROOT / "deploy" / "netns-cluster.sh"


def netns_problem() -> str | None:
    """Why this machine cannot make the cluster, or None: probed with what the script uses
    (a namespace, a veth pair, a tbf qdisc), in a namespace of our own."""
    if os.geteuid() != 0:
        return "not root: network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found: install iproute2"
    probe = f"pvmig-probe-{os.getpid()}"
    steps = [["ip", "netns", "add", probe],
             ["ip", "-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
             ["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "v0", "root", "tbf",
              "rate", "1mbit", "burst", "32kb", "latency", "50ms"]]
    try:
        for argv in steps:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            if r.returncode != 0:
                return f"`{' '.join(argv)}` failed: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True, timeout=10)
    return None


def netns_script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(NETNS_SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PVMIG": pvmig_command()})


@contextlib.contextmanager
def netns_cluster_up(tmp_path, rate: str | None = None, agent_args: tuple = (),
                     hosts: int = 2):
    """Hosts a, b, ... in namespaces of their own prefix (a user's pvmig-a, pvmig-b are
    left alone): cluster.json, plus "on": {host: Via} to run pvmig on each."""
    problem = netns_problem()
    require(problem is None, str(problem))
    prefix = f"pvmig-t{os.getpid()}-"
    base = tmp_path / "cluster"
    where = ["--prefix", prefix, "--base", str(base)]
    try:
        shaped = ["--rate", rate] if rate else []
        extra = ["--", *agent_args] if agent_args else []
        up = netns_script("up", "--hosts", str(hosts), *shaped, *where, *extra)
        assert up.returncode == 0, f"netns-cluster.sh up failed:\n{up.stdout}{up.stderr}"
        cluster = json.loads((base / "cluster.json").read_text())
        cluster["on"] = {h: Via(["ip", "netns", "exec", ns])
                         for h, ns in cluster["namespaces"].items()}
        cluster["base"] = base
        yield cluster
    finally:
        for h in "abcdefghijklmnop"[:hosts]:  # shown when the test fails
            log = base / h / "agent.log"
            if log.exists():
                print(f"---- agent {h}\n" + "\n".join(log.read_text().splitlines()[-30:]))
        down = netns_script("down", *where)
        assert down.returncode == 0, f"netns-cluster.sh down failed:\n{down.stderr}"
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert prefix not in left, f"namespaces left behind: {left}"


@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    """A tmpfs of `size` (as mount's size=) mounted at `where` for the block: a file
    system that fills. Needs root: skipped without it, failed in CI."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    require(r.returncode == 0, f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)



# ---- agents as processes on this machine

@contextlib.contextmanager
def local_cluster(base: Path, names=("a", "b"), *, session_timeout_s: float | None = None,
                  extra_args=None, **agent_kwargs):
    """Started agents named `names` under `base` (pvmig.tools.cluster), stopped at the end.
    `session_timeout_s`: their lease (the default is 120 s); `extra_args`: more flags, or
    a function of an agent's name giving them."""
    lease = ["--session-timeout", str(session_timeout_s)] if session_timeout_s else []
    if callable(extra_args):
        given = extra_args
        args = lambda name: [*given(name), *lease]  # noqa: E731
    else:
        args = [*(extra_args or ()), *lease] or None
    with LocalCluster(Path(base), list(names), extra_args=args, **agent_kwargs) as c:
        yield c


# ---- fleets (pvmig evacuate, rebalance)

_SCRAPE = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
           "'http://' + sys.argv[1] + '/metrics', timeout=10).read().decode())")


class FleetProbe:
    """A fleet's agents as a test asks them, through a Via (Via([]): this machine; `ip
    netns exec`, `docker-compose exec`: a host of the cluster). agents: name ->
    (gRPC address, metrics address or None)."""

    def __init__(self, via: Via, agents: dict, python: str = sys.executable) -> None:
        self.via, self.agents, self.python = via, agents, python

    def status(self) -> dict:
        """name -> {"domains": [...], "migrations": [...]} (pvmig status --json)."""
        args = [a for address, _ in self.agents.values() for a in ("--agent", address)]
        r = self.via.pvmig("status", "--json", *args, timeout=60)
        assert r.returncode == 0, f"pvmig status: {r.stderr}"
        by_address = json.loads(r.stdout)
        return {n: by_address[address] for n, (address, _) in self.agents.items()}

    def metrics(self, name: str) -> dict:
        r = run_via(self.via.wrapper, [self.python, "-c", _SCRAPE,
                                       self.agents[name][1]], timeout=30)
        assert r.returncode == 0, f"scraping {name}'s metrics: {r.stderr}"
        return {(x.name, tuple(sorted(x.labels.items()))): x.value
                for family in text_string_to_metric_families(r.stdout)
                for x in family.samples}


def most_at_once(spans: list[tuple[int, int]]) -> int:
    """The most spans open at one instant, counted here apart from pvmig's own."""
    points = sorted([(b, 1) for b, _ in spans] + [(e, -1) for _, e in spans])
    most = now = 0
    for _, step in points:
        now += step
        most = max(most, now)
    return most


def check_fleet_result(result: dict, probe: FleetProbe, *, cluster_cap: int,
                       outbound_cap: int, metrics: bool = True) -> None:
    """What every fleet operation must show, asked of the agents themselves. Every
    domain it planned runs on exactly one host, its guest checking and clean; the caps
    held in the agents' ledgers; each agent's metrics say what the reports say (agents
    fresh for the test, every migration of one attempt)."""
    rows = result["migrations"]
    ids = {a["migration-id"] for row in rows for a in row["attempts"]}
    status = probe.status()
    # the caps, from each source's ledger
    spans, per_host = [], {}
    for name, seen in status.items():
        mine = [(int(m["began_unix_ns"]), int(m.get("ended_unix_ns", 0)))
                for m in seen["migrations"]
                if m["role"] == "source" and m["migration_id"] in ids]
        assert all(end for _, end in mine), f"{name}: a migration still open in its ledger"
        spans += mine
        per_host[name] = most_at_once(mine)
    assert len(spans) == len(ids), "each attempt in exactly one source's ledger"
    assert most_at_once(spans) <= cluster_cap, (most_at_once(spans), cluster_cap)
    assert max(per_host.values()) <= outbound_cap, (per_host, outbound_cap)
    assert result["observed"]["most-at-once"] == most_at_once(spans)
    # every domain once, where the report says, its guest clean
    where: dict[str, list] = {}
    for name, seen in status.items():
        for d in seen["domains"]:
            where.setdefault(d["name"], []).append((name, d))
    last = {row["domain"]: row for row in rows}  # (a domain may move more than once)
    for row in last.values():
        found = where.get(row["domain"], [])
        assert len(found) == 1, f"{row['domain']} on {[h for h, _ in found]}"
        host, info = found[0]
        assert host == (row["dest"] if row["state"] == "completed" else row["source"]), row
        assert info["state"] == "running" and _counter(info, "checks_failed") == 0, info
        probe.via.wait_checking(probe.agents[host][0], row["domain"])
    if not metrics:
        return
    for name in probe.agents:
        m = probe.metrics(name)
        out = [a for row in rows for a in row["attempts"] if row["source"] == name]
        came = [a for row in rows for a in row["attempts"] if a["dest"] == name]
        done = [a for a in out if a["status"] == "completed"]
        assert metric(m, "pvmig_migrations_started_total", role="source") == len(out), name
        assert metric(m, "pvmig_migrations_started_total", role="destination") == len(came)
        assert metric(m, "pvmig_migrations_ended_total", role="source",
                      outcome="completed") == len(done), name
        assert metric(m, "pvmig_migration_sent_bytes_total", kind="memory") == sum(
            a["transferred-bytes"] for a in out), name
        assert metric(m, "pvmig_migration_received_bytes_total", kind="memory") == sum(
            a["transferred-bytes"] for a in came), name
        assert metric(m, "pvmig_migration_downtime_seconds_count") == len(done), name
        assert metric(m, "pvmig_migration_downtime_seconds_sum") == pytest.approx(
            sum(a["downtime-ms"] for a in done) / 1e3, abs=1e-5), name
