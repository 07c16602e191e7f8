"""Addresses, channels and the handshake every pvmig connection starts with."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from pvmig import errors
from pvmig.rpc import security

PROTOCOL_VERSION = 4  # 4: data channels; 3: policies and states as proto enums
MAX_MESSAGE = 16 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    # A dead peer must be noticed even while a stream is idle between rounds.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A fixed receive window per stream instead of one BDP probing grows: the same
    # throughput here (bare gRPC, 4 streams: about 1.0 GiB/s either way) for 13-18 MiB of
    # buffering in a receiving agent instead of about 65 MiB (docs/PERFORMANCE.md).
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 4 << 20),
]
SERVER_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
]
CALL_TIMEOUT_S = 30.0


def parse_address(text: str, *, listen: bool = False) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT) -> (host, port); a clear error otherwise.
    Port 0 is allowed only for an address to listen on (the kernel picks one)."""
    host, sep, port = text.rpartition(":")
    lowest = 0 if listen else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) < 65536:
        raise errors.InvalidArgument(f"bad address {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def channel(address: str, sec: security.Security | None = None) -> grpc.aio.Channel:
    parse_address(address)
    sec = sec or security.default()
    creds = sec.channel_credentials()
    if creds is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS,
                                         interceptors=sec.client_interceptors())
    return grpc.aio.secure_channel(address, creds, options=CHANNEL_OPTIONS,
                                   interceptors=sec.client_interceptors())


def check_hello(reply, address: str) -> None:
    if reply.protocol_version != PROTOCOL_VERSION:
        raise errors.FailedPrecondition(
            f"agent at {address} speaks protocol version {reply.protocol_version}, "
            f"this pvmig speaks {PROTOCOL_VERSION}: run the same pvmig release on both")


def transport_hint(code: grpc.StatusCode, details: str, sec: security.Security) -> str:
    """What to fix when a call failed for want of the right credentials."""
    text = details.lower()
    if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN):
        return ""
    if "handshake" in text or "ssl" in text or "certificate" in text:
        return ("the TLS handshake failed: the agent's certificate and yours must come from "
                "one CA (pvmig certs), be within their validity, and the agent's must name "
                "the address dialled (pvmig certs issue --host)")
    if not sec.tls and ("socket closed" in text or "connection reset" in text):
        return "if the agent requires mutual TLS, give --tls-ca, --tls-cert and --tls-key"
    return ""


# ---- serving: requests that are no message of their type get a status that says so

class Malformed:
    """What a request that does not parse becomes: its handler refuses it by name
    (INVALID_ARGUMENT), where gRPC's own deserializer failure would answer UNKNOWN."""

    def __init__(self, type_name: str, problem: str) -> None:
        self.type_name, self.problem = type_name, problem

    def error(self) -> errors.InvalidArgument:
        return errors.InvalidArgument(f"malformed {self.type_name}: {self.problem}")


def _lenient(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return Malformed(cls.DESCRIPTOR.name, str(e))
    return parse


_HANDLER = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}


def handler(servicer, service) -> grpc.GenericRpcHandler:
    """The generated add_*_to_server, with requests parsed leniently (Malformed)."""
    methods = {}
    for m in service.methods:
        make = _HANDLER[(m.client_streaming, m.server_streaming)]
        methods[m.name] = make(
            getattr(servicer, m.name),
            request_deserializer=_lenient(GetMessageClass(m.input_type)),
            response_serializer=GetMessageClass(m.output_type).SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, methods)

