"""End to end: agents that require mutual TLS or a token. A migration with the right
credentials succeeds; a caller without a certificate, with one from another CA, or with
a wrong token is refused with a clear error, and the guest is untouched."""

from __future__ import annotations

import pytest
from support import local_cluster, migrate, pvmig, query, wait_running_and_checking

from pvmig.rpc.security import Security, init_ca, issue


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    init_ca(d / "ca")
    for name in ("a", "b", "coord"):
        issue(d / "ca", name, ["127.0.0.1"])
    init_ca(d / "other")
    issue(d / "other", "rogue", ["127.0.0.1"])
    return d


def tls(ca_dir, name: str) -> list[str]:
    return ["--tls-ca", str(ca_dir / "ca.pem"), "--tls-cert", str(ca_dir / f"{name}.pem"),
            "--tls-key", str(ca_dir / f"{name}-key.pem")]


@pytest.mark.quick
def test_mutual_tls(pki, tmp_path):
    ca = pki / "ca"
    coord = Security.load(ca=ca / "ca.pem", cert=ca / "coord.pem", key=ca / "coord-key.pem")
    with local_cluster(tmp_path, ["a", "b"], extra_args=lambda n: tls(ca, n),
                      security=coord) as c:
        a, b = c["a"].address, c["b"].address
        r = pvmig("domain", "create", "vm", "--agent", a, "--ram-mb", "32", "--disk",
                  str(tmp_path / "vm.img"), "--disk-latency-ms", "5", *tls(ca, "coord"))
        assert r.returncode == 0, r.stderr
        r, data = migrate(a, b, "vm", tmp_path / "r.json", *tls(ca, "coord"))
        assert r.returncode == 0, r.stderr
        assert data["verification"]["passed"] is True
        assert "mutual TLS" in c["a"].log_file.read_text()  # the agents say what they need

        before = query(b, "vm", coord)
        refusals = {
            "no certificate": pvmig("migrate", "--source", b, "--dest", a, "--domain", "vm"),
            "another CA": pvmig("migrate", "--source", b, "--dest", a, "--domain", "vm",
                                *tls(pki / "other", "rogue")),
            "listing": pvmig("domain", "list", "--agent", b),
        }
        for what, r in refusals.items():
            assert r.returncode == 1, (what, r.stdout)
        assert "give --tls-ca, --tls-cert and --tls-key" in refusals["no certificate"].stderr
        assert "TLS handshake failed" in refusals["another CA"].stderr
        # certificates that do not belong together never reach the network
        mixed = pvmig("domain", "list", "--agent", b, "--tls-ca", str(ca / "ca.pem"),
                      "--tls-cert", str(pki / "other" / "rogue.pem"),
                      "--tls-key", str(pki / "other" / "rogue-key.pem"))
        assert mixed.returncode == 1 and "was not issued by the CA" in mixed.stderr
        after = wait_running_and_checking(b, "vm", security=coord)
        assert after.state == "running" and after.guest.checks_failed == 0
        assert after.guest.resumes == before.guest.resumes  # nobody moved it
        assert "vm" not in {d for d in _names(a, coord)}


def _names(address: str, sec: Security) -> set[str]:
    from support import domains_as
    return set(domains_as(address, sec))


def test_token(tmp_path):
    (tmp_path / "token").write_text("correct horse\n")
    (tmp_path / "wrong").write_text("battery staple\n")
    good = Security.load(token_file=tmp_path / "token")
    with local_cluster(tmp_path, ["a", "b"],
                      extra_args=["--token-file", str(tmp_path / "token")]) as c:
        a, b = c["a"].address, c["b"].address
        auth = ["--token-file", str(tmp_path / "token")]
        r = pvmig("domain", "create", "vm", "--agent", a, "--ram-mb", "16", *auth)
        assert r.returncode == 0, r.stderr
        for bad in ([], ["--token-file", str(tmp_path / "wrong")]):
            r = pvmig("migrate", "--source", a, "--dest", b, "--domain", "vm", *bad)
            assert r.returncode == 1 and "refused" in r.stderr and "--token-file" in r.stderr, \
                r.stderr
        info = wait_running_and_checking(a, "vm", security=good)
        assert info.state == "running" and info.migration_id == ""
        r, data = migrate(a, b, "vm", tmp_path / "r.json", *auth)
        assert r.returncode == 0, r.stderr
        assert data["verification"]["passed"] is True
