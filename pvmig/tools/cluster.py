"""Agents as processes on this machine, with named handles (Mininet's hosts, for agents).

    with LocalCluster(base_dir, ["a", "b"]) as cluster:
        cluster["a"].address   # "127.0.0.1:40123"
        cluster["b"].kill()    # a fault: SIGKILL, no goodbye (its guests live on)

Each agent listens on a port of its own choosing (port 0) and says which in its ready
file, so that nothing races for ports. Used by `pvmig demo` and the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pvmig.fleet.config import render

READY_TIMEOUT_S = 30.0


def agent_env() -> dict:
    """The agent's environment: glibc keeps a heap arena per thread that touches memory
    and does not give it back; two bound an agent's own memory (about 220 MiB at the peak
    of a 1 GiB migration with 8, 150 MiB with 2: docs/PERFORMANCE.md)."""
    return {**os.environ, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}


class LocalAgent:
    def __init__(self, name: str, base_dir: Path, *, bind: str = "127.0.0.1",
                 mem_dir: Path | None = None, extra_args=None, security=None) -> None:
        """extra_args: flags for the agent, or a function of its name giving them (its
        own certificate, say); security: what the readiness check presents."""
        self.name = name
        self.dir = Path(base_dir) / name
        self.bind = bind
        self._own_mem_root = mem_dir is None
        self.mem_dir = mem_dir or Path("/dev/shm") / f"pvmig-{uuid.uuid4().hex[:8]}" / name
        self.extra_args = (extra_args(name) if callable(extra_args) else extra_args) or []
        self.security = security
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.data_port: int | None = None
        self.metrics: str | None = None

    @property
    def ready_file(self) -> Path:
        return self.dir / "ready.json"

    @property
    def log_file(self) -> Path:
        return self.dir / "agent.log"

    def start(self) -> "LocalAgent":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "pvmig", "agent", "--listen", f"{self.bind}:0",
                "--name", self.name, "--data-dir", str(self.dir / "data"),
                "--mem-dir", str(self.mem_dir), "--ready-file", str(self.ready_file),
                *self.extra_args]
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=agent_env(),
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent {self.name} exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent {self.name} not ready in {timeout:.0f} s")
            time.sleep(0.02)
        ready = json.loads(self.ready_file.read_text())
        self.address = ready["address"]
        self.data_port = ready.get("data_port")  # None: --data-listen off
        self.metrics = ready.get("metrics")  # HOST:PORT of /metrics; None: not served
        creds = self.security.channel_credentials() if self.security is not None else None
        with (grpc.secure_channel(self.address, creds) if creds is not None
              else grpc.insecure_channel(self.address)) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="pvmig.v1.Agent"), timeout=timeout)
        if status.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"agent {self.name} is not serving: {status}")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text().splitlines()[-n:])
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_host()

    def kill(self) -> None:
        """SIGKILL the agent alone, as a crash of dom0: its guests outlive it and keep
        themselves for its next start (pvmig.host.parking)."""
        if self.running:
            self.proc.kill()
            self.proc.wait()

    def kill_host(self) -> None:
        """SIGKILL the agent and every guest it started, as a crash of the host."""
        if self.running:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def cleanup(self) -> None:
        shutil.rmtree(self.mem_dir.parent if self._own_mem_root else self.mem_dir,
                      ignore_errors=True)


class LocalCluster:
    def __init__(self, base_dir: Path, names: list[str], **agent_kwargs) -> None:
        shared_mem = Path("/dev/shm") / f"pvmig-{uuid.uuid4().hex[:8]}"
        self.mem_root = shared_mem
        self.agents = {n: LocalAgent(n, Path(base_dir), mem_dir=shared_mem / n, **agent_kwargs)
                       for n in names}

    def __getitem__(self, name: str) -> LocalAgent:
        return self.agents[name]

    def start(self) -> "LocalCluster":
        try:
            for agent in self.agents.values():
                agent.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        shutil.rmtree(self.mem_root, ignore_errors=True)

    def fleet_toml(self, labels: dict | None = None, **fleet_keys) -> str:
        """A fleet file naming these agents (pvmig evacuate --fleet); labels: by name."""
        return render([(n, a.address, (labels or {}).get(n, {}))
                       for n, a in self.agents.items()], **fleet_keys)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
