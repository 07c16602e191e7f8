"""Bad input over the wire (hypothesis): malformed, truncated, oversized, out-of-order,
duplicated and replayed messages, wrong migration ids and versions, sent to two real
agents. Each call gets a clear status (never an internal error), the agents stay up,
and the domain running on them all along is unharmed."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import create, domains, local_cluster, wait_running_and_checking

from pvmig._proto import pvmig_pb2 as pb

VICTIM = "victim-3e9c"  # a name no generated string will hit
SERVICES = [pb.DESCRIPTOR.services_by_name[n] for n in
            ("Agent", "MigrationSource", "MigrationDest")]
UNARY = [(s.full_name, m) for s in SERVICES for m in s.methods
         if not m.client_streaming and not m.server_streaming]
SERVER_STREAMING = [(s.full_name, m) for s in SERVICES for m in s.methods
                    if m.server_streaming]
# statuses that name what is wrong; INTERNAL would be a bug (an exception we did not
# expect), UNKNOWN likewise
CLEAR = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS,
         grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DATA_LOSS,
         grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE,
         grpc.StatusCode.UNAVAILABLE}  # UNAVAILABLE: a peer address that leads nowhere
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(tmp_path_factory.mktemp("fuzz"), session_timeout_s=5) as c:
        create(c["a"].address, VICTIM, ram_mb=16, dirty_rate=2000)
        yield c


def _ints(kind) -> st.SearchStrategy:
    bits = {F.TYPE_INT32: 31, F.TYPE_SINT32: 31, F.TYPE_SFIXED32: 31, F.TYPE_INT64: 63,
            F.TYPE_SINT64: 63, F.TYPE_SFIXED64: 63}
    if kind in bits:
        return st.integers(-(1 << bits[kind]), (1 << bits[kind]) - 1)
    width = 32 if kind in (F.TYPE_UINT32, F.TYPE_FIXED32) else 64
    return st.integers(0, (1 << width) - 1)


def _value(field, depth: int) -> st.SearchStrategy:
    t = field.type
    if t == F.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    if t == F.TYPE_STRING:
        return st.text(max_size=24) | st.sampled_from(["", "../x", "a" * 300, "fuzz-m"])
    if t == F.TYPE_BYTES:
        return st.binary(max_size=600)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return st.floats(allow_nan=True, allow_infinity=True, width=32 if t == F.TYPE_FLOAT else 64)
    if t == F.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    return _ints(t)


def _is_map(field) -> bool:
    return field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def messages(descriptor, depth: int = 0) -> st.SearchStrategy:
    """Well-formed messages of `descriptor` with arbitrary field values."""
    cls = pb.__dict__.get(descriptor.name)
    if depth > 2 or cls is None:
        return st.just(cls() if cls else None)
    fields = {}
    for f in descriptor.fields:
        if _is_map(f):
            key, val = (f.message_type.fields_by_name[n] for n in ("key", "value"))
            fields[f.name] = st.dictionaries(_value(key, depth), _value(val, depth),
                                             max_size=3)
            continue
        v = _value(f, depth)
        fields[f.name] = (st.lists(v, max_size=3) if f.is_repeated
                          else st.none() | v)

    @st.composite
    def build(draw):
        msg = cls()
        for name, strat in fields.items():
            value = draw(strat)
            if value is None or value == [] or value == {}:
                continue
            f = descriptor.fields_by_name[name]
            if _is_map(f):
                getattr(msg, name).update(value)
            elif f.type == F.TYPE_MESSAGE:
                if f.is_repeated:
                    getattr(msg, name).extend(value)
                else:
                    getattr(msg, name).CopyFrom(value)
            elif f.is_repeated:
                getattr(msg, name).extend(value)
            else:
                setattr(msg, name, value)
        return msg
    return build()


def _call(channel, service: str, method, request: bytes):
    path = f"/{service}/{method.name}"
    raw = (lambda b: b)
    if method.server_streaming:
        return list(channel.unary_stream(path, request_serializer=raw,
                                         response_deserializer=raw)(request, timeout=20))
    return channel.unary_unary(path, request_serializer=raw,
                               response_deserializer=raw)(request, timeout=20)


def _check(code: grpc.StatusCode, details: str, what: str) -> None:
    assert code in CLEAR, f"{what}: {code.name}: {details}"
    assert details and "internal error" not in details, f"{what}: {details}"


def _still_fine(cluster) -> None:
    for agent in (cluster["a"], cluster["b"]):
        assert agent.running, f"agent {agent.name} died: {agent.log_tail()}"
    assert domains(cluster["a"].address)[VICTIM].state == "running"


def _tidy(cluster) -> None:
    """Domains the fuzz legitimately created (a small valid CreateDomain) go."""
    with grpc.insecure_channel(cluster["a"].address) as ch_a, \
            grpc.insecure_channel(cluster["b"].address) as ch_b:
        for ch, agent in ((ch_a, cluster["a"]), (ch_b, cluster["b"])):
            for name in domains(agent.address):
                if name != VICTIM:
                    try:
                        _call(ch, "pvmig.v1.Agent", pb.DESCRIPTOR.services_by_name["Agent"]
                              .methods_by_name["DestroyDomain"],
                              pb.DomainRef(name=name).SerializeToString())
                    except grpc.RpcError:
                        pass  # an incoming one: discarded by its lease


# Hello, Clock, ListDomains and ListMigrations answer whatever they are sent (a wrong
# version is tried below): every other call is fuzzed
FUZZED = [(s, m) for s, m in UNARY + SERVER_STREAMING
          if m.name not in ("Hello", "Clock", "ListDomains", "ListMigrations")]


@pytest.mark.parametrize("service,method", FUZZED,
                         ids=[f"{s.split('.')[-1]}.{m.name}" for s, m in FUZZED])
def test_well_formed_nonsense_gets_a_clear_status(cluster, service, method):

    seen: dict = {}

    @FUZZ
    @given(messages(method.input_type))
    def run(msg):
        for agent in (cluster["a"], cluster["b"]):
            with grpc.insecure_channel(agent.address) as ch:
                try:
                    _call(ch, service, method, msg.SerializeToString())
                    code = "OK"
                except grpc.RpcError as e:
                    _check(e.code(), e.details(), f"{method.name}({msg})")
                    code = e.code().name
                seen[code] = seen.get(code, 0) + 1
    try:
        run()
    finally:
        _tidy(cluster)
    print(f"{method.name}: {seen}")
    assert sum(seen.values()) >= 60  # the fuzz ran: 30+ messages, each to both agents
    _still_fine(cluster)


@FUZZ
@given(st.sampled_from(UNARY + SERVER_STREAMING), st.binary(min_size=1, max_size=300))
def test_malformed_bytes_are_refused(cluster, target, data):
    """Bytes that are no protobuf at all (truncated, garbage) are refused by name; bytes
    that happen to parse find nothing that matches."""
    service, method = target
    with grpc.insecure_channel(cluster["b"].address) as ch:
        try:
            _call(ch, service, method, data)
        except grpc.RpcError as e:
            _check(e.code(), e.details(), f"{method.name}({data!r})")
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in e.details():
                assert e.details().startswith(f"malformed {method.input_type.name}: ")
    _still_fine(cluster)


def test_truncated_page_stream_record_is_refused(cluster):
    """A page stream whose record is cut short: INVALID_ARGUMENT, the stream ends."""
    record = pb.StreamRecord(migration_id="fuzz-x", pages=pb.PageBatch(
        seq=1, frames=b"\0\0\0\0", data=b"\1" * 4096)).SerializeToString()
    raw = (lambda b: b)
    with grpc.insecure_channel(cluster["b"].address) as ch:
        call = ch.stream_stream("/pvmig.v1.PageStream/Transfer", request_serializer=raw,
                                response_deserializer=raw)
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([record[:len(record) // 2]]), timeout=20))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("malformed StreamRecord: ")
    _still_fine(cluster)


def test_oversized_message_is_refused(cluster):
    with grpc.insecure_channel(cluster["b"].address) as ch:
        big = pb.DomainRef(name="x" * (17 << 20)).SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            _call(ch, "pvmig.v1.Agent", pb.DESCRIPTOR.services_by_name["Agent"]
                  .methods_by_name["QueryDomain"], big)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _still_fine(cluster)


@pytest.mark.quick
def test_out_of_order_duplicated_and_replayed_calls(cluster):
    """A migration's calls in the wrong order, twice, and after its end: each refused by
    name, and the victim on the same agent never touched."""
    a, b = cluster["a"].address, cluster["b"].address
    before = wait_running_and_checking(a, VICTIM)
    ref = pb.MigrationRef(migration_id="fuzz-order")
    from pvmig._proto import pvmig_pb2_grpc as pb_grpc
    with grpc.insecure_channel(a) as ch_a, grpc.insecure_channel(b) as ch_b:
        src, dst = pb_grpc.MigrationSourceStub(ch_a), pb_grpc.MigrationDestStub(ch_b)
        for call in (src.Suspend, src.Commit, src.Complete, src.Abort, src.Rollback,
                     dst.Commit, dst.Resume, dst.CommitAndResume, dst.Abort, dst.Ready):
            with pytest.raises(grpc.RpcError) as info:
                call(ref, timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND, call
        prep = pb.PrepareRequest(migration_id="fuzz-order", domain="fuzz-dom",
                                 ram_bytes=4 << 20, source_agent="a")
        dst.Prepare(prep, timeout=60)
        with pytest.raises(grpc.RpcError) as info:  # replayed
            dst.Prepare(prep, timeout=60)
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        for call in (dst.Commit, dst.CommitAndResume, dst.Ready):  # nothing streamed yet
            with pytest.raises(grpc.RpcError) as info:
                call(ref, timeout=10)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert dst.State(ref, timeout=10).status == pb.STATUS_RECEIVING
        # a Begin naming the victim with a bad policy: refused before anything is claimed
        with pytest.raises(grpc.RpcError) as info:
            src.Begin(pb.BeginRequest(migration_id="fuzz-order", domain=VICTIM,
                                      dest_address=b, quiesce=99), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown Quiesce policy number 99" in info.value.details()
        dst.Abort(ref, timeout=10)
        with pytest.raises(grpc.RpcError) as info:  # replayed after the end
            dst.Abort(ref, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert dst.State(ref, timeout=10).status == pb.STATUS_NONE
        # another protocol version
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.AgentStub(ch_a).Hello(pb.HelloRequest(protocol_version=1, client="old"),
                                          timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "speaks protocol version 1" in info.value.details()
    after = wait_running_and_checking(a, VICTIM)
    assert after.state == "running" and after.migration_id == ""
    assert after.guest.checks_failed == 0 and after.guest.steps > before.guest.steps


LIVE = "fuzz-live"


@pytest.fixture(scope="module")
def live(cluster):
    """An incoming migration prepared on b, its session kept alive by the fuzz."""
    from pvmig._proto import pvmig_pb2_grpc as pb_grpc
    with grpc.insecure_channel(cluster["b"].address) as ch:
        pb_grpc.MigrationDestStub(ch).Prepare(pb.PrepareRequest(
            migration_id=LIVE, domain="fuzz-incoming", ram_bytes=1 << 20, source_agent="a"),
            timeout=60)
    yield LIVE


def _records():
    batch = messages(pb.PageBatch.DESCRIPTOR)
    body = st.one_of(
        batch.map(lambda b: pb.StreamRecord(migration_id=LIVE, pages=b)),
        messages(pb.RoundEnd.DESCRIPTOR).map(lambda r: pb.StreamRecord(migration_id=LIVE,
                                                                       round_end=r)),
        messages(pb.StreamEnd.DESCRIPTOR).map(lambda e: pb.StreamRecord(migration_id=LIVE,
                                                                        end=e)),
        messages(pb.StreamRecord.DESCRIPTOR))
    return st.lists(body, min_size=1, max_size=4)


def test_page_stream_nonsense_on_a_live_migration(cluster, live):
    """Random records on the stream of a real prepared migration: batches with frames
    out of range, lengths that do not divide, bad checksums, unknown encodings, ends
    announcing any number of streams. A clear status or an acknowledgement, never an
    internal error; the agent and its incoming domain are still there."""
    seen: dict = {}
    raw = (lambda b: b)

    @FUZZ
    @given(_records())
    def run(records):
        with grpc.insecure_channel(cluster["b"].address) as ch:
            call = ch.stream_stream("/pvmig.v1.PageStream/Transfer",
                                    request_serializer=raw, response_deserializer=raw)
            try:
                list(call(iter([r.SerializeToString() for r in records]), timeout=20))
                code = "OK"
            except grpc.RpcError as e:
                _check(e.code(), e.details(), f"Transfer({records})")
                code = e.code().name
            seen[code] = seen.get(code, 0) + 1
    run()
    print(f"Transfer: {seen}")
    assert sum(seen.values()) >= 30 and len(seen) >= 2
    _still_fine(cluster)
    assert domains(cluster["b"].address)["fuzz-incoming"].state == "incoming"
