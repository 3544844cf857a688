"""SQLAlchemy 2 typed models. Every schema change is an Alembic migration (see migrations/)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    Uuid,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.clock import utcnow
from service.ids import uuid7

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")
UTCDateTime = DateTime(timezone=True)

ACTIVE_VM_STATUSES = ("scheduled", "running", "deleting")

# Compared bytewise on every database (a digits-only key; "C" keeps PostgreSQL's locale out of it).
VersionKey = String(128).with_variant(String(128, collation="C"), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Host(Base):
    __tablename__ = "hosts"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid7)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    vcpus: Mapped[int] = mapped_column(Integer)
    memory_mib: Mapped[int] = mapped_column(BigInteger)
    reserved_vcpus: Mapped[int] = mapped_column(Integer, default=0)
    reserved_memory_mib: Mapped[int] = mapped_column(BigInteger, default=0)
    cpu_allocation_ratio: Mapped[float] = mapped_column(Float)
    schedulable: Mapped[bool] = mapped_column(Boolean, default=True)
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Which heartbeat a host.stale event was already written for (liveness itself is derived).
    stale_reported_for: Mapped[datetime | None] = mapped_column(UTCDateTime)
    keyids_observed_in_use: Mapped[int | None] = mapped_column(Integer)
    vms_observed_running: Mapped[int | None] = mapped_column(Integer)
    # Heartbeat observations (agent/observations.py): never part of a load's facts.
    module_version: Mapped[str | None] = mapped_column(String(64))
    module_healthy: Mapped[bool | None] = mapped_column(Boolean)
    tdx_configured: Mapped[bool | None] = mapped_column(Boolean)
    # The module version as a sortable key (service/policy/versions.py), so that the fleet's TDX
    # module floor is a plain column comparison (and GET /v1/hosts?tdx_module_below= an index range).
    tdx_module_key: Mapped[str | None] = mapped_column(VersionKey, index=True)
    # The quote generation service answered the agent's last check (None: not checked).
    attestation_ready: Mapped[bool | None] = mapped_column(Boolean)
    # The VMM's TDX support as the agent sees it: supported / unsupported / unknown (None: not reported).
    vmm_tdx: Mapped[str | None] = mapped_column(String(16))
    vmm_detail: Mapped[str | None] = mapped_column(String(255))
    # The current load (no foreign key: loads already reference hosts, and a cycle would need
    # ALTER TABLE constraints that SQLite lacks). Its facts are copied below so that placement
    # filters run on indexed host columns.
    current_load_seq: Mapped[int | None] = mapped_column(BigIntPK)
    tdx_state: Mapped[str] = mapped_column(String(16), default="unknown")
    tdx_reason: Mapped[str | None] = mapped_column(Text)
    tdx_reason_code: Mapped[str | None] = mapped_column(String(64))
    vm_capable: Mapped[bool] = mapped_column(Boolean, default=False)
    keyids_total: Mapped[int] = mapped_column(Integer, default=0)
    # A TD's vCPUs never exceed the host's present CPUs (KVM caps them there); None: not reported.
    present_cpus: Mapped[int | None] = mapped_column(Integer)
    # Memory the TDX module took for its PAMT this boot (from the current load), never schedulable.
    pamt_mib: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    used_vcpus: Mapped[int] = mapped_column(Integer, default=0)
    used_memory_mib: Mapped[int] = mapped_column(BigInteger, default=0)
    used_keyids: Mapped[int] = mapped_column(Integer, default=0)
    vm_count: Mapped[int] = mapped_column(Integer, default=0)
    # TDX VMs placed here and not yet running (TD builds under way), at most the policy's limit.
    tds_building: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # memory_mib - reserved_memory_mib - pamt_mib - used_memory_mib, kept by every write so that the
    # placement index walks hosts by free memory (spread: most free first; pack: least first).
    free_memory_mib: Mapped[int] = mapped_column(BigInteger)
    generation: Mapped[int] = mapped_column(BigInteger, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_hosts_placement", "tdx_state", "free_memory_mib"),)


class HostLabel(Base):
    """One row per label, so that label selectors are indexed lookups on both databases."""

    __tablename__ = "host_labels"

    host_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("hosts.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(253), primary_key=True)
    value: Mapped[str] = mapped_column(String(253))

    __table_args__ = (Index("ix_host_labels_key_value", "key", "value", "host_id"),)


class Load(Base):
    """One kvm_intel load on one boot, as its agent reported it. Append-only, facts immutable."""

    __tablename__ = "loads"

    seq: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    host_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("hosts.id", ondelete="CASCADE"))
    boot_id: Mapped[str] = mapped_column(String(64))
    kernel: Mapped[str] = mapped_column(String(255))
    kvm_intel_loaded: Mapped[bool] = mapped_column(Boolean)
    tdx_platform: Mapped[bool] = mapped_column(Boolean)
    tdx_requested: Mapped[bool] = mapped_column(Boolean)
    tdx_effective: Mapped[bool] = mapped_column(Boolean)
    keyids_total: Mapped[int] = mapped_column(Integer)
    module_version: Mapped[str | None] = mapped_column(String(64))
    errors: Mapped[list[str]] = mapped_column(JSON, default=list)
    vcpus: Mapped[int | None] = mapped_column(Integer)
    memory_mib: Mapped[int | None] = mapped_column(BigInteger)
    kvm_tdx: Mapped[bool | None] = mapped_column(Boolean)
    kernel_log: Mapped[str | None] = mapped_column(String(16))
    present_cpus: Mapped[int | None] = mapped_column(Integer)
    # "virt/tdx: N KB allocated for PAMT" of this boot; None: not in the log (or not readable).
    pamt_kb: Mapped[int | None] = mapped_column(BigInteger)
    tdx_state: Mapped[str] = mapped_column(String(16))
    tdx_reason: Mapped[str | None] = mapped_column(Text)
    tdx_reason_code: Mapped[str | None] = mapped_column(String(64))
    reported_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_loads_host_seq", "host_id", "seq"),)


def _minus_priority(context: Any) -> int:
    return -int(context.get_current_parameters().get("priority") or 0)


class Vm(Base):
    __tablename__ = "vms"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid7)
    name: Mapped[str] = mapped_column(String(63))
    project: Mapped[str] = mapped_column(String(63))
    vcpus: Mapped[int] = mapped_column(Integer)
    memory_mib: Mapped[int] = mapped_column(BigInteger)
    tdx: Mapped[bool] = mapped_column(Boolean)
    # Only on hosts whose quote generation service answers (the TD must be able to attest).
    attestation: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The per-TD memory overhead charged at placement (the policy may change later; the charge not).
    memory_overhead_mib: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    selector: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    anti_affinity_group: Mapped[str | None] = mapped_column(String(63))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # -priority (priorities never change): the pending queue walks (queue_rank, created_at, id)
    # ascending, highest priority first and oldest first within one, on a plain ascending index
    # (Alembic cannot compare DESC index columns on SQLite).
    queue_rank: Mapped[int] = mapped_column(Integer, default=_minus_priority)
    # What the placement filters see of the VM besides its size (tdx, selector, anti-affinity
    # group), as a digest: VMs of one class and size fit on exactly the same hosts (see
    # service/scheduler/shape_memo.py). Null for VMs created before it existed.
    placement_class: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    status_detail: Mapped[str | None] = mapped_column(Text)
    host_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("hosts.id", ondelete="SET NULL"))
    # Kept with the VM so its history still names the host after the host is deleted.
    host_name: Mapped[str | None] = mapped_column(String(63))
    explanation: Mapped[str | None] = mapped_column(Text)
    # When a pending VM's reasons were last counted (a recount that finds the same reasons changes
    # nothing else: no generation bump, no event); the pending queue recounts at most this often.
    explained_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reasons: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    deadline: Mapped[datetime] = mapped_column(UTCDateTime)
    generation: Mapped[int] = mapped_column(BigInteger, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        # The pending queue walks each project's pending VMs in queue order.
        Index("ix_vms_project_queue", "status", "project", "queue_rank", "created_at", "id"),
        Index("ix_vms_status_deadline", "status", "deadline"),
        Index("ix_vms_host_status", "host_id", "status"),
        Index("ix_vms_group_host", "anti_affinity_group", "host_id"),
        Index("ix_vms_project_id", "project", "id"),
    )


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"

    principal: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    # No foreign key: the key is written first, so that a concurrent retry with the same key
    # waits on it instead of placing a second VM. VMs are never hard-deleted.
    vm_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid7)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    # An agent token is bound to one host: its id (a new host of the same name is another host),
    # and its name as it was, for listings. Deleting the host revokes the token (hosts/service.py).
    host_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, index=True)
    host: Mapped[str | None] = mapped_column(String(63))
    project: Mapped[str | None] = mapped_column(String(63))
    description: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Event(Base):
    """Append-only log. ids follow commit order (see events.py), so readers can resume from one."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(128))
    # The owning project of a VM event, so that a client token sees only its own project's events.
    project: Mapped[str | None] = mapped_column(String(63))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    __table_args__ = (
        Index("ix_events_kind_id", "kind", "id"),
        Index("ix_events_subject_id", "subject", "id"),
        Index("ix_events_project_id", "project", "id"),
    )


