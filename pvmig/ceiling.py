"""The transport's ceiling: raw TCP between two processes, moving a guest's worth of bytes.

`pvmig bench` measures pvmig against this in the same run. Like a migration, one
process reads the bytes out of a shared-memory file and sends them on N connections,
another receives them straight into a shared-memory file of its own; nothing else is
done with them (no batching, checksums, hashing, gRPC or HTTP/2). The sender is this
process's child, the receiver another: two processes, as two agents.

    python -m pvmig.ceiling recv PORT_FILE DEST_FILE STREAMS
    python -m pvmig.ceiling send HOST:PORT SRC_FILE STREAMS
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .shm import SharedFile

CHUNK = 1 << 20


def measure(nbytes: int, streams: int, workdir: Path, *, host: str = "127.0.0.1") -> dict:
    """Move `nbytes` from one process to another on `streams` TCP connections; the
    receiver's clock from the first byte accepted to the last byte in its memory."""
    workdir.mkdir(parents=True, exist_ok=True)
    src, dst, port_file = workdir / "ceiling.src", workdir / "ceiling.dst", workdir / "port"
    fill = SharedFile.create(src, nbytes)
    try:
        rng = np.random.default_rng(1)
        fill.bytes[:] = rng.integers(0, 256, nbytes, dtype=np.uint8)
    finally:
        fill.close()
    port_file.unlink(missing_ok=True)
    recv = subprocess.Popen([sys.executable, "-m", "pvmig.ceiling", "recv", str(port_file),
                             str(dst), str(nbytes), str(streams)], stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if recv.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the ceiling's receiver did not start")
            time.sleep(0.01)
        port = int(port_file.read_text())
        send = subprocess.run([sys.executable, "-m", "pvmig.ceiling", "send",
                               f"{host}:{port}", str(src), str(streams)], timeout=600)
        out, _ = recv.communicate(timeout=600)
        if send.returncode or recv.returncode:
            raise RuntimeError(f"the ceiling's sender or receiver failed "
                               f"({send.returncode}, {recv.returncode})")
        result = json.loads(out)
        result["identical"] = _same(src, dst)
    finally:
        if recv.poll() is None:
            recv.kill()
        for p in (src, dst):
            p.unlink(missing_ok=True)
    result["gib_per_s"] = nbytes / result["seconds"] / (1 << 30)
    result["streams"] = streams
    return result


def _same(a: Path, b: Path) -> bool:
    """Whether the receiver holds exactly what was sent: a ceiling that lost bytes would
    flatter nobody."""
    x, y = SharedFile.open(a), SharedFile.open(b)
    try:
        return x.size == y.size and all(
            np.array_equal(x.bytes[lo:lo + (64 << 20)], y.bytes[lo:lo + (64 << 20)])
            for lo in range(0, x.size, 64 << 20))
    finally:
        x.close()
        y.close()


def _spans(nbytes: int, streams: int) -> list[tuple[int, int]]:
    step = -(-nbytes // streams)
    return [(lo, min(lo + step, nbytes)) for lo in range(0, nbytes, step)]


def _recv(port_file: str, dst: str, nbytes: int, streams: int) -> None:
    mem = SharedFile.create(dst, nbytes)
    view = memoryview(mem.bytes)
    srv = socket.create_server(("127.0.0.1", 0))
    srv.listen(streams)
    Path(port_file).write_text(str(srv.getsockname()[1]))
    conns = [srv.accept()[0] for _ in range(len(_spans(nbytes, streams)))]
    started = time.monotonic()

    def drain(conn: socket.socket, lo: int, hi: int) -> None:
        while lo < hi:
            n = conn.recv_into(view[lo:min(hi, lo + CHUNK)])
            if not n:
                raise ConnectionError("sender went away")
            lo += n

    threads = [threading.Thread(target=drain, args=(c, *span))
               for c, span in zip(conns, _spans(nbytes, streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"seconds": time.monotonic() - started, "bytes": nbytes}))


def _send(address: str, src: str, streams: int) -> None:
    mem = SharedFile.open(src)
    data = memoryview(mem.bytes)
    host, _, port = address.rpartition(":")
    spans = _spans(len(data), streams)
    conns = [socket.create_connection((host, int(port))) for _ in spans]

    def pour(conn: socket.socket, lo: int, hi: int) -> None:
        for at in range(lo, hi, CHUNK):
            conn.sendall(data[at:min(hi, at + CHUNK)])
        conn.close()

    threads = [threading.Thread(target=pour, args=(c, *span)) for c, span in zip(conns, spans)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "recv":
        _recv(rest[0], rest[1], int(rest[2]), int(rest[3]))
    else:
        _send(rest[0], rest[1], int(rest[2]))
