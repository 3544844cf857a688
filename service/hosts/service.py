"""Host rules: registration, admin state, kvm_intel load reports and heartbeats.

Every function runs inside one transaction (``Database.run``) and raises ``ProblemError`` before
it changes anything when the request is refused.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.clock import as_utc, utcnow
from service.errors import ProblemError, not_found
from service.events import emit
from service.hosts.readiness import (
    KernelLog,
    LoadFacts,
    LoadKind,
    Readiness,
    TdxState,
    classify_load,
    derive_readiness,
    reload_allowed,
    remedy_of,
    with_module_health,
)
from service.hosts.schemas import (
    Heartbeat,
    HostCreate,
    HostOut,
    HostPatch,
    HostRegistration,
    LoadOut,
    LoadRef,
    LoadReport,
    RegisteredHost,
    TdxOut,
    UsageOut,
)
from service.models import Host, HostLabel, Load, Token
from service.pagination import Page, encode_cursor
from service.policy.versions import version_key
from service.preconditions import parse_if_match, shown


@dataclass(frozen=True, slots=True)
class HostFilters:
    tdx_state: TdxState | None = None
    schedulable: bool | None = None
    labels: tuple[tuple[str, str], ...] = ()
    # Hosts whose TDX module version is known and lower than this version's key (hosts to update).
    tdx_module_below: str | None = None


def is_alive(last_heartbeat_at: datetime | None, now: datetime, timeout_s: float) -> bool:
    return last_heartbeat_at is not None and now - as_utc(last_heartbeat_at) <= timedelta(seconds=timeout_s)


OPT_IN_PENDING = "opt-in configured: takes effect at the next kvm_intel load"
OPT_IN_NOT_PERSISTED = "opt-in not configured: the next kvm_intel load (and a reboot) comes up without tdx=1"


def next_load_note(configured: bool | None, load: Load | None) -> str | None:
    """What the configured intent means next, when it differs from the current load."""
    if configured is None or load is None or not load.kvm_intel_loaded or load.kvm_tdx is False:
        return None
    if configured and not load.tdx_requested:
        return OPT_IN_PENDING
    if not configured and load.tdx_requested:
        return OPT_IN_NOT_PERSISTED
    return None


def keyids_free(host: Host) -> int:
    """KeyIDs a placement may still take: total - max(claimed, observed in use)."""
    return max(host.keyids_total - max(host.used_keyids, host.keyids_observed_in_use or 0), 0)


def pamt_mib_of(pamt_kb: int | None) -> int:
    """The PAMT the TDX module holds this boot, as the kernel logged it, rounded up to MiB. The line
    is the boot's (on 7.1+ the module, and its PAMT, are set up at boot whatever kvm_intel.tdx says;
    on 6.16-7.0 at the first load with tdx=1, and kept for the boot), so it counts whatever the
    host's TDX state."""
    return 0 if pamt_kb is None else -(-pamt_kb // 1024)


def host_out(host: Host, load: Load | None, now: datetime, timeout_s: float) -> HostOut:
    return HostOut(
        id=host.id,
        name=host.name,
        labels=host.labels,
        vcpus=host.vcpus,
        memory_mib=host.memory_mib,
        reserved_vcpus=host.reserved_vcpus,
        reserved_memory_mib=host.reserved_memory_mib,
        cpu_allocation_ratio=host.cpu_allocation_ratio,
        schedulable=host.schedulable,
        draining=host.draining,
        alive=is_alive(host.last_heartbeat_at, now, timeout_s),
        last_heartbeat_at=as_utc(host.last_heartbeat_at) if host.last_heartbeat_at else None,
        tdx=TdxOut(
            state=TdxState(host.tdx_state),
            reason=host.tdx_reason,
            reason_code=host.tdx_reason_code,
            remedy=remedy_of(host.tdx_reason_code),
            keyids_total=host.keyids_total,
            keyids_used=host.used_keyids,
            keyids_observed_in_use=host.keyids_observed_in_use,
            keyids_free=keyids_free(host),
            module_version=host.module_version or (load.module_version if load else None),
            module_healthy=host.module_healthy,
            configured=host.tdx_configured,
            next_load=next_load_note(host.tdx_configured, load),
            pamt_mib=host.pamt_mib,
            tds_building=host.tds_building,
            attestation_ready=host.attestation_ready,
            vmm=host.vmm_tdx,
            vmm_detail=host.vmm_detail,
        ),
        load=(
            LoadRef(id=load.id, boot_id=load.boot_id, kernel=load.kernel, reported_at=as_utc(load.reported_at))
            if load
            else None
        ),
        usage=UsageOut(vcpus=host.used_vcpus, memory_mib=host.used_memory_mib, vms=host.vm_count),
        generation=host.generation,
        created_at=as_utc(host.created_at),
        updated_at=as_utc(host.updated_at),
    )


def _current_load(session: Session, host: Host) -> Load | None:
    if host.current_load_seq is None:
        return None
    return session.get(Load, host.current_load_seq)


def render(session: Session, host: Host, timeout_s: float) -> HostOut:
    return host_out(host, _current_load(session, host), utcnow(), timeout_s)


def get_host_row(session: Session, name: str, *, for_update: bool = False) -> Host:
    query = select(Host).where(Host.name == name)
    if for_update:
        query = query.with_for_update()
    host = session.scalars(query).first()
    if host is None:
        raise not_found("host", name)
    return host


def _free_memory(host: Host) -> int:
    return host.memory_mib - host.reserved_memory_mib - host.pamt_mib - host.used_memory_mib


def _touch(host: Host) -> None:
    host.generation += 1
    host.updated_at = utcnow()
    host.free_memory_mib = _free_memory(host)


def _write_labels(session: Session, host: Host, labels: dict[str, str]) -> None:
    session.execute(delete(HostLabel).where(HostLabel.host_id == host.id))
    if labels:
        session.add_all(HostLabel(host_id=host.id, key=k, value=v) for k, v in labels.items())
    host.labels = dict(labels)


def create_host(session: Session, body: HostCreate, default_cpu_ratio: float) -> Host:
    if session.scalar(select(exists().where(Host.name == body.name))):
        raise ProblemError(409, "host_name_taken", f"a host named {body.name!r} already exists")
    now = utcnow()
    host = Host(
        id=uuid.uuid4(),
        name=body.name,
        vcpus=body.vcpus,
        memory_mib=body.memory_mib,
        reserved_vcpus=body.reserved_vcpus,
        reserved_memory_mib=body.reserved_memory_mib,
        cpu_allocation_ratio=body.cpu_allocation_ratio or default_cpu_ratio,
        schedulable=True,
        draining=False,
        tdx_state=TdxState.UNKNOWN.value,
        vm_capable=False,
        keyids_total=0,
        used_vcpus=0,
        used_memory_mib=0,
        used_keyids=0,
        vm_count=0,
        pamt_mib=0,
        tds_building=0,
        generation=1,
        created_at=now,
        updated_at=now,
        labels={},
    )
    host.free_memory_mib = _free_memory(host)
    session.add(host)
    try:
        session.flush()
    except IntegrityError as exc:  # lost a race with another create of the same name
        raise ProblemError(409, "host_name_taken", f"a host named {body.name!r} already exists") from exc
    _write_labels(session, host, body.labels)
    emit(session, "host.created", host.name, {"id": str(host.id), "labels": body.labels})
    return host


def register_hosts(session: Session, items: list[HostRegistration], default_cpu_ratio: float) -> list[RegisteredHost]:
    """Register many hosts (each with an optional first load) in one transaction: the same rows
    and events as ``create_host`` then ``report_load`` per host, written with bulk statements.
    All or nothing: any refused host refuses the batch before anything is written."""
    _refuse_taken(session, items)
    try:
        # A savepoint: a concurrent batch (another request, another replica) may commit one of these
        # names or load ids between the check above and the insert. The unique index refuses the
        # insert; the check, run again once its rows are visible, says which (409, not a 500).
        with session.begin_nested():
            return _insert_hosts(session, items, default_cpu_ratio)
    except IntegrityError:
        _refuse_taken(session, items)
        raise


def _refuse_taken(session: Session, items: list[HostRegistration]) -> None:
    names = Counter(item.name for item in items)
    taken = sorted(n for n, count in names.items() if count > 1)
    taken += session.scalars(select(Host.name).where(Host.name.in_(list(names)))).all()
    if taken:
        raise ProblemError(
            409, "host_name_taken", f"host name(s) already taken: {', '.join(sorted(set(taken))[:20])}",
            names=sorted(set(taken)),
        )
    load_ids = Counter(item.load.load_id for item in items if item.load is not None)
    reused = [str(i) for i, count in load_ids.items() if count > 1]
    reused += [str(i) for i in session.scalars(select(Load.id).where(Load.id.in_(list(load_ids))))]
    if reused:
        raise ProblemError(409, "load_id_conflict", f"load id(s) already used: {', '.join(reused[:20])}")


def _insert_hosts(session: Session, items: list[HostRegistration], default_cpu_ratio: float) -> list[RegisteredHost]:
    now = utcnow()
    host_rows: list[dict[str, Any]] = []
    label_rows: list[dict[str, Any]] = []
    load_rows: list[dict[str, Any]] = []
    registered: list[RegisteredHost] = []
    for item in items:
        host_id = uuid.uuid4()
        load = item.load
        readiness = derive_readiness(_facts(load)) if load is not None else None
        vcpus = load.vcpus if load is not None and load.vcpus is not None else item.vcpus
        memory = load.memory_mib if load is not None and load.memory_mib is not None else item.memory_mib
        reserved_memory = min(item.reserved_memory_mib, memory)
        state = readiness.state if readiness is not None else TdxState.UNKNOWN
        pamt = pamt_mib_of(load.pamt_kb) if load is not None else 0
        host_rows.append(
            {
                "id": host_id, "name": item.name, "labels": dict(item.labels), "vcpus": vcpus,
                "memory_mib": memory, "reserved_vcpus": min(item.reserved_vcpus, vcpus),
                "reserved_memory_mib": reserved_memory,
                "cpu_allocation_ratio": item.cpu_allocation_ratio or default_cpu_ratio,
                "schedulable": True, "draining": False, "tdx_state": state.value,
                "tdx_reason": readiness.reason if readiness else None,
                "tdx_reason_code": readiness.reason_code if readiness else None,
                "vm_capable": readiness.vm_capable if readiness else False,
                "keyids_total": load.keyids_total if load is not None else 0,
                "present_cpus": load.present_cpus if load is not None else None,
                "used_vcpus": 0, "used_memory_mib": 0, "used_keyids": 0, "vm_count": 0,
                "pamt_mib": pamt, "tds_building": 0,
                "module_version": load.module_version if load is not None else None,
                "tdx_module_key": version_key(load.module_version) if load is not None else None,
                "free_memory_mib": memory - reserved_memory - pamt,
                # As if created (generation 1) and then given its load (bumped once).
                "generation": 2 if load is not None else 1,
                "last_heartbeat_at": now if load is not None else None,
                "created_at": now, "updated_at": now,
            }
        )
        label_rows += [{"host_id": host_id, "key": k, "value": v} for k, v in item.labels.items()]
        emit(session, "host.created", item.name, {"id": str(host_id), "labels": dict(item.labels)})
        if load is not None and readiness is not None:
            load_rows.append(
                {
                    "id": load.load_id, "host_id": host_id, **{f: getattr(load, f) for f in _IMMUTABLE_FACTS},
                    "tdx_state": state.value, "tdx_reason": readiness.reason,
                    "tdx_reason_code": readiness.reason_code, "reported_at": now,
                }
            )
            _emit_load_events(session, item.name, load, LoadKind.FIRST, TdxState.UNKNOWN.value, readiness)
        registered.append(RegisteredHost(id=host_id, name=item.name, tdx_state=state))
    session.execute(insert(Host), host_rows)
    if label_rows:
        session.execute(insert(HostLabel), label_rows)
    if load_rows:
        seqs = session.execute(insert(Load).returning(Load.seq, Load.host_id), load_rows).all()
        session.execute(update(Host), [{"id": host_id, "current_load_seq": seq} for seq, host_id in seqs])
    return registered


def list_hosts(
    session: Session, filters: HostFilters, after: str | None, limit: int, timeout_s: float
) -> Page[HostOut]:
    query = select(Host, Load).outerjoin(Load, Load.seq == Host.current_load_seq)
    if filters.tdx_state is not None:
        query = query.where(Host.tdx_state == filters.tdx_state.value)
    if filters.schedulable is not None:
        query = query.where(Host.schedulable == filters.schedulable)
    for key, value in filters.labels:
        query = query.where(
            exists().where(HostLabel.host_id == Host.id, HostLabel.key == key, HostLabel.value == value)
        )
    if filters.tdx_module_below is not None:
        query = query.where(Host.tdx_module_key < filters.tdx_module_below)
    if after is not None:
        query = query.where(Host.name > after)
    rows = session.execute(query.order_by(Host.name).limit(limit + 1)).all()
    now = utcnow()
    items = [host_out(h, ld, now, timeout_s) for h, ld in rows[:limit]]
    nxt = encode_cursor(items[-1].name) if len(rows) > limit else None
    return Page[HostOut](items=items, next=nxt)


def check_if_match(host: Host, header: str | None) -> None:
    accepted = parse_if_match(header)
    if accepted is not None and host.generation not in accepted:
        raise ProblemError(
            412,
            "precondition_failed",
            f"host {host.name!r} is at generation {host.generation}, not {shown(header)}",
            current_generation=host.generation,
        )


_PATCHED_FIELDS = ("schedulable", "draining", "reserved_vcpus", "reserved_memory_mib", "cpu_allocation_ratio")


def _refuse_capacity_below_usage(host: Host, changes: dict[str, Any]) -> None:
    """A reservation or allocation ratio that would leave the VMs placed on the host over its
    capacity is refused (loosening one, even on a host that is over already, is not). The host row
    is locked (FOR UPDATE; SQLite has one writer), and every placement is a conditional UPDATE of
    this row, so no claim can slip in between this check and the write."""
    reserved_memory = changes.get("reserved_memory_mib", host.reserved_memory_mib)
    if reserved_memory > host.reserved_memory_mib:
        free = host.memory_mib - reserved_memory - host.pamt_mib - host.used_memory_mib
        if free < 0:
            raise ProblemError(
                409, "reservation_exceeds_free",
                f"reserving {reserved_memory} MiB on host {host.name!r} would leave its VMs over capacity: "
                f"{host.used_memory_mib} MiB in use + {host.pamt_mib} MiB PAMT of {host.memory_mib} MiB "
                f"leaves at most {max(host.memory_mib - host.pamt_mib - host.used_memory_mib, 0)} MiB to reserve",
                resource="memory_mib", requested=reserved_memory, in_use=host.used_memory_mib,
                pamt_mib=host.pamt_mib, capacity=host.memory_mib,
            )
    reserved_vcpus = changes.get("reserved_vcpus", host.reserved_vcpus)
    ratio = changes.get("cpu_allocation_ratio", host.cpu_allocation_ratio)
    tighter = reserved_vcpus > host.reserved_vcpus or ratio < host.cpu_allocation_ratio
    limit = (host.vcpus - reserved_vcpus) * ratio
    if tighter and host.used_vcpus > limit:
        if reserved_vcpus > host.reserved_vcpus:
            code, what = "reservation_exceeds_free", f"reserving {reserved_vcpus} vCPUs"
        else:
            code, what = "allocation_ratio_below_usage", f"a CPU allocation ratio of {ratio}"
        raise ProblemError(
            409, code,
            f"{what} on host {host.name!r} would leave its VMs over capacity: {host.used_vcpus} vCPUs in use, "
            f"({host.vcpus} - {reserved_vcpus} reserved) x {ratio} = {limit:g} schedulable",
            resource="vcpus", requested=reserved_vcpus if code == "reservation_exceeds_free" else ratio,
            in_use=host.used_vcpus, capacity=host.vcpus, reserved_vcpus=reserved_vcpus,
            cpu_allocation_ratio=ratio, limit=limit,
        )


def patch_host(session: Session, name: str, body: HostPatch, if_match: str | None) -> Host:
    """Change what ``body`` sets. A PATCH that changes nothing changes nothing: same generation (so
    everyone's If-Match still holds), no event."""
    host = get_host_row(session, name, for_update=True)
    check_if_match(host, if_match)
    sent = body.model_dump(exclude_unset=True)
    reserved_vcpus = sent.get("reserved_vcpus", host.reserved_vcpus)
    reserved_memory = sent.get("reserved_memory_mib", host.reserved_memory_mib)
    if reserved_vcpus > host.vcpus or reserved_memory > host.memory_mib:
        raise ProblemError(422, "validation_error", "reservation exceeds the host's capacity", errors=[])
    changes = {f: v for f, v in sent.items() if (host.labels if f == "labels" else getattr(host, f)) != v}
    if not changes:
        return host
    _refuse_capacity_below_usage(host, changes)
    was_schedulable = host.schedulable
    was_draining = host.draining
    for field in _PATCHED_FIELDS:
        if field in changes:
            setattr(host, field, changes[field])
    if "labels" in changes:
        _write_labels(session, host, changes["labels"])
    _touch(host)
    data: dict[str, Any] = {"changed": sorted(changes), "generation": host.generation}
    emit(session, "host.updated", host.name, data)
    if was_schedulable != host.schedulable:
        emit(session, "host.uncordoned" if host.schedulable else "host.cordoned", host.name, {})
    if was_draining != host.draining:
        emit(session, "host.draining" if host.draining else "host.undrained", host.name, {})
    return host


def set_schedulable(session: Session, host: Host, schedulable: bool, reason: str) -> None:
    """Cordon or uncordon a locked host on behalf of an operation: the same row change and events
    as a PATCH of ``schedulable``."""
    if host.schedulable == schedulable:
        return
    host.schedulable = schedulable
    _touch(host)
    emit(session, "host.updated", host.name, {"changed": ["schedulable"], "generation": host.generation, "by": reason})
    emit(session, "host.uncordoned" if schedulable else "host.cordoned", host.name, {"by": reason})


def drain_host(session: Session, name: str) -> Host:
    host = get_host_row(session, name, for_update=True)
    if not host.draining:
        host.draining = True
        _touch(host)
        emit(session, "host.draining", host.name, {"active_vms": host.vm_count})
    return host


def delete_host(session: Session, name: str) -> None:
    host = get_host_row(session, name, for_update=True)
    if host.vm_count > 0:
        raise ProblemError(
            409, "host_not_empty", f"host {name!r} still has {host.vm_count} active VM(s); drain it first"
        )
    # Its agent tokens die with it: a new host of the same name is another host, with its own agent.
    revoked = session.connection().execute(
        update(Token).where(Token.host_id == host.id, Token.revoked_at.is_(None)).values(revoked_at=utcnow())
    ).rowcount
    session.delete(host)
    emit(session, "host.deleted", name, {"id": str(host.id), "agent_tokens_revoked": revoked})


def _facts(body: LoadReport) -> LoadFacts:
    return LoadFacts(
        kvm_intel_loaded=body.kvm_intel_loaded,
        tdx_platform=body.tdx_platform,
        tdx_requested=body.tdx_requested,
        tdx_effective=body.tdx_effective,
        keyids_total=body.keyids_total,
        errors=tuple(body.errors),
        kvm_tdx=body.kvm_tdx,
        kernel_log=KernelLog(body.kernel_log) if body.kernel_log else None,
    )


_IMMUTABLE_FACTS = (
    "boot_id", "kernel", "kvm_intel_loaded", "tdx_platform", "tdx_requested", "tdx_effective",
    "keyids_total", "module_version", "errors", "vcpus", "memory_mib", "kvm_tdx", "kernel_log", "present_cpus",
    "pamt_kb",
)


def _same_facts(load: Load, body: LoadReport) -> bool:
    return all(getattr(load, f) == getattr(body, f) for f in _IMMUTABLE_FACTS)


def report_load(session: Session, name: str, body: LoadReport) -> tuple[Host, bool]:
    """Store a load report; returns the host and whether a new load was recorded."""
    from service.vms.service import release_vms_of_rebooted_host

    host = get_host_row(session, name, for_update=True)
    known = session.scalars(select(Load).where(Load.id == body.load_id)).first()
    if known is not None:
        if known.host_id != host.id:
            raise ProblemError(409, "load_id_conflict", f"load {body.load_id} belongs to another host")
        if not _same_facts(known, body):
            raise ProblemError(
                409, "load_facts_immutable", f"load {body.load_id} was already reported with other facts"
            )
        if known.seq != host.current_load_seq:
            raise ProblemError(409, "stale_load", f"load {body.load_id} is not the host's current load")
        return host, False  # a retry of the report we already have

    current = _current_load(session, host)
    kind = classify_load(current.boot_id if current else None, body.boot_id)
    if not reload_allowed(kind, host.vm_count):
        raise ProblemError(
            409,
            "reload_with_active_vms",
            f"host {name!r} reports a new kvm_intel load on the same boot while {host.vm_count} VM(s) "
            "are active; KVM cannot be reloaded under running VMs (drain the host first)",
            active_vms=host.vm_count,
        )
    now = utcnow()
    load_readiness = derive_readiness(_facts(body))
    load = Load(
        id=body.load_id,
        host_id=host.id,
        **{f: getattr(body, f) for f in _IMMUTABLE_FACTS},
        tdx_state=load_readiness.state.value,
        tdx_reason=load_readiness.reason,
        tdx_reason_code=load_readiness.reason_code,
        reported_at=now,
    )
    session.add(load)
    session.flush()

    if kind is LoadKind.REBOOT:
        assert current is not None
        released = release_vms_of_rebooted_host(session, host, now)
        emit(
            session,
            "host.rebooted",
            host.name,
            {"old_boot_id": current.boot_id, "new_boot_id": body.boot_id, "released_vms": released},
        )
        # The TDX module was set up afresh at boot: what heartbeats saw of the old one is void.
        host.module_healthy = None
        host.module_version = None
        host.tdx_module_key = None

    previous_state = host.tdx_state
    readiness = with_module_health(load_readiness, host.module_healthy)
    host.current_load_seq = load.seq
    _set_readiness(host, readiness)
    host.keyids_total = body.keyids_total
    host.present_cpus = body.present_cpus
    if body.vcpus is not None:
        host.vcpus = body.vcpus
        host.reserved_vcpus = min(host.reserved_vcpus, host.vcpus)
    if body.memory_mib is not None:
        host.memory_mib = body.memory_mib
        host.reserved_memory_mib = min(host.reserved_memory_mib, host.memory_mib)
    host.pamt_mib = pamt_mib_of(body.pamt_kb)
    if host.module_version is None and body.module_version is not None:
        host.module_version = body.module_version
        host.tdx_module_key = version_key(body.module_version)
    host.last_heartbeat_at = now
    _touch(host)
    _emit_load_events(session, host.name, body, kind, previous_state, readiness)
    return host, True


def _set_readiness(host: Host, readiness: Readiness) -> None:
    host.tdx_state = readiness.state.value
    host.tdx_reason = readiness.reason
    host.tdx_reason_code = readiness.reason_code
    host.vm_capable = readiness.vm_capable


def _emit_state_change(session: Session, name: str, previous_state: str, readiness: Readiness) -> None:
    if previous_state != readiness.state.value:
        emit(
            session,
            "host.tdx_state_changed",
            name,
            {
                "from": previous_state, "to": readiness.state.value, "reason": readiness.reason,
                "reason_code": readiness.reason_code,
            },
        )


def _emit_load_events(
    session: Session, name: str, body: LoadReport, kind: LoadKind, previous_state: str, readiness: Readiness
) -> None:
    emit(
        session,
        "host.load_reported",
        name,
        {
            "load_id": str(body.load_id),
            "boot_id": body.boot_id,
            "kind": kind.value,
            "tdx_state": readiness.state.value,
            "reason": readiness.reason,
            "reason_code": readiness.reason_code,
        },
    )
    _emit_state_change(session, name, previous_state, readiness)


def heartbeat(session: Session, name: str, body: Heartbeat, timeout_s: float) -> Host:
    # One query for the host and its current load (the reply's render finds both in the session).
    row = session.execute(
        select(Host, Load).outerjoin(Load, Load.seq == Host.current_load_seq).where(Host.name == name)
    ).first()
    if row is None:
        raise not_found("host", name)
    host, current = row._tuple()
    if current is None or current.id != body.load_id:
        raise ProblemError(
            409,
            "stale_load",
            f"load {body.load_id} is not the current load of host {name!r}; report the load first",
            current_load_id=str(current.id) if current else None,
        )
    sent = body.model_fields_set
    # A failed TDX module stays failed until its version reads again: a version file that went away
    # (its driver unloaded) does not bring the TDs back.
    health_changed = (
        "module_healthy" in sent
        and body.module_healthy != host.module_healthy
        and not (body.module_healthy is None and host.module_healthy is False)
    )
    if health_changed:
        # Rare, and it may release VMs: take the row lock a claim or a load report would take.
        session.refresh(host, with_for_update=True)
        health_changed = body.module_healthy != host.module_healthy and not (
            body.module_healthy is None and host.module_healthy is False
        )
    now = utcnow()
    was_alive = is_alive(host.last_heartbeat_at, now, timeout_s)
    # Liveness and observations are not desired state: no generation bump, so a heartbeat never
    # makes a concurrent claim or an operator's If-Match fail (unless the TDX module's health
    # changes the host's TDX state, below).
    host.last_heartbeat_at = now
    if body.running_vms is not None:
        host.vms_observed_running = len(body.running_vms)
    if "tdx_configured" in sent:
        host.tdx_configured = body.tdx_configured
    _observe(session, host, body, sent)
    if health_changed:
        host.module_healthy = body.module_healthy
        _module_health_changed(session, host, current, now)
    if not was_alive:
        emit(session, "host.alive", host.name, {"load_id": str(current.id)})
    return host


def _observe(session: Session, host: Host, body: Heartbeat, sent: set[str]) -> None:
    """Record the heartbeat's observations. One that can make the host take VMs it could not take
    before (its TDX module updated, its quote generation service back, KeyIDs freed outside the
    control plane, its VMM able to build TDs) is an event, and events of these kinds wake the
    pending queue; a heartbeat that changes nothing wakes nothing."""
    if "module_version" in sent and body.module_version != host.module_version:
        if body.module_version is not None:  # a version that went away is module health's business
            emit(
                session, "host.module_version_changed", host.name,
                {"from": host.module_version, "to": body.module_version},
            )
        host.module_version = body.module_version
        host.tdx_module_key = version_key(body.module_version)
    if "attestation_ready" in sent and body.attestation_ready != host.attestation_ready:
        emit(
            session, "host.attestation_changed", host.name,
            {"from": host.attestation_ready, "to": body.attestation_ready},
        )
        host.attestation_ready = body.attestation_ready
    if "vmm_tdx" in sent and (body.vmm_tdx, body.vmm_detail) != (host.vmm_tdx, host.vmm_detail):
        if body.vmm_tdx != host.vmm_tdx:
            emit(
                session, "host.vmm_changed", host.name,
                {"from": host.vmm_tdx, "to": body.vmm_tdx, "detail": body.vmm_detail},
            )
        host.vmm_tdx = body.vmm_tdx
        host.vmm_detail = body.vmm_detail
    if body.keyids_in_use is not None:
        before = keyids_free(host)
        previous = host.keyids_observed_in_use
        host.keyids_observed_in_use = body.keyids_in_use
        after = keyids_free(host)
        if after > before and host.tdx_state == TdxState.READY.value:
            emit(
                session, "host.keyids_freed", host.name,
                {"observed_in_use": {"from": previous, "to": body.keyids_in_use}, "keyids_free": after},
            )


def _module_health_changed(session: Session, host: Host, load: Load, now: datetime) -> None:
    """The TDX module stopped (or resumed) working under the current load: the host's TDX state
    follows, and when the module failed, the TDs on the host are gone with it."""
    from service.vms.service import release_tdx_vms_of_failed_module

    load_readiness = derive_readiness(_stored_facts(load))
    readiness = with_module_health(load_readiness, host.module_healthy)
    previous_state = host.tdx_state
    if readiness.state.value == previous_state and readiness.reason_code == host.tdx_reason_code:
        return
    _set_readiness(host, readiness)
    _emit_state_change(session, host.name, previous_state, readiness)
    if readiness.reason_code == "tdx_module_update_failed":
        released = release_tdx_vms_of_failed_module(session, host, now)
        emit(session, "host.tdx_module_failed", host.name, {"load_id": str(load.id), "lost_vms": released})
    _touch(host)


def _stored_facts(load: Load) -> LoadFacts:
    return LoadFacts(
        kvm_intel_loaded=load.kvm_intel_loaded,
        tdx_platform=load.tdx_platform,
        tdx_requested=load.tdx_requested,
        tdx_effective=load.tdx_effective,
        keyids_total=load.keyids_total,
        errors=tuple(load.errors or ()),
        kvm_tdx=load.kvm_tdx,
        kernel_log=KernelLog(load.kernel_log) if load.kernel_log else None,
    )


def report_stale_hosts(session: Session, timeout_s: float) -> int:
    """Write one host.stale event per silence. Liveness itself is derived at read time."""
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    stale = session.scalars(
        select(Host).where(
            Host.last_heartbeat_at.is_not(None),
            Host.last_heartbeat_at < cutoff,
            (Host.stale_reported_for.is_(None)) | (Host.stale_reported_for != Host.last_heartbeat_at),
        ).limit(1000)
    ).all()
    for host in stale:
        host.stale_reported_for = host.last_heartbeat_at
        emit(
            session,
            "host.stale",
            host.name,
            {"last_heartbeat_at": as_utc(host.last_heartbeat_at).isoformat() if host.last_heartbeat_at else None},
        )
    return len(stale)


def list_loads(session: Session, name: str, after: int | None, limit: int) -> Page[LoadOut]:
    host = get_host_row(session, name)
    query = select(Load).where(Load.host_id == host.id)
    if after is not None:
        query = query.where(Load.seq < after)
    rows = session.scalars(query.order_by(Load.seq.desc()).limit(limit + 1)).all()
    items = [
        LoadOut(
            id=ld.id,
            host=host.name,
            **{f: getattr(ld, f) for f in _IMMUTABLE_FACTS},
            tdx_state=TdxState(ld.tdx_state),
            tdx_reason=ld.tdx_reason,
            tdx_reason_code=ld.tdx_reason_code,
            tdx_remedy=remedy_of(ld.tdx_reason_code),
            current=ld.seq == host.current_load_seq,
            reported_at=as_utc(ld.reported_at),
        )
        for ld in rows[:limit]
    ]
    nxt = encode_cursor(rows[limit - 1].seq) if len(rows) > limit else None
    return Page[LoadOut](items=items, next=nxt)