class Project(Base):
    """A project's quota: limits (null: none) and the usage of its VMs not yet ended (pending,
    scheduled, running, deleting). The usage is kept by service/projects/quota.py in the same
    transaction as every change of a VM's status, so it is always equal to a recount."""

    __tablename__ = "projects"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    limit_vms: Mapped[int | None] = mapped_column(BigInteger)
    limit_vcpus: Mapped[int | None] = mapped_column(BigInteger)
    limit_memory_mib: Mapped[int | None] = mapped_column(BigInteger)
    limit_tdx_vms: Mapped[int | None] = mapped_column(BigInteger)
    used_vms: Mapped[int] = mapped_column(BigInteger, default=0)
    used_vcpus: Mapped[int] = mapped_column(BigInteger, default=0)
    used_memory_mib: Mapped[int] = mapped_column(BigInteger, default=0)
    used_tdx_vms: Mapped[int] = mapped_column(BigInteger, default=0)
    # Bumped when the limits change (ETag / If-Match on the quota); usage changes do not bump it.
    # 0 until limits are first set.
    generation: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class FleetPolicy(Base):
    """The fleet's TDX policy: one row (id 1), absent until first set; see service/policy/."""

    __tablename__ = "fleet_policy"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tdx_min_module_version: Mapped[str | None] = mapped_column(String(64))
    tdx_min_module_key: Mapped[str | None] = mapped_column(VersionKey)
    # None: the server's default setting (TDX_MAX_TD_BUILDS_PER_HOST, TDX_TD_MEMORY_OVERHEAD_MIB).
    max_td_builds_per_host: Mapped[int | None] = mapped_column(Integer)
    td_memory_overhead_mib: Mapped[int | None] = mapped_column(Integer)
    generation: Mapped[int] = mapped_column(BigInteger, default=1)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Operation(Base):
    """A long-running operation (the guided TDX opt-in of a host), advanced by the background loop of
    any replica under a row lock; see service/operations/."""

    __tablename__ = "operations"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid7)
    kind: Mapped[str] = mapped_column(String(32))
    # No foreign key: the operation's history outlives the host.
    host_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    host_name: Mapped[str] = mapped_column(String(63))
    status: Mapped[str] = mapped_column(String(16))
    step: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)
    # The first active VMs that keep the host from being reloaded, and how many there are.
    blocking_vms: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    blocking_total: Mapped[int] = mapped_column(Integer, default=0)
    # The host's load when the operation started: a newer one is the new load it waits for.
    start_load_seq: Mapped[int | None] = mapped_column(BigInteger)
    # Whether this operation cordoned the host (a cancel gives it back as it found it).
    cordoned: Mapped[bool] = mapped_column(Boolean, default=False)
    reason_code: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    remedy: Mapped[str | None] = mapped_column(Text)
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    deadline: Mapped[datetime] = mapped_column(UTCDateTime)
    generation: Mapped[int] = mapped_column(BigInteger, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("ix_operations_status_id", "status", "id"),
        Index("ix_operations_host_name_id", "host_name", "id"),
        # One running operation per host, whatever the number of replicas starting one at once.
        Index(
            "uq_operations_running_host", "host_id", unique=True,
            sqlite_where=text("status = 'running'"), postgresql_where=text("status = 'running'"),
        ),
    )
