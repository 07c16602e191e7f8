"""Who may talk to an agent: mutual TLS, a shared token, or nobody checks (loopback).

Mutual TLS: every agent and every coordinator holds a certificate from the cluster's
CA (`pvmig certs init`, `pvmig certs issue`); an agent refuses a connection without
one, and a client refuses an agent whose certificate does not name the address it
dialled. The page streams between agents use the same credentials, so they are
encrypted too. Token: every call carries `authorization: Bearer TOKEN` and the agent
compares it in constant time; it authenticates but does not encrypt, so it is meant for
one machine. The crypto is grpc's (BoringSSL) and the `cryptography` package's.
"""

from __future__ import annotations

import datetime as dt
import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pvmig import errors

OPEN_METHODS = ("/grpc.health.v1.Health/",)  # a liveness probe needs no identity
TOKEN_HEADER = "authorization"


@dataclass(frozen=True)
class Security:
    ca: bytes = b""
    cert: bytes = b""
    key: bytes = b""
    token: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.cert)

    def describe(self) -> str:
        if self.tls:
            return "mutual TLS" + (" and a token" if self.token else "")
        if self.token:
            return "a token (not encrypted)"
        return "plain text, no authentication"

    @classmethod
    def load(cls, *, ca: str | os.PathLike | None = None, cert: str | os.PathLike | None = None,
             key: str | os.PathLike | None = None,
             token_file: str | os.PathLike | None = None) -> "Security":
        """From files, each checked: TLS needs all three, a certificate in its validity
        period that the key belongs to and the CA signed."""
        given = [p for p in (ca, cert, key) if p]
        if given and len(given) != 3:
            raise errors.InvalidArgument(
                "mutual TLS needs --tls-ca, --tls-cert and --tls-key together")
        token = _read(token_file, "token file").decode().strip() if token_file else ""
        if token_file and not token:
            raise errors.InvalidArgument(f"token file {token_file} is empty")
        if not given:
            return cls(token=token)
        sec = cls(ca=_read(ca, "CA certificate"), cert=_read(cert, "certificate"),
                  key=_read(key, "private key"), token=token)
        _check_pair(sec, cert, key, ca)
        return sec

    @classmethod
    def from_env(cls) -> "Security":
        """PVMIG_TLS_CA, PVMIG_TLS_CERT, PVMIG_TLS_KEY, PVMIG_TOKEN_FILE."""
        env = os.environ.get
        return cls.load(ca=env("PVMIG_TLS_CA"), cert=env("PVMIG_TLS_CERT"),
                        key=env("PVMIG_TLS_KEY"), token_file=env("PVMIG_TOKEN_FILE"))

    # ---- grpc

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def client_interceptors(self) -> list:
        if not self.token:
            return []
        return [cls(self.token) for cls in (_TokenUnaryUnary, _TokenUnaryStream,
                                            _TokenStreamUnary, _TokenStreamStream)]

    def server_interceptors(self) -> list:
        return [_TokenServer(self.token)] if self.token else []


_default = Security()


def default() -> Security:
    """This process's identity for the calls it makes (set once, by the CLI)."""
    return _default


def set_default(sec: Security) -> None:
    global _default
    _default = sec


# ---- token

class _WithToken:
    """Adds the token to a call's metadata. grpc.aio files each client interceptor
    under one call type only, so there is one class per type below."""

    def __init__(self, token: str) -> None:
        self._header = (TOKEN_HEADER, f"Bearer {token}")

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(d.metadata or ()), self._header)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials,
                                          d.wait_for_ready)


class _TokenUnaryUnary(_WithToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _TokenUnaryStream(_WithToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _TokenStreamUnary(_WithToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _TokenStreamStream(_WithToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _TokenServer(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get(TOKEN_HEADER, "")
        if hmac.compare_digest(given.encode(), self._expected):
            return await continuation(details)
        why = "no token" if not given else "a wrong token"
        handler = await continuation(details)
        if handler is None:  # no such method: grpc says UNIMPLEMENTED, nothing is run
            return None
        return _refusal(handler,
                        f"{details.method}: refused, the call carried {why} "
                        "(give the agent's token with --token-file)")


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses the call."""
    async def abort(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kind = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}
    streams = (bool(handler.request_streaming), bool(handler.response_streaming))
    return kind[streams](abort_stream if streams[1] else abort,
                         request_deserializer=handler.request_deserializer,
                         response_serializer=handler.response_serializer)


# ---- certificates: `pvmig certs`

def init_ca(directory: Path, *, name: str = "pvmig cluster CA", days: int = 3650) -> Path:
    """A new CA: DIR/ca.pem and DIR/ca-key.pem (the key readable by its owner only)."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "ca-key.pem").exists():
        raise errors.AlreadyExists(f"{directory / 'ca-key.pem'} exists: a CA is there already")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_key(directory / "ca-key.pem", key)
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return directory / "ca.pem"


def issue(directory: Path, name: str, hosts: list[str], *, days: int = 825,
          out: Path | None = None) -> tuple[Path, Path]:
    """A certificate for an agent or a coordinator, signed by the CA in `directory`,
    good as a server (for each of `hosts`: names and IP addresses it is dialled at) and
    as a client. Writes OUT/NAME.pem and OUT/NAME-key.pem."""
    out = out or directory
    try:
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(),
                                                    password=None)
    except (OSError, ValueError) as e:
        raise errors.InvalidArgument(
            f"no usable CA in {directory} ({e}): run `pvmig certs init --dir {directory}`") from None
    sans: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts or [name]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out / f"{name}-key.pem", out / f"{name}.pem"
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_key(path: Path, key) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def _read(path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise errors.InvalidArgument(f"cannot read the {what} {path}: {e.strerror}") from None


def _check_pair(sec: Security, cert_path, key_path, ca_path) -> None:
    """What grpc would only say as a failed handshake, said here by name."""
    try:
        cert = x509.load_pem_x509_certificate(sec.cert)
    except ValueError:
        raise errors.InvalidArgument(f"{cert_path} is not a PEM certificate") from None
    try:
        ca = x509.load_pem_x509_certificate(sec.ca)
    except ValueError:
        raise errors.InvalidArgument(f"{ca_path} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(sec.key, password=None)
    except (ValueError, TypeError):
        raise errors.InvalidArgument(f"{key_path} is not an unencrypted PEM private key") from None
    now = _now()
    for c, path in ((cert, cert_path), (ca, ca_path)):
        if c.not_valid_after_utc < now:
            raise errors.InvalidArgument(
                f"certificate {path} expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: "
                "issue a new one (pvmig certs issue)")
        if c.not_valid_before_utc > now:
            raise errors.InvalidArgument(
                f"certificate {path} is not valid before "
                f"{c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (is this host's clock right?)")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.PEM, public)
            != cert.public_key().public_bytes(serialization.Encoding.PEM, public)):
        raise errors.InvalidArgument(f"{key_path} is not the key of {cert_path}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as e:  # InvalidSignature has no message
        raise errors.InvalidArgument(
            f"{cert_path} was not issued by the CA {ca_path} ({type(e).__name__}): "
            "use certificates of one cluster") from None
