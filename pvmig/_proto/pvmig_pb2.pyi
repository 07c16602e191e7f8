from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Quiesce(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUIESCE_DEFAULT: _ClassVar[Quiesce]
    QUIESCE_NONE: _ClassVar[Quiesce]
    QUIESCE_BACKEND: _ClassVar[Quiesce]

class Recovery(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECOVERY_DEFAULT: _ClassVar[Recovery]
    RECOVERY_REPLAY: _ClassVar[Recovery]
    RECOVERY_NAIVE: _ClassVar[Recovery]

class PersistentGrants(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PERSISTENT_GRANTS_AS_NEGOTIATED: _ClassVar[PersistentGrants]
    PERSISTENT_GRANTS_ON: _ClassVar[PersistentGrants]
    PERSISTENT_GRANTS_OFF: _ClassVar[PersistentGrants]

class GrantMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRANT_MODE_AS_CREATED: _ClassVar[GrantMode]
    GRANT_MODE_MAP: _ClassVar[GrantMode]
    GRANT_MODE_COPY: _ClassVar[GrantMode]

class PostcopyDom0(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POSTCOPY_DOM0_DEFAULT: _ClassVar[PostcopyDom0]
    POSTCOPY_DOM0_DEMAND: _ClassVar[PostcopyDom0]
    POSTCOPY_DOM0_UNSAFE: _ClassVar[PostcopyDom0]

class StorageMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STORAGE_MODE_DEFAULT: _ClassVar[StorageMode]
    STORAGE_MODE_BACKGROUND: _ClassVar[StorageMode]
    STORAGE_MODE_WRITE_BLOCKING: _ClassVar[StorageMode]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_DEFAULT: _ClassVar[Compression]
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_ZSTD: _ClassVar[Compression]

class Transport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSPORT_DEFAULT: _ClassVar[Transport]
    TRANSPORT_TCP: _ClassVar[Transport]
    TRANSPORT_GRPC: _ClassVar[Transport]

class MigrationStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[MigrationStatus]
    STATUS_UNKNOWN: _ClassVar[MigrationStatus]
    STATUS_NONE: _ClassVar[MigrationStatus]
    STATUS_RECEIVING: _ClassVar[MigrationStatus]
    STATUS_READY: _ClassVar[MigrationStatus]
    STATUS_COMMITTED: _ClassVar[MigrationStatus]
    STATUS_RESUMED: _ClassVar[MigrationStatus]
    STATUS_ABORTED: _ClassVar[MigrationStatus]
    STATUS_ROLLED_BACK: _ClassVar[MigrationStatus]
    STATUS_LOST: _ClassVar[MigrationStatus]
    STATUS_POSTCOPY_ACTIVE: _ClassVar[MigrationStatus]
    STATUS_POSTCOPY_PAUSED: _ClassVar[MigrationStatus]
QUIESCE_DEFAULT: Quiesce
QUIESCE_NONE: Quiesce
QUIESCE_BACKEND: Quiesce
RECOVERY_DEFAULT: Recovery
RECOVERY_REPLAY: Recovery
RECOVERY_NAIVE: Recovery
PERSISTENT_GRANTS_AS_NEGOTIATED: PersistentGrants
PERSISTENT_GRANTS_ON: PersistentGrants
PERSISTENT_GRANTS_OFF: PersistentGrants
GRANT_MODE_AS_CREATED: GrantMode
GRANT_MODE_MAP: GrantMode
GRANT_MODE_COPY: GrantMode
POSTCOPY_DOM0_DEFAULT: PostcopyDom0
POSTCOPY_DOM0_DEMAND: PostcopyDom0
POSTCOPY_DOM0_UNSAFE: PostcopyDom0
STORAGE_MODE_DEFAULT: StorageMode
STORAGE_MODE_BACKGROUND: StorageMode
STORAGE_MODE_WRITE_BLOCKING: StorageMode
COMPRESSION_DEFAULT: Compression
COMPRESSION_NONE: Compression
COMPRESSION_ZSTD: Compression
TRANSPORT_DEFAULT: Transport
TRANSPORT_TCP: Transport
TRANSPORT_GRPC: Transport
STATUS_UNSPECIFIED: MigrationStatus
STATUS_UNKNOWN: MigrationStatus
STATUS_NONE: MigrationStatus
STATUS_RECEIVING: MigrationStatus
STATUS_READY: MigrationStatus
STATUS_COMMITTED: MigrationStatus
STATUS_RESUMED: MigrationStatus
STATUS_ABORTED: MigrationStatus
STATUS_ROLLED_BACK: MigrationStatus
STATUS_LOST: MigrationStatus
STATUS_POSTCOPY_ACTIVE: MigrationStatus
STATUS_POSTCOPY_PAUSED: MigrationStatus

class HelloRequest(_message.Message):
    __slots__ = ("protocol_version", "client")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    client: str
    def __init__(self, protocol_version: _Optional[int] = ..., client: _Optional[str] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("protocol_version", "agent_name", "instance_id", "capabilities", "advertise", "max_ram_bytes")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_FIELD_NUMBER: _ClassVar[int]
    MAX_RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    agent_name: str
    instance_id: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    advertise: str
    max_ram_bytes: int
    def __init__(self, protocol_version: _Optional[int] = ..., agent_name: _Optional[str] = ..., instance_id: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., advertise: _Optional[str] = ..., max_ram_bytes: _Optional[int] = ...) -> None: ...

class ClockRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClockReply(_message.Message):
    __slots__ = ("monotonic_ns",)
    MONOTONIC_NS_FIELD_NUMBER: _ClassVar[int]
    monotonic_ns: int
    def __init__(self, monotonic_ns: _Optional[int] = ...) -> None: ...

class WorkloadConfig(_message.Message):
    __slots__ = ("dirty_rate", "hot_fraction", "hot_share", "fill", "seed")
    DIRTY_RATE_FIELD_NUMBER: _ClassVar[int]
    HOT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    HOT_SHARE_FIELD_NUMBER: _ClassVar[int]
    FILL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    dirty_rate: float
    hot_fraction: float
    hot_share: float
    fill: float
    seed: int
    def __init__(self, dirty_rate: _Optional[float] = ..., hot_fraction: _Optional[float] = ..., hot_share: _Optional[float] = ..., fill: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class DeviceConfig(_message.Message):
    __slots__ = ("kind", "devid", "disk", "blocks", "latency_ms", "persistent", "grant_mode", "io_rate", "fill")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DEVID_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    PERSISTENT_FIELD_NUMBER: _ClassVar[int]
    GRANT_MODE_FIELD_NUMBER: _ClassVar[int]
    IO_RATE_FIELD_NUMBER: _ClassVar[int]
    FILL_FIELD_NUMBER: _ClassVar[int]
    kind: str
    devid: int
    disk: str
    blocks: int
    latency_ms: float
    persistent: bool
    grant_mode: str
    io_rate: float
    fill: float
    def __init__(self, kind: _Optional[str] = ..., devid: _Optional[int] = ..., disk: _Optional[str] = ..., blocks: _Optional[int] = ..., latency_ms: _Optional[float] = ..., persistent: _Optional[bool] = ..., grant_mode: _Optional[str] = ..., io_rate: _Optional[float] = ..., fill: _Optional[float] = ...) -> None: ...

class DeviceStats(_message.Message):
    __slots__ = ("kind", "devid", "served", "refused", "guest", "address", "failed_frames")
    class GuestEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    DEVID_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    GUEST_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    devid: int
    served: int
    refused: int
    guest: _containers.ScalarMap[str, int]
    address: str
    failed_frames: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, kind: _Optional[str] = ..., devid: _Optional[int] = ..., served: _Optional[int] = ..., refused: _Optional[int] = ..., guest: _Optional[_Mapping[str, int]] = ..., address: _Optional[str] = ..., failed_frames: _Optional[_Iterable[int]] = ...) -> None: ...

class CreateDomainRequest(_message.Message):
    __slots__ = ("name", "ram_bytes", "workload", "devices", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    ram_bytes: int
    workload: WorkloadConfig
    devices: _containers.RepeatedCompositeFieldContainer[DeviceConfig]
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., ram_bytes: _Optional[int] = ..., workload: _Optional[_Union[WorkloadConfig, _Mapping]] = ..., devices: _Optional[_Iterable[_Union[DeviceConfig, _Mapping]]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GuestFailure(_message.Message):
    __slots__ = ("frame", "expected_generation", "found_generation")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    FOUND_GENERATION_FIELD_NUMBER: _ClassVar[int]
    frame: int
    expected_generation: int
    found_generation: int
    def __init__(self, frame: _Optional[int] = ..., expected_generation: _Optional[int] = ..., found_generation: _Optional[int] = ...) -> None: ...

class GuestStats(_message.Message):
    __slots__ = ("steps", "pages_written", "checks_run", "checks_failed", "sweeps", "resumes", "sweeps_since_resume", "checks_since_resume", "failed_since_resume", "failures")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PAGES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    CHECKS_RUN_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FAILED_FIELD_NUMBER: _ClassVar[int]
    SWEEPS_FIELD_NUMBER: _ClassVar[int]
    RESUMES_FIELD_NUMBER: _ClassVar[int]
    SWEEPS_SINCE_RESUME_FIELD_NUMBER: _ClassVar[int]
    CHECKS_SINCE_RESUME_FIELD_NUMBER: _ClassVar[int]
    FAILED_SINCE_RESUME_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    steps: int
    pages_written: int
    checks_run: int
    checks_failed: int
    sweeps: int
    resumes: int
    sweeps_since_resume: int
    checks_since_resume: int
    failed_since_resume: int
    failures: _containers.RepeatedCompositeFieldContainer[GuestFailure]
    def __init__(self, steps: _Optional[int] = ..., pages_written: _Optional[int] = ..., checks_run: _Optional[int] = ..., checks_failed: _Optional[int] = ..., sweeps: _Optional[int] = ..., resumes: _Optional[int] = ..., sweeps_since_resume: _Optional[int] = ..., checks_since_resume: _Optional[int] = ..., failed_since_resume: _Optional[int] = ..., failures: _Optional[_Iterable[_Union[GuestFailure, _Mapping]]] = ...) -> None: ...

class FrameRange(_message.Message):
    __slots__ = ("area", "first", "count")
    AREA_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    area: str
    first: int
    count: int
    def __init__(self, area: _Optional[str] = ..., first: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class DomainInfo(_message.Message):
    __slots__ = ("name", "domid", "ram_bytes", "state", "guest_pid", "guest", "migration_id", "workload", "devices", "device_stats", "shared_frames", "postcopy", "missing_frames", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOMID_FIELD_NUMBER: _ClassVar[int]
    RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GUEST_PID_FIELD_NUMBER: _ClassVar[int]
    GUEST_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_STATS_FIELD_NUMBER: _ClassVar[int]
    SHARED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    POSTCOPY_FIELD_NUMBER: _ClassVar[int]
    MISSING_FRAMES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    domid: int
    ram_bytes: int
    state: str
    guest_pid: int
    guest: GuestStats
    migration_id: str
    workload: WorkloadConfig
    devices: _containers.RepeatedCompositeFieldContainer[DeviceConfig]
    device_stats: _containers.RepeatedCompositeFieldContainer[DeviceStats]
    shared_frames: _containers.RepeatedCompositeFieldContainer[FrameRange]
    postcopy: str
    missing_frames: int
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., domid: _Optional[int] = ..., ram_bytes: _Optional[int] = ..., state: _Optional[str] = ..., guest_pid: _Optional[int] = ..., guest: _Optional[_Union[GuestStats, _Mapping]] = ..., migration_id: _Optional[str] = ..., workload: _Optional[_Union[WorkloadConfig, _Mapping]] = ..., devices: _Optional[_Iterable[_Union[DeviceConfig, _Mapping]]] = ..., device_stats: _Optional[_Iterable[_Union[DeviceStats, _Mapping]]] = ..., shared_frames: _Optional[_Iterable[_Union[FrameRange, _Mapping]]] = ..., postcopy: _Optional[str] = ..., missing_frames: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DomainRef(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListDomainsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDomainsReply(_message.Message):
    __slots__ = ("domains",)
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    domains: _containers.RepeatedCompositeFieldContainer[DomainInfo]
    def __init__(self, domains: _Optional[_Iterable[_Union[DomainInfo, _Mapping]]] = ...) -> None: ...

class DestroyDomainReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetWorkloadRequest(_message.Message):
    __slots__ = ("name", "dirty_rate", "io_rate")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIRTY_RATE_FIELD_NUMBER: _ClassVar[int]
    IO_RATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dirty_rate: float
    io_rate: float
    def __init__(self, name: _Optional[str] = ..., dirty_rate: _Optional[float] = ..., io_rate: _Optional[float] = ...) -> None: ...

class ListMigrationsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MigrationEntry(_message.Message):
    __slots__ = ("migration_id", "domain", "role", "began_unix_ns", "ended_unix_ns", "outcome")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    BEGAN_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    ENDED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    domain: str
    role: str
    began_unix_ns: int
    ended_unix_ns: int
    outcome: str
    def __init__(self, migration_id: _Optional[str] = ..., domain: _Optional[str] = ..., role: _Optional[str] = ..., began_unix_ns: _Optional[int] = ..., ended_unix_ns: _Optional[int] = ..., outcome: _Optional[str] = ...) -> None: ...

class ListMigrationsReply(_message.Message):
    __slots__ = ("migrations",)
    MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    migrations: _containers.RepeatedCompositeFieldContainer[MigrationEntry]
    def __init__(self, migrations: _Optional[_Iterable[_Union[MigrationEntry, _Mapping]]] = ...) -> None: ...

class MigrationRef(_message.Message):
    __slots__ = ("migration_id", "reason", "domain", "source_instance", "recover", "abandon", "cancelled", "downtime_ns")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    SOURCE_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    RECOVER_FIELD_NUMBER: _ClassVar[int]
    ABANDON_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_NS_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    reason: str
    domain: str
    source_instance: str
    recover: bool
    abandon: bool
    cancelled: bool
    downtime_ns: int
    def __init__(self, migration_id: _Optional[str] = ..., reason: _Optional[str] = ..., domain: _Optional[str] = ..., source_instance: _Optional[str] = ..., recover: _Optional[bool] = ..., abandon: _Optional[bool] = ..., cancelled: _Optional[bool] = ..., downtime_ns: _Optional[int] = ...) -> None: ...

class BeginRequest(_message.Message):
    __slots__ = ("migration_id", "domain", "dest_address", "batch_pages", "streams", "backend_log", "xenstore_track", "inject", "save_image", "max_bandwidth_mbps", "quiesce", "recovery", "persistent_grants", "grant_mode", "compress", "transport", "allow_postcopy", "copy_storage", "storage_mode", "remove_source_storage")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DEST_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BATCH_PAGES_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_LOG_FIELD_NUMBER: _ClassVar[int]
    XENSTORE_TRACK_FIELD_NUMBER: _ClassVar[int]
    INJECT_FIELD_NUMBER: _ClassVar[int]
    SAVE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_BANDWIDTH_MBPS_FIELD_NUMBER: _ClassVar[int]
    QUIESCE_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_FIELD_NUMBER: _ClassVar[int]
    PERSISTENT_GRANTS_FIELD_NUMBER: _ClassVar[int]
    GRANT_MODE_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_POSTCOPY_FIELD_NUMBER: _ClassVar[int]
    COPY_STORAGE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_MODE_FIELD_NUMBER: _ClassVar[int]
    REMOVE_SOURCE_STORAGE_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    domain: str
    dest_address: str
    batch_pages: int
    streams: int
    backend_log: bool
    xenstore_track: bool
    inject: _containers.RepeatedScalarFieldContainer[str]
    save_image: str
    max_bandwidth_mbps: float
    quiesce: Quiesce
    recovery: Recovery
    persistent_grants: PersistentGrants
    grant_mode: GrantMode
    compress: Compression
    transport: Transport
    allow_postcopy: bool
    copy_storage: bool
    storage_mode: StorageMode
    remove_source_storage: bool
    def __init__(self, migration_id: _Optional[str] = ..., domain: _Optional[str] = ..., dest_address: _Optional[str] = ..., batch_pages: _Optional[int] = ..., streams: _Optional[int] = ..., backend_log: _Optional[bool] = ..., xenstore_track: _Optional[bool] = ..., inject: _Optional[_Iterable[str]] = ..., save_image: _Optional[str] = ..., max_bandwidth_mbps: _Optional[float] = ..., quiesce: _Optional[_Union[Quiesce, str]] = ..., recovery: _Optional[_Union[Recovery, str]] = ..., persistent_grants: _Optional[_Union[PersistentGrants, str]] = ..., grant_mode: _Optional[_Union[GrantMode, str]] = ..., compress: _Optional[_Union[Compression, str]] = ..., transport: _Optional[_Union[Transport, str]] = ..., allow_postcopy: _Optional[bool] = ..., copy_storage: _Optional[bool] = ..., storage_mode: _Optional[_Union[StorageMode, str]] = ..., remove_source_storage: _Optional[bool] = ...) -> None: ...

class ThrottleRequest(_message.Message):
    __slots__ = ("migration_id", "percent")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    percent: int
    def __init__(self, migration_id: _Optional[str] = ..., percent: _Optional[int] = ...) -> None: ...

class QuiesceReply(_message.Message):
    __slots__ = ("duration_ns", "finished", "abandoned", "unmapped")
    DURATION_NS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ABANDONED_FIELD_NUMBER: _ClassVar[int]
    UNMAPPED_FIELD_NUMBER: _ClassVar[int]
    duration_ns: int
    finished: int
    abandoned: int
    unmapped: int
    def __init__(self, duration_ns: _Optional[int] = ..., finished: _Optional[int] = ..., abandoned: _Optional[int] = ..., unmapped: _Optional[int] = ...) -> None: ...

class BeginReply(_message.Message):
    __slots__ = ("ram_bytes", "nr_frames", "transport")
    RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    NR_FRAMES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    ram_bytes: int
    nr_frames: int
    transport: Transport
    def __init__(self, ram_bytes: _Optional[int] = ..., nr_frames: _Optional[int] = ..., transport: _Optional[_Union[Transport, str]] = ...) -> None: ...

class RoundRequest(_message.Message):
    __slots__ = ("migration_id", "round", "final", "postcopy", "storage")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    POSTCOPY_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    round: int
    final: bool
    postcopy: bool
    storage: bool
    def __init__(self, migration_id: _Optional[str] = ..., round: _Optional[int] = ..., final: _Optional[bool] = ..., postcopy: _Optional[bool] = ..., storage: _Optional[bool] = ...) -> None: ...

class PostcopyProgress(_message.Message):
    __slots__ = ("total_pages", "pushed_pages", "requested_pages", "bytes", "done", "duration_ns", "resent_pages", "paused", "paused_reason", "recoveries", "paused_ns", "lost_pages")
    TOTAL_PAGES_FIELD_NUMBER: _ClassVar[int]
    PUSHED_PAGES_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_PAGES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    DURATION_NS_FIELD_NUMBER: _ClassVar[int]
    RESENT_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    PAUSED_REASON_FIELD_NUMBER: _ClassVar[int]
    RECOVERIES_FIELD_NUMBER: _ClassVar[int]
    PAUSED_NS_FIELD_NUMBER: _ClassVar[int]
    LOST_PAGES_FIELD_NUMBER: _ClassVar[int]
    total_pages: int
    pushed_pages: int
    requested_pages: int
    bytes: int
    done: bool
    duration_ns: int
    resent_pages: int
    paused: bool
    paused_reason: str
    recoveries: int
    paused_ns: int
    lost_pages: int
    def __init__(self, total_pages: _Optional[int] = ..., pushed_pages: _Optional[int] = ..., requested_pages: _Optional[int] = ..., bytes: _Optional[int] = ..., done: _Optional[bool] = ..., duration_ns: _Optional[int] = ..., resent_pages: _Optional[int] = ..., paused: _Optional[bool] = ..., paused_reason: _Optional[str] = ..., recoveries: _Optional[int] = ..., paused_ns: _Optional[int] = ..., lost_pages: _Optional[int] = ...) -> None: ...

class PostcopyStatus(_message.Message):
    __slots__ = ("total_pages", "missing_pages", "faults", "requests", "blocktime_ns", "latency_p50_ns", "latency_p99_ns", "latency_max_ns", "taken_pages", "paused", "dom0_waits", "dom0_touched", "injected")
    class InjectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TOTAL_PAGES_FIELD_NUMBER: _ClassVar[int]
    MISSING_PAGES_FIELD_NUMBER: _ClassVar[int]
    FAULTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BLOCKTIME_NS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_NS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_NS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MAX_NS_FIELD_NUMBER: _ClassVar[int]
    TAKEN_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    DOM0_WAITS_FIELD_NUMBER: _ClassVar[int]
    DOM0_TOUCHED_FIELD_NUMBER: _ClassVar[int]
    INJECTED_FIELD_NUMBER: _ClassVar[int]
    total_pages: int
    missing_pages: int
    faults: int
    requests: int
    blocktime_ns: int
    latency_p50_ns: int
    latency_p99_ns: int
    latency_max_ns: int
    taken_pages: int
    paused: bool
    dom0_waits: int
    dom0_touched: int
    injected: _containers.ScalarMap[str, int]
    def __init__(self, total_pages: _Optional[int] = ..., missing_pages: _Optional[int] = ..., faults: _Optional[int] = ..., requests: _Optional[int] = ..., blocktime_ns: _Optional[int] = ..., latency_p50_ns: _Optional[int] = ..., latency_p99_ns: _Optional[int] = ..., latency_max_ns: _Optional[int] = ..., taken_pages: _Optional[int] = ..., paused: _Optional[bool] = ..., dom0_waits: _Optional[int] = ..., dom0_touched: _Optional[int] = ..., injected: _Optional[_Mapping[str, int]] = ...) -> None: ...

class RoundStats(_message.Message):
    __slots__ = ("round", "dirty_pages", "sent_pages", "zero_pages", "bytes", "duration_ns", "dirty_rate", "started_ns", "remaining_pages", "interval_ns", "injected", "interrupted", "postcopy_asked", "dirty_blocks", "sent_blocks", "zero_blocks", "block_bytes", "remaining_blocks", "write_p50_ns", "write_p99_ns", "writes", "mirrored_writes", "mirror_broken", "mirrored_bytes")
    class InjectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DIRTY_PAGES_FIELD_NUMBER: _ClassVar[int]
    SENT_PAGES_FIELD_NUMBER: _ClassVar[int]
    ZERO_PAGES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DURATION_NS_FIELD_NUMBER: _ClassVar[int]
    DIRTY_RATE_FIELD_NUMBER: _ClassVar[int]
    STARTED_NS_FIELD_NUMBER: _ClassVar[int]
    REMAINING_PAGES_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_NS_FIELD_NUMBER: _ClassVar[int]
    INJECTED_FIELD_NUMBER: _ClassVar[int]
    INTERRUPTED_FIELD_NUMBER: _ClassVar[int]
    POSTCOPY_ASKED_FIELD_NUMBER: _ClassVar[int]
    DIRTY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SENT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ZERO_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    REMAINING_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    WRITE_P50_NS_FIELD_NUMBER: _ClassVar[int]
    WRITE_P99_NS_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    MIRRORED_WRITES_FIELD_NUMBER: _ClassVar[int]
    MIRROR_BROKEN_FIELD_NUMBER: _ClassVar[int]
    MIRRORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    round: int
    dirty_pages: int
    sent_pages: int
    zero_pages: int
    bytes: int
    duration_ns: int
    dirty_rate: float
    started_ns: int
    remaining_pages: int
    interval_ns: int
    injected: _containers.ScalarMap[str, int]
    interrupted: str
    postcopy_asked: bool
    dirty_blocks: int
    sent_blocks: int
    zero_blocks: int
    block_bytes: int
    remaining_blocks: int
    write_p50_ns: int
    write_p99_ns: int
    writes: int
    mirrored_writes: int
    mirror_broken: str
    mirrored_bytes: int
    def __init__(self, round: _Optional[int] = ..., dirty_pages: _Optional[int] = ..., sent_pages: _Optional[int] = ..., zero_pages: _Optional[int] = ..., bytes: _Optional[int] = ..., duration_ns: _Optional[int] = ..., dirty_rate: _Optional[float] = ..., started_ns: _Optional[int] = ..., remaining_pages: _Optional[int] = ..., interval_ns: _Optional[int] = ..., injected: _Optional[_Mapping[str, int]] = ..., interrupted: _Optional[str] = ..., postcopy_asked: _Optional[bool] = ..., dirty_blocks: _Optional[int] = ..., sent_blocks: _Optional[int] = ..., zero_blocks: _Optional[int] = ..., block_bytes: _Optional[int] = ..., remaining_blocks: _Optional[int] = ..., write_p50_ns: _Optional[int] = ..., write_p99_ns: _Optional[int] = ..., writes: _Optional[int] = ..., mirrored_writes: _Optional[int] = ..., mirror_broken: _Optional[str] = ..., mirrored_bytes: _Optional[int] = ...) -> None: ...

class RoundProgress(_message.Message):
    __slots__ = ("done_pages", "total_pages", "bytes", "stats")
    DONE_PAGES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PAGES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    done_pages: int
    total_pages: int
    bytes: int
    stats: RoundStats
    def __init__(self, done_pages: _Optional[int] = ..., total_pages: _Optional[int] = ..., bytes: _Optional[int] = ..., stats: _Optional[_Union[RoundStats, _Mapping]] = ...) -> None: ...

class SuspendReply(_message.Message):
    __slots__ = ("suspended_ns", "vcpu_bytes")
    SUSPENDED_NS_FIELD_NUMBER: _ClassVar[int]
    VCPU_BYTES_FIELD_NUMBER: _ClassVar[int]
    suspended_ns: int
    vcpu_bytes: int
    def __init__(self, suspended_ns: _Optional[int] = ..., vcpu_bytes: _Optional[int] = ...) -> None: ...

class HashChunk(_message.Message):
    __slots__ = ("first_frame", "hashes", "causes")
    FIRST_FRAME_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    CAUSES_FIELD_NUMBER: _ClassVar[int]
    first_frame: int
    hashes: bytes
    causes: bytes
    def __init__(self, first_frame: _Optional[int] = ..., hashes: _Optional[bytes] = ..., causes: _Optional[bytes] = ...) -> None: ...

class DoneReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("migration_id", "domain", "ram_bytes", "source_agent", "devices", "save_image", "source_address", "source_instance", "postcopy", "postcopy_dom0", "inject", "copy_storage", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_AGENT_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    SAVE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    POSTCOPY_FIELD_NUMBER: _ClassVar[int]
    POSTCOPY_DOM0_FIELD_NUMBER: _ClassVar[int]
    INJECT_FIELD_NUMBER: _ClassVar[int]
    COPY_STORAGE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    domain: str
    ram_bytes: int
    source_agent: str
    devices: _containers.RepeatedCompositeFieldContainer[DeviceConfig]
    save_image: str
    source_address: str
    source_instance: str
    postcopy: bool
    postcopy_dom0: PostcopyDom0
    inject: _containers.RepeatedScalarFieldContainer[str]
    copy_storage: bool
    labels: _containers.ScalarMap[str, str]
    def __init__(self, migration_id: _Optional[str] = ..., domain: _Optional[str] = ..., ram_bytes: _Optional[int] = ..., source_agent: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[DeviceConfig, _Mapping]]] = ..., save_image: _Optional[str] = ..., source_address: _Optional[str] = ..., source_instance: _Optional[str] = ..., postcopy: _Optional[bool] = ..., postcopy_dom0: _Optional[_Union[PostcopyDom0, str]] = ..., inject: _Optional[_Iterable[str]] = ..., copy_storage: _Optional[bool] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PrepareReply(_message.Message):
    __slots__ = ("guest_pid",)
    GUEST_PID_FIELD_NUMBER: _ClassVar[int]
    guest_pid: int
    def __init__(self, guest_pid: _Optional[int] = ...) -> None: ...

class DataChannels(_message.Message):
    __slots__ = ("host", "port", "key", "epoch", "tls", "max_batch_bytes")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    key: bytes
    epoch: int
    tls: bool
    max_batch_bytes: int
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ..., key: _Optional[bytes] = ..., epoch: _Optional[int] = ..., tls: _Optional[bool] = ..., max_batch_bytes: _Optional[int] = ...) -> None: ...

class ResumeReply(_message.Message):
    __slots__ = ("resumed_ns",)
    RESUMED_NS_FIELD_NUMBER: _ClassVar[int]
    resumed_ns: int
    def __init__(self, resumed_ns: _Optional[int] = ...) -> None: ...

class MigrationState(_message.Message):
    __slots__ = ("status", "domain", "source_agent", "source_instance", "holds_copy")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    SOURCE_AGENT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    HOLDS_COPY_FIELD_NUMBER: _ClassVar[int]
    status: MigrationStatus
    domain: str
    source_agent: str
    source_instance: str
    holds_copy: bool
    def __init__(self, status: _Optional[_Union[MigrationStatus, str]] = ..., domain: _Optional[str] = ..., source_agent: _Optional[str] = ..., source_instance: _Optional[str] = ..., holds_copy: _Optional[bool] = ...) -> None: ...

class PageBatch(_message.Message):
    __slots__ = ("seq", "round", "frames", "zero_frames", "data", "encoding", "checksum")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    ZERO_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    seq: int
    round: int
    frames: bytes
    zero_frames: bytes
    data: bytes
    encoding: str
    checksum: int
    def __init__(self, seq: _Optional[int] = ..., round: _Optional[int] = ..., frames: _Optional[bytes] = ..., zero_frames: _Optional[bytes] = ..., data: _Optional[bytes] = ..., encoding: _Optional[str] = ..., checksum: _Optional[int] = ...) -> None: ...

class RoundEnd(_message.Message):
    __slots__ = ("round", "pages")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    round: int
    pages: int
    def __init__(self, round: _Optional[int] = ..., pages: _Optional[int] = ...) -> None: ...

class DeviceState(_message.Message):
    __slots__ = ("vcpu", "devices", "recovery")
    VCPU_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_FIELD_NUMBER: _ClassVar[int]
    vcpu: bytes
    devices: bytes
    recovery: Recovery
    def __init__(self, vcpu: _Optional[bytes] = ..., devices: _Optional[bytes] = ..., recovery: _Optional[_Union[Recovery, str]] = ...) -> None: ...

class StreamEnd(_message.Message):
    __slots__ = ("streams",)
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    streams: int
    def __init__(self, streams: _Optional[int] = ...) -> None: ...

class StreamRecord(_message.Message):
    __slots__ = ("migration_id", "pages", "round_end", "device_state", "end")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    ROUND_END_FIELD_NUMBER: _ClassVar[int]
    DEVICE_STATE_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    pages: PageBatch
    round_end: RoundEnd
    device_state: DeviceState
    end: StreamEnd
    def __init__(self, migration_id: _Optional[str] = ..., pages: _Optional[_Union[PageBatch, _Mapping]] = ..., round_end: _Optional[_Union[RoundEnd, _Mapping]] = ..., device_state: _Optional[_Union[DeviceState, _Mapping]] = ..., end: _Optional[_Union[StreamEnd, _Mapping]] = ...) -> None: ...

class StreamAck(_message.Message):
    __slots__ = ("round", "pages_received", "end")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAGES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    round: int
    pages_received: int
    end: bool
    def __init__(self, round: _Optional[int] = ..., pages_received: _Optional[int] = ..., end: _Optional[bool] = ...) -> None: ...
