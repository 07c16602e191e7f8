"""QEMU's own live migration of a paused guest over loopback: a real hypervisor's figures
for `pvmig bench --peer qemu` to print beside pvmig's, from the same run on the same machine.

Two QEMUs run on this host: a source, paused from the start (`-S`: no vCPU ever runs,
so RAM does not change and one pass moves it all), and a destination waiting for an
incoming migration. Each one's RAM is a file under /dev/shm. The source file is filled
first, either from pvmig's guest memory image, so that both move the same bytes, or
with a fixed mix of random and zero pages. The migration goes over TCP on 127.0.0.1,
and is driven and timed by QEMU, through QMP on unix sockets. At the end the two
backing files are compared, which shows that QEMU really moved the bytes.

TCG is enough: the guest never runs. The backing files are shared (share=on) only so
that this process can fill and compare them; QEMU's x-ignore-shared capability, which
would skip such RAM, stays off (its default), so every page goes over the socket. A
bare q35 machine also has small RAM blocks of its own (BIOS, option ROMs, ACPI tables:
520 KiB on 7.2), so QEMU's `ram-total-bytes` comes out a little above the guest's RAM.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
SHM = Path("/dev/shm")
POLL_S = 0.05
# QEMU caps a migration's bandwidth by default: query-migrate-parameters on 7.2 says
# max-bandwidth 134217728 (128 MiB/s; older releases had 32 MiB/s). A comparison with
# that cap left on would only measure the cap.
MAX_BANDWIDTH = 100 * GiB
CHUNK = 64 * MiB
START_S = 30.0           # QEMU up and its QMP socket answering
STOP_S = 5.0             # SIGTERM to exit, before SIGKILL
STDERR_TAIL = 2000       # characters of QEMU's stderr quoted in an error
# By default QEMU maps and faults in every page of RAM at start, outside the timed
# migration, as pvmig's agents populate guest RAM when they create it (a first touch costs
# ~12 us a page on these machines); prealloc=False is QEMU's own default, where the
# destination pays those faults inside the migration. It keeps what the file holds.
PREALLOC = True
# sockaddr_un's sun_path: 108 bytes including the NUL.
UNIX_PATH_MAX = 107


def available() -> str | None:
    """The peer is optional: bench compares with QEMU only where it is installed."""
    return shutil.which("qemu-system-x86_64")


def run(ram_bytes: int, content: Path | None, workdir: Path, *, multifd_channels: int = 0,
        timeout_s: float = 600.0, prealloc: bool = PREALLOC) -> dict:
    """Migrate a paused QEMU guest of `ram_bytes` over loopback and return QEMU's figures.

    `content` (a file of exactly `ram_bytes`) lets QEMU move the very bytes pvmig moved;
    without it the RAM is 75% random pages and 25% zero pages (seed 1), repeatable from
    run to run. `timeout_s` bounds the whole run, set-up and check included.
    """
    if ram_bytes <= 0 or ram_bytes % MiB:
        raise ValueError(f"ram_bytes must be a positive multiple of 1 MiB (QEMU's -m is "
                         f"in MiB here), got {ram_bytes}")
    if not 0 <= multifd_channels <= 255:  # QEMU's multifd-channels is a uint8
        raise ValueError(f"multifd_channels must be 0 (one stream) to 255, "
                         f"got {multifd_channels}")
    if content is not None:
        content = Path(content)
        if not content.is_file():
            raise ValueError(f"content {content} is not a file")
        size = content.stat().st_size
        if size != ram_bytes:
            raise ValueError(f"content {content} holds {size} bytes, but the guest's RAM "
                             f"is {ram_bytes}: QEMU must move the same bytes pvmig moved")
    binary = available()
    if binary is None:
        raise RuntimeError("qemu-system-x86_64 is not installed "
                           "(apt-get install qemu-system-x86)")
    deadline = time.monotonic() + timeout_s
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _check_room(ram_bytes)

    tag = f"pvmig-qemu-{os.getpid()}-{secrets.token_hex(4)}"
    src_mem, dst_mem = SHM / f"{tag}.src", SHM / f"{tag}.dst"
    _check_socket_path(workdir / f"{tag}.dst.qmp")
    qemus: list[_Qemu] = []
    try:
        _fill(src_mem, ram_bytes, content)
        # A fresh file reads as zeros: QEMU's destination skips writing a zero page to
        # RAM that is already zero, as it would on a real host.
        _create(dst_mem, ram_bytes).close()

        src = _Qemu("source", binary, src_mem, ram_bytes, workdir / f"{tag}.src",
                    prealloc=prealloc)
        qemus.append(src)
        dst = _Qemu("destination", binary, dst_mem, ram_bytes, workdir / f"{tag}.dst",
                    incoming=True, prealloc=prealloc)
        qemus.append(dst)
        src.connect(deadline)
        dst.connect(deadline)
        version = src.version

        if multifd_channels:
            for q in (src, dst):  # both ends must agree, before migrate-incoming
                q.execute("migrate-set-capabilities", deadline, capabilities=[
                    {"capability": "multifd", "state": True}])
                q.execute("migrate-set-parameters", deadline,
                          **{"multifd-channels": multifd_channels})
        src.execute("migrate-set-parameters", deadline, **{"max-bandwidth": MAX_BANDWIDTH})
        params = src.execute("query-migrate-parameters", deadline)
        if params.get("max-bandwidth") != MAX_BANDWIDTH:
            raise RuntimeError(f"QEMU (source) kept max-bandwidth "
                               f"{params.get('max-bandwidth')} after we set {MAX_BANDWIDTH}")

        # Port 0: the kernel picks a free port as QEMU listens (no window in which
        # another process could take one we picked); QEMU says which in query-migrate.
        dst.execute("migrate-incoming", deadline, uri="tcp:127.0.0.1:0")
        port = _listening_port(dst, deadline)
        src.execute("migrate", deadline, uri=f"tcp:127.0.0.1:{port}")

        info = _wait_migration(src, deadline)
        # The source may finish as its last bytes leave; the check needs them loaded.
        _wait_incoming(dst, deadline)
        for q in qemus:  # no QEMU touches either file while they are compared
            q.stop()
        identical = _identical(src_mem, dst_mem, deadline)
    finally:
        for q in qemus:
            q.stop()
        for p in (src_mem, dst_mem):
            p.unlink(missing_ok=True)

    ram = info.get("ram", {})
    total_ms = info.get("total-time", 0)
    seconds = total_ms / 1000
    return {
        "qemu-version": version,
        "status": info["status"],
        "total-time-ms": total_ms,
        "downtime-ms": info.get("downtime"),
        "setup-time-ms": info.get("setup-time"),
        "transferred-bytes": ram.get("transferred"),
        "ram-total-bytes": ram.get("total"),
        "normal-pages": ram.get("normal"),
        "duplicate-pages": ram.get("duplicate"),
        "mbps": ram.get("mbps"),
        "throughput-gib-s": ram.get("total", 0) / seconds / GiB if seconds else None,
        "wire-gib-s": ram.get("transferred", 0) / seconds / GiB if seconds else None,
        "multifd-channels": multifd_channels,
        "prealloc": prealloc,
        "identical": identical,
    }


# ---- the migration


def _listening_port(dst: _Qemu, deadline: float) -> int:
    info = dst.execute("query-migrate", deadline)
    for addr in info.get("socket-address", []):
        if addr.get("type") == "inet" and addr.get("port"):
            return int(addr["port"])
    raise RuntimeError(f"QEMU (destination) did not say which port it listens on: {info}"
                       f"{dst.stderr_tail()}")


def _wait_migration(src: _Qemu, deadline: float) -> dict:
    while True:
        info = src.execute("query-migrate", deadline)
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"QEMU's migration {status}: "
                               f"{info.get('error-desc', 'no reason given')}{src.stderr_tail()}")
        if time.monotonic() + POLL_S > deadline:
            try:
                src.execute("migrate_cancel", time.monotonic() + 5)
            except RuntimeError:
                pass  # it is being killed anyway
            raise RuntimeError(f"QEMU's migration did not complete in time (status {status}, "
                               f"{info.get('ram', {}).get('transferred', 0)} bytes sent)"
                               f"{src.stderr_tail()}")
        time.sleep(POLL_S)


def _wait_incoming(dst: _Qemu, deadline: float) -> None:
    while True:
        info = dst.execute("query-migrate", deadline)
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"QEMU (destination): incoming migration {status}: "
                               f"{info.get('error-desc', 'no reason given')}"
                               f"{dst.stderr_tail()}")
        if time.monotonic() + POLL_S > deadline:
            raise RuntimeError(f"QEMU (destination) still loading (status {status}) when the "
                               f"time ran out{dst.stderr_tail()}")
        time.sleep(POLL_S)


# ---- the backing files


def _check_room(ram_bytes: int) -> None:
    free = shutil.disk_usage(SHM).free
    if free < 2 * ram_bytes + 64 * MiB:
        raise RuntimeError(f"{SHM} has {free // MiB} MiB free; QEMU's source and "
                           f"destination RAM need {2 * ram_bytes // MiB} MiB")


def _create(path: Path, size: int):
    # O_EXCL: never write into a file someone else uses.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    f = os.fdopen(fd, "r+b")
    f.truncate(size)
    return f


def _fill(path: Path, ram_bytes: int, content: Path | None) -> None:
    with _create(path, ram_bytes) as out:
        if content is not None:
            with open(content, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK)
            return
        rng = np.random.default_rng(1)
        pages = ram_bytes // PAGE
        zero = np.zeros(pages, dtype=bool)
        zero[rng.permutation(pages)[:pages // 4]] = True
        per_chunk = CHUNK // PAGE
        for lo in range(0, pages, per_chunk):
            hi = min(lo + per_chunk, pages)
            block = np.frombuffer(bytearray(rng.bytes((hi - lo) * PAGE)), dtype=np.uint8)
            block = block.reshape(hi - lo, PAGE)
            block[zero[lo:hi]] = 0
            out.write(block.data)


def _identical(a: Path, b: Path, deadline: float) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    x = np.memmap(a, dtype=np.uint8, mode="r")
    y = np.memmap(b, dtype=np.uint8, mode="r")
    try:
        for lo in range(0, len(x), CHUNK):
            if time.monotonic() > deadline:
                raise RuntimeError("comparing QEMU's source and destination RAM took "
                                   "longer than the time left")
            if not np.array_equal(x[lo:lo + CHUNK], y[lo:lo + CHUNK]):
                return False
        return True
    finally:
        del x, y


# ---- one QEMU and its QMP


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise RuntimeError(f"QMP socket path too long for a unix socket "
                           f"({len(os.fsencode(path))} > {UNIX_PATH_MAX} bytes): {path}; "
                           f"use a shorter workdir")


class _Qemu:
    """One QEMU process and a QMP connection to it; stop() is safe to call twice."""

    def __init__(self, role: str, binary: str, mem: Path, ram_bytes: int, stem: Path,
                 incoming: bool = False, prealloc: bool = PREALLOC) -> None:
        self.role = role
        self.qmp_path = stem.with_name(stem.name + ".qmp")
        self.log_path = stem.with_name(stem.name + ".log")
        _check_socket_path(self.qmp_path)
        self.version = "?"
        self._sock: socket.socket | None = None
        self._reader = None
        self._ids = 0
        argv = [
            binary, "-S", "-nodefaults", "-nographic", "-display", "none",
            # QEMU 7.2 accepts memory-backend= on -machine (since 5.0); -m must then
            # equal the backend's size.
            "-machine", "q35,accel=tcg,memory-backend=mem",
            "-m", f"{ram_bytes // MiB}M",
            "-object", f"memory-backend-file,id=mem,size={ram_bytes},mem-path={mem},"
                       f"share=on,prealloc={'on' if prealloc else 'off'}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if incoming:
            argv += ["-incoming", "defer"]
        self._log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=self._log, stderr=subprocess.STDOUT)
        except OSError as e:
            self._log.close()
            self.log_path.unlink(missing_ok=True)
            raise RuntimeError(f"QEMU ({role}) did not start: {e}") from e

    def connect(self, deadline: float) -> None:
        """Wait for the QMP socket (QEMU makes it once it is set up), then negotiate."""
        until = min(deadline, time.monotonic() + START_S)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU ({self.role}) exited with status "
                                   f"{self.proc.returncode} as it started{self.stderr_tail()}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.qmp_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
            if time.monotonic() > until:
                raise RuntimeError(f"QEMU ({self.role}) did not open its QMP socket in "
                                   f"time{self.stderr_tail()}")
            time.sleep(0.02)
        self._sock = s
        self._reader = s.makefile("rb")
        greeting = self._read(until, "the QMP greeting")
        v = greeting.get("QMP", {}).get("version", {})
        q = v.get("qemu", {})
        self.version = f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}"
        if v.get("package"):
            self.version += f" ({v['package'].strip()})"
        self.execute("qmp_capabilities", until)

    def execute(self, command: str, deadline: float, **arguments) -> dict:
        """Run one QMP command and return its `return`; events in between are skipped."""
        if self._sock is None:
            raise RuntimeError(f"QEMU ({self.role}): no QMP connection for {command}")
        self._ids += 1
        request = {"execute": command, "id": self._ids}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.settimeout(max(0.1, deadline - time.monotonic()))
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as e:
            raise RuntimeError(f"QEMU ({self.role}): sending {command} failed: {e}"
                               f"{self.stderr_tail()}") from e
        while True:
            reply = self._read(deadline, command)
            if reply.get("id") != self._ids:
                continue  # an event (or, in theory, a stale reply)
            if "error" in reply:
                raise RuntimeError(f"QEMU ({self.role}): {command} failed: "
                                   f"{reply['error'].get('desc', reply['error'])}"
                                   f"{self.stderr_tail()}")
            return reply.get("return", {})

    def _read(self, deadline: float, what: str) -> dict:
        try:
            self._sock.settimeout(max(0.1, deadline - time.monotonic()))
            line = self._reader.readline()
        except (OSError, TimeoutError) as e:
            raise RuntimeError(f"QEMU ({self.role}) did not answer {what}: {e}"
                               f"{self.stderr_tail()}") from e
        if not line:
            raise RuntimeError(f"QEMU ({self.role}) closed QMP while we waited for {what} "
                               f"(exit status {self.proc.poll()}){self.stderr_tail()}")
        return json.loads(line)

    def stderr_tail(self) -> str:
        try:
            self._log.flush()
            text = self.log_path.read_text(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        return f"; QEMU ({self.role}) said: {text[-STDERR_TAIL:]}" if text else ""

    def stop(self) -> None:
        if self._sock is not None:
            self._reader.close()
            self._sock.close()
            self._sock = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        self.qmp_path.unlink(missing_ok=True)
        self.log_path.unlink(missing_ok=True)
