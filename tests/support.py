"""Helpers for the end-to-end tests: agents as real processes, the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc

from pvmig._proto import pvmig_pb2 as pb
from pvmig._proto import pvmig_pb2_grpc as pb_grpc


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


def query(address: str, name: str) -> pb.DomainInfo:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.AgentStub(ch).QueryDomain(pb.DomainRef(name=name), timeout=10)


def domains(address: str) -> dict[str, pb.DomainInfo]:
    with grpc.insecure_channel(address) as ch:
        reply = pb_grpc.AgentStub(ch).ListDomains(pb.ListDomainsRequest(), timeout=10)
    return {d.name: d for d in reply.domains}


def wait_running_and_checking(address: str, name: str, timeout: float = 30.0) -> pb.DomainInfo:
    """Wait until the guest has made progress (steps and checks grow); return its info."""
    first = query(address, name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = query(address, name)
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


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]
