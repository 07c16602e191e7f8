"""Both agents profiled (py-spy, 100 Hz) over one migration of an all-written guest, the
samples summed by what the thread was in (docs/PERFORMANCE.md). Needs py-spy (pip).

    python docs/scripts/profile_agents.py RAM_MIB
"""
import collections
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pvmig.tools.cluster import LocalCluster

ram = int(sys.argv[1])
base = Path(tempfile.mkdtemp(prefix="pvmig-prof-"))
PV = [sys.executable, "-m", "pvmig"]
BUCKETS = [("send", "Connection.send"), ("recv", "Connection.recv_into"),
           ("batch checksum (xxh3)", "checksum (pvmig/migration/wire.py"),
           ("frame hashes (verification)", "hash_words"), ("zero check", "zero_rows"),
           ("journal", "ForeignWrites"), ("scatter/land", "Receiver.receive"),
           ("RAM setup (prepare: map and populate)", "_map (pvmig/hv/shm.py"),
           ("RAM release (destroy)", "unlink"), ("gather", "np.take")]
with LocalCluster(base / "c", ["a", "b"]) as c:
    a, b = c["a"].address, c["b"].address
    r = subprocess.run(PV + ["domain", "create", "vm", "--agent", a, "--ram-mb", str(ram),
                             "--dirty-rate", "0", "--fill", "1.0"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    time.sleep(1)
    spy = str(Path(sys.executable).with_name("py-spy"))
    spies = [subprocess.Popen([spy, "record", "--pid", str(c[n].proc.pid),
                               "--rate", "100", "--format", "raw", "--threads", "--nonblocking",
                               "-o", str(base / f"{n}.txt")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for n in ("a", "b")]
    time.sleep(1.5)
    rep = base / "r.json"
    subprocess.run(PV + ["migrate", "--source", a, "--dest", b, "--domain", "vm",
                         "--report", str(rep)], capture_output=True, text=True)
    d = json.loads(rep.read_text())
    r0 = d["rounds"][0]["duration-ms"]
    print(f"round 0 {ram / 1024 / (r0 / 1e3):.2f} GiB/s ({r0:.0f} ms), "
          f"total {d['total-time-ms']:.0f} ms, status {d['status']}")
    time.sleep(0.5)
    for s in spies:
        s.send_signal(signal.SIGINT)
    for s in spies:
        s.wait(timeout=60)
for n, side in (("a", "source"), ("b", "destination")):
    got = collections.Counter()
    total = 0
    for line in (base / f"{n}.txt").read_text().splitlines():
        stack, _, cnt = line.rpartition(" ")
        total += int(cnt)
        name = next((name for name, key in BUCKETS if key in stack),
                    "other (Python, event loop, gRPC)")
        got[name] += int(cnt)
    print(f"--- {side} agent: {total} samples at 100 Hz ({total / 100:.2f} thread-seconds)")
    for name, k in got.most_common():
        print(f"  {k / 100:6.2f} s  {100 * k / total:5.1f}%  {name}")
