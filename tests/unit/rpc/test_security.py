"""Certificates, their checks and the token (security.py), and the agent's settings."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support import ROOT

from pvmig import errors
from pvmig.cli.agent import AGENT_DEFAULTS, agent_settings
from pvmig.rpc.security import Security, init_ca, issue


@pytest.fixture
def ca(tmp_path):
    init_ca(tmp_path / "ca")
    return tmp_path / "ca"


def load(d, name, ca_dir=None):
    ca_dir = ca_dir or d
    return Security.load(ca=ca_dir / "ca.pem", cert=d / f"{name}.pem", key=d / f"{name}-key.pem")


def test_issued_certificates_name_their_hosts_and_load(ca):
    cert, key = issue(ca, "a", ["127.0.0.1", "host-a"])
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["host-a"]
    sec = load(ca, "a")
    assert sec.tls and sec.describe() == "mutual TLS"
    assert sec.server_credentials() is not None and sec.channel_credentials() is not None


def test_a_second_init_does_not_overwrite_the_ca(ca):
    with pytest.raises(errors.AlreadyExists, match="a CA is there already"):
        init_ca(ca)


def test_issue_without_a_ca_says_how_to_make_one(tmp_path):
    with pytest.raises(errors.InvalidArgument, match="pvmig certs init"):
        issue(tmp_path / "none", "a", [])


def test_a_certificate_of_another_ca_is_refused_by_name(ca, tmp_path):
    init_ca(tmp_path / "other")
    issue(tmp_path / "other", "rogue", [])
    with pytest.raises(errors.InvalidArgument, match="was not issued by the CA"):
        load(tmp_path / "other", "rogue", ca_dir=ca)


def test_a_key_of_another_certificate_is_refused(ca):
    issue(ca, "a", [])
    issue(ca, "b", [])
    with pytest.raises(errors.InvalidArgument, match="is not the key of"):
        Security.load(ca=ca / "ca.pem", cert=ca / "a.pem", key=ca / "b-key.pem")


def test_an_expired_certificate_names_its_date(ca):
    ca_key = serialization.load_pem_private_key((ca / "ca-key.pem").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=10))
            .not_valid_after(now - dt.timedelta(days=1)).sign(ca_key, hashes.SHA256()))
    (ca / "old.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (ca / "old-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(errors.InvalidArgument, match=r"old.pem expired on \d{4}-\d\d-\d\d"):
        load(ca, "old")


def test_partial_tls_flags_and_bad_files(ca, tmp_path):
    with pytest.raises(errors.InvalidArgument, match="together"):
        Security.load(ca=ca / "ca.pem")
    with pytest.raises(errors.InvalidArgument, match="cannot read the certificate"):
        Security.load(ca=ca / "ca.pem", cert=tmp_path / "nope.pem", key=ca / "ca-key.pem")
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(errors.InvalidArgument, match="is not a PEM certificate"):
        Security.load(ca=ca / "ca.pem", cert=tmp_path / "junk.pem", key=ca / "ca-key.pem")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(errors.InvalidArgument, match="token file .* is empty"):
        Security.load(token_file=tmp_path / "empty")


def test_token_mode(tmp_path):
    (tmp_path / "t").write_text("s3cret\n")
    sec = Security.load(token_file=tmp_path / "t")
    assert sec.token == "s3cret" and not sec.tls
    assert len(sec.client_interceptors()) == 4 and len(sec.server_interceptors()) == 1
    assert Security().describe() == "plain text, no authentication"


def args(**given):
    base = {k: None for k in AGENT_DEFAULTS}
    base["config"] = None
    base.update(given)
    return SimpleNamespace(**base)


def test_agent_settings_from_a_config_file_with_flags_winning(tmp_path):
    cfg = tmp_path / "a.toml"
    cfg.write_text('listen = "0.0.0.0:7000"\nname = "a"\ndata_dir = "/var/lib/pvmig"\n'
                   'storage_dir = "/mnt/shared"\nadvertise = "10.0.0.1:7000"\n'
                   '[tls]\nca = "ca.pem"\ncert = "a.pem"\nkey = "a-key.pem"\n')
    s = agent_settings(args(config=cfg, name="a2"))
    assert s["listen"] == "0.0.0.0:7000" and s["name"] == "a2"
    assert str(s["storage_dir"]) == "/mnt/shared" and s["tls_cert"] == "a.pem"
    assert s["session_timeout"] == 120.0


def test_agent_settings_refuse_what_is_wrong(tmp_path):
    with pytest.raises(errors.InvalidArgument, match="needs --listen"):
        agent_settings(args(name="a", data_dir=tmp_path))
    cfg = tmp_path / "bad.toml"
    cfg.write_text('listen = "x:1"\nlisten_port = 3\n')
    with pytest.raises(errors.InvalidArgument, match=r"unknown setting\(s\) \['listen_port'\]"):
        agent_settings(args(config=cfg))
    cfg.write_text('listen = "x:1\n')
    with pytest.raises(errors.InvalidArgument, match="not valid TOML"):
        agent_settings(args(config=cfg))
    with pytest.raises(errors.InvalidArgument, match="cannot read config"):
        agent_settings(args(config=tmp_path / "missing.toml"))
    with pytest.raises(errors.InvalidArgument, match="--session-timeout must be > 0"):
        agent_settings(args(listen="x:1", name="a", data_dir=tmp_path, session_timeout=0.0))


def test_the_shipped_example_config_reads():
    example = ROOT / "deploy" / "agent.toml"
    s = agent_settings(args(config=example))
    assert s["name"] == "host-a" and s["advertise"] == "host-a.lab:7000"
    assert s["tls_ca"] == "/etc/pvmig/ca.pem" and str(s["storage_dir"]) == "/mnt/pvmig-disks"


def test_a_wildcard_listener_advertises_a_name_not_0_0_0_0():
    from pvmig.agent.server import advertised
    assert not advertised("0.0.0.0", 7000).startswith("0.0.0.0")
    assert advertised("10.0.0.1", 7000) == "10.0.0.1:7000"
    assert advertised("::1", 7000) == "[::1]:7000"


def test_data_listener_and_transport_settings(tmp_path, capsys):
    cfg = tmp_path / "a.toml"
    cfg.write_text('listen = "0.0.0.0:7000"\nname = "a"\ndata_dir = "/d"\n'
                   'data_listen = "0.0.0.0:7001"\ntransport = "grpc"\n')
    s = agent_settings(args(config=cfg))
    assert s["data_listen"] == "0.0.0.0:7001" and s["transport"] == "grpc"
    s = agent_settings(args(config=cfg, data_listen="off", transport="tcp"))  # flags win
    assert s["data_listen"] == "off" and s["transport"] == "tcp"
    base = dict(listen="x:1", name="a", data_dir=tmp_path)
    assert agent_settings(args(**base))["transport"] == "tcp"  # the default
    with pytest.raises(errors.InvalidArgument, match="bad address 'nowhere': expected HOST:PORT"):
        agent_settings(args(**base, data_listen="nowhere"))
    with pytest.raises(errors.InvalidArgument, match=r"transport must be one of \['tcp', 'grpc'\]"):
        agent_settings(args(**base, transport="udp"))
    from pvmig.cli import main
    with pytest.raises(SystemExit):
        main.main(["agent", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "--data-listen HOST:PORT|off" in usage and "for firewalls" in usage
    assert "--transport {tcp,grpc}" in usage
