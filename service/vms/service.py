"""VM rules: creation with immediate placement, idempotency, deletion, agent status reports."""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.auth import Principal
from service.clock import as_utc, utcnow
from service.errors import ProblemError, not_found
from service.events import emit
from service.ids import uuid7
from service.models import ACTIVE_VM_STATUSES, Host, IdempotencyKey, Vm
from service.pagination import Page, encode_cursor
from service.policy import service as fleet_policy
from service.policy.schemas import PolicyDefaults
from service.prepared import Prepared, connection
from service.projects import quota
from service.scheduler.claims import finish_build, release
from service.scheduler.engine import SchedulerConfig, place
from service.scheduler.explain import count_reasons, explanation
from service.scheduler.shape_memo import placement_class
from service.scheduler.types import Context, Policy, VmRequest
from service.vms.lifecycle import (
    EVENT_KIND,
    Action,
    InvalidTransition,
    VmStatus,
    ends_usage,
    releases,
    transition,
)
from service.vms.schemas import VmCreate, VmOut, VmStatusReport

DEFAULT_PROJECT = "default"
# Session key under which placements count the claims they lost to concurrent placements.
CLAIM_CONFLICTS = "tdx_claim_conflicts"


@dataclass(frozen=True, slots=True)
class PlacementSettings:
    heartbeat_timeout_s: float
    schedule_timeout_s: int
    idempotency_ttl_s: int
    scheduler: SchedulerConfig
    policy_defaults: PolicyDefaults = field(
        default_factory=lambda: PolicyDefaults(max_td_builds_per_host=4, td_memory_overhead_mib=0)
    )


@dataclass(frozen=True, slots=True)
class VmFilters:
    statuses: tuple[VmStatus, ...] | None = None  # any of these
    host: str | None = None
    project: str | None = None
    tdx: bool | None = None


def vm_out(vm: Vm) -> VmOut:
    return VmOut(
        id=vm.id,
        name=vm.name,
        project=vm.project,
        vcpus=vm.vcpus,
        memory_mib=vm.memory_mib,
        tdx=vm.tdx,
        attestation=vm.attestation,
        memory_overhead_mib=vm.memory_overhead_mib,
        selector=vm.selector,
        anti_affinity_group=vm.anti_affinity_group,
        priority=vm.priority,
        status=VmStatus(vm.status),
        status_detail=vm.status_detail,
        host=vm.host_name,
        explanation=vm.explanation,
        reasons=vm.reasons,
        deadline=as_utc(vm.deadline),
        generation=vm.generation,
        created_at=as_utc(vm.created_at),
        updated_at=as_utc(vm.updated_at),
    )


def vm_request(vm: Vm) -> VmRequest:
    return VmRequest(
        vcpus=vm.vcpus,
        memory_mib=vm.memory_mib,
        tdx=vm.tdx,
        selector=tuple(sorted(vm.selector.items())),
        anti_affinity_group=vm.anti_affinity_group,
        attestation=vm.attestation,
    )


def vm_need(vm: Vm) -> quota.Resources:
    return quota.need_of(vm.vcpus, vm.memory_mib, vm.tdx)


def placement_context(now: datetime, heartbeat_timeout_s: float, policy: Policy | None = None) -> Context:
    return Context(alive_after=now - timedelta(seconds=heartbeat_timeout_s), policy=policy or Policy())


def _event_data(vm: Vm, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"id": str(vm.id), "name": vm.name, "status": vm.status, "host": vm.host_name}
    data.update(extra)
    return data


def emit_vm_event(session: Session, kind: str, vm: Vm, **extra: Any) -> None:
    emit(session, kind, str(vm.id), _event_data(vm, **extra), project=vm.project)


def resolve_project(body: VmCreate, principal: Principal) -> str:
    if principal.role == "client":
        if body.project is not None and body.project != principal.project:
            raise ProblemError(403, "forbidden", f"this token may only create VMs in project {principal.project!r}")
        assert principal.project is not None
        return principal.project
    return body.project or DEFAULT_PROJECT


def _request_hash(body: VmCreate, project: str) -> str:
    canonical = body.model_dump(mode="json")
    canonical["project"] = project
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def try_place(
    session: Session, vm: Vm, ps: PlacementSettings, rng: random.Random, now: datetime, *, explain: bool = True,
    policy: Policy | None = None,
) -> bool:
    """Place a pending VM now if anything fits, True when placed. Else, with ``explain``, record
    why not (counted over every host); without it, leave the VM as it was. ``policy``: the fleet
    policy, when the caller read it already (it is read in this transaction otherwise)."""
    req = vm_request(vm)
    if policy is None:
        policy = fleet_policy.current(session, ps.policy_defaults).scheduler
    ctx = placement_context(now, ps.heartbeat_timeout_s, policy)
    placement = place(session, req, ctx, ps.scheduler, rng)
    session.info[CLAIM_CONFLICTS] = session.info.get(CLAIM_CONFLICTS, 0) + placement.conflicts
    if placement.host is None and not explain:
        return False
    if placement.host is not None:
        vm.updated_at = now
        vm.generation += 1
        vm.status = VmStatus.SCHEDULED.value
        vm.host_id = placement.host.id
        vm.host_name = placement.host.name
        vm.memory_overhead_mib = policy.td_memory_overhead_mib if vm.tdx else 0
        vm.explanation = f"scheduled on {placement.host.name}"
        vm.reasons = {}
        return True
    rc = count_reasons(session, req, ctx)
    text = explanation(req, rc)
    if rc.fits > 0:
        text += f"; {placement.conflicts} claim(s) lost to concurrent placements, retrying"
    vm.explained_at = now
    if text == vm.explanation and rc.counts == vm.reasons:
        return False  # the same reasons: nothing changed (no generation bump, so no event owed)
    vm.updated_at = now
    vm.generation += 1
    vm.explanation = text
    vm.reasons = rc.counts
    return False


def emit_unschedulable(session: Session, vm: Vm) -> None:
    """A pending VM's explanation is news: at creation, and whenever a retry explains it anew."""
    emit_vm_event(
        session, "vm.unschedulable", vm, explanation=vm.explanation, reasons=vm.reasons, generation=vm.generation
    )


def _existing_for_key(session: Session, principal: Principal, key: str, ttl_s: int) -> IdempotencyKey | None:
    row = session.get(IdempotencyKey, (principal.key, key))
    if row is not None and as_utc(row.created_at) < utcnow() - timedelta(seconds=ttl_s):
        session.delete(row)
        session.flush()
        return None
    return row


def _replay(session: Session, row: IdempotencyKey, request_hash: str) -> Vm:
    if row.request_hash != request_hash:
        raise ProblemError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request body",
        )
    vm = session.get(Vm, row.vm_id)
    if vm is None:
        raise ProblemError(409, "idempotency_key_reused", "the VM created with this key no longer exists")
    return vm


def create_vm(
    session: Session,
    body: VmCreate,
    principal: Principal,
    ps: PlacementSettings,
    rng: random.Random,
    idempotency_key: str | None,
) -> tuple[Vm, bool]:
    """Returns the VM and whether it was created by this call (False: an idempotent replay)."""
    project = resolve_project(body, principal)
    vm_id = uuid7()
    if idempotency_key is not None:
        request_hash = _request_hash(body, project)
        existing = _existing_for_key(session, principal, idempotency_key, ps.idempotency_ttl_s)
        if existing is not None:
            return _replay(session, existing, request_hash), False
        # Written first: a concurrent request with the same key waits here, then replays.
        try:
            with session.begin_nested():
                session.add(
                    IdempotencyKey(
                        principal=principal.key, key=idempotency_key, request_hash=request_hash, vm_id=vm_id
                    )
                )
        except IntegrityError:
            winner = session.get(IdempotencyKey, (principal.key, idempotency_key), populate_existing=True)
            if winner is None:
                raise
            return _replay(session, winner, request_hash), False
    now = utcnow()
    vm = Vm(
        id=vm_id,
        name=body.name,
        project=project,
        vcpus=body.vcpus,
        memory_mib=body.memory_mib,
        tdx=body.tdx,
        attestation=body.attestation,
        memory_overhead_mib=0,
        selector=dict(body.selector),
        anti_affinity_group=body.anti_affinity_group,
        priority=body.priority,
        status=VmStatus.PENDING.value,
        deadline=now + timedelta(seconds=body.schedule_timeout_s or ps.schedule_timeout_s),
        generation=0,
        reasons={},
        created_at=now,
        updated_at=now,
    )
    vm.placement_class = placement_class(vm_request(vm))
    placed = try_place(session, vm, ps, rng, now)
    # A plain INSERT, not the ORM's unit of work (its flush cost as much as the placement's reads);
    # the VM object stays transient: it only carries the values to the reply and the events.
    _INSERT_VM.run(connection(session), _vm_row(vm))
    # After placement, so that the project's row is locked only for the transaction's tail.
    quota.claim(session, project, vm_need(vm))
    emit_vm_event(session, "vm.created", vm, project=project, tdx=vm.tdx)
    if placed:
        emit_vm_event(session, "vm.scheduled", vm)
    else:
        emit_unschedulable(session, vm)
    return vm, True


_VM_COLUMNS = tuple(c.key for c in Vm.__table__.columns)
_INSERT_VM = Prepared(insert(Vm).values({name: bindparam(name) for name in _VM_COLUMNS}))


def _vm_row(vm: Vm) -> dict[str, Any]:
    row = {name: getattr(vm, name) for name in _VM_COLUMNS if name != "queue_rank"}
    row["queue_rank"] = -vm.priority  # the column default's value (service/models.py)
    return row


def visible_vm(session: Session, vm_id: uuid.UUID, principal: Principal, *, for_update: bool = False) -> Vm:
    query = select(Vm).where(Vm.id == vm_id)
    if for_update:
        query = query.with_for_update()
    vm = session.scalars(query).first()
    if vm is None or not _may_see(vm, principal):
        raise not_found("vm", vm_id)
    return vm


def _may_see(vm: Vm, principal: Principal) -> bool:
    if principal.role in ("admin", "reader"):
        return True
    if principal.role == "client":
        return vm.project == principal.project
    return principal.role == "agent" and vm.host_name is not None and vm.host_name == principal.host


def list_vms(session: Session, filters: VmFilters, after: str | None, limit: int) -> Page[VmOut]:
    query = select(Vm)
    if filters.statuses:
        query = query.where(Vm.status.in_([s.value for s in filters.statuses]))
    if filters.host is not None:
        query = query.where(Vm.host_name == filters.host)
    if filters.project is not None:
        query = query.where(Vm.project == filters.project)
    if filters.tdx is not None:
        query = query.where(Vm.tdx == filters.tdx)
    if after is not None:
        try:
            query = query.where(Vm.id > uuid.UUID(str(after)))
        except ValueError as exc:
            raise ProblemError(400, "invalid_cursor", "cursor is not one this server issued") from exc
    rows = session.scalars(query.order_by(Vm.id).limit(limit + 1)).all()
    items = [vm_out(v) for v in rows[:limit]]
    nxt = encode_cursor(str(items[-1].id)) if len(rows) > limit else None
    return Page[VmOut](items=items, next=nxt)


def apply_action(session: Session, vm: Vm, action: Action, detail: str | None = None) -> bool:
    """Move ``vm`` along the state machine; True when something changed."""
    old = VmStatus(vm.status)
    try:
        step = transition(old, action)
    except InvalidTransition as exc:
        raise ProblemError(
            409, "invalid_transition", str(exc), vm_status=old.value, action=action.value
        ) from exc
    if not step.changes:
        return False
    building = vm.tdx and old is VmStatus.SCHEDULED and vm.host_id is not None
    if releases(old, step.to) and vm.host_id is not None:
        release(
            session, vm.host_id, vm.vcpus, vm.memory_mib + vm.memory_overhead_mib, 1 if vm.tdx else 0,
            builds=1 if building else 0,
        )
    elif building and step.to is not VmStatus.SCHEDULED and vm.host_id is not None:
        finish_build(session, vm.host_id)
    if ends_usage(old, step.to):
        quota.release(session, vm.project, vm_need(vm))
    vm.status = step.to.value
    if detail is not None:
        vm.status_detail = detail
    vm.updated_at = utcnow()
    vm.generation += 1
    emit_vm_event(session, EVENT_KIND[step.to], vm, **({"detail": detail} if detail else {}))
    return True


def delete_vm(session: Session, vm_id: uuid.UUID, principal: Principal) -> Vm:
    vm = visible_vm(session, vm_id, principal, for_update=True)
    if principal.role not in ("admin", "client"):
        raise ProblemError(403, "forbidden", "only the VM's project or an admin may delete it")
    apply_action(session, vm, Action.USER_DELETE)
    return vm


def report_status(session: Session, vm_id: uuid.UUID, body: VmStatusReport, principal: Principal) -> Vm:
    vm = visible_vm(session, vm_id, principal, for_update=True)
    if principal.role != "admin" and not (principal.role == "agent" and vm.host_name == principal.host):
        raise ProblemError(403, "forbidden", "only the agent of the VM's host reports its status")
    apply_action(session, vm, Action(body.status), body.detail)
    return vm


def host_vms(
    session: Session, host: str, statuses: tuple[str, ...], after: str | None, limit: int
) -> Page[VmOut]:
    if session.scalar(select(Host.id).where(Host.name == host)) is None:
        raise not_found("host", host)
    query = select(Vm).where(Vm.host_name == host, Vm.status.in_(statuses))
    if after is not None:
        query = query.where(Vm.id > uuid.UUID(str(after)))
    rows = session.scalars(query.order_by(Vm.id).limit(limit + 1)).all()
    items = [vm_out(v) for v in rows[:limit]]
    return Page[VmOut](items=items, next=encode_cursor(str(items[-1].id)) if len(rows) > limit else None)


def release_vms_of_rebooted_host(session: Session, host: Host, now: datetime) -> int:
    """The host restarted: what ran there is gone. Its VMs become ``lost`` (or ``deleted`` when a
    delete was already under way) and the host's usage is given back."""
    return _release_gone_vms(session, host, now, "the host rebooted", tdx_only=False)


def release_tdx_vms_of_failed_module(session: Session, host: Host, now: datetime) -> int:
    """The host's TDX module failed (a runtime update went wrong): its TDs are gone, other VMs run on."""
    return _release_gone_vms(session, host, now, "the host's TDX module failed", tdx_only=True)


def _release_gone_vms(session: Session, host: Host, now: datetime, detail: str, *, tdx_only: bool) -> int:
    query = select(Vm).where(Vm.host_id == host.id, Vm.status.in_(ACTIVE_VM_STATUSES))
    if tdx_only:
        query = query.where(Vm.tdx.is_(True))
    vms = session.scalars(query.with_for_update()).all()
    ended: dict[str, quota.Resources] = {}
    for vm in vms:
        if vm.tdx and vm.status == VmStatus.SCHEDULED.value:
            host.tds_building -= 1  # a TD still being built
        step = transition(VmStatus(vm.status), Action.HOST_REBOOTED)
        if ends_usage(VmStatus(vm.status), step.to):
            ended[vm.project] = ended.get(vm.project, quota.Resources()) + vm_need(vm)
        vm.status = step.to.value
        vm.status_detail = detail
        vm.updated_at = now
        vm.generation += 1
        emit_vm_event(session, EVENT_KIND[step.to], vm, detail=detail)
        host.used_vcpus -= vm.vcpus
        host.used_memory_mib -= vm.memory_mib + vm.memory_overhead_mib
        host.used_keyids -= 1 if vm.tdx else 0
        host.vm_count -= 1
    quota.release_many(session, ended)
    return len(vms)


def purge_idempotency_keys(session: Session, ttl_s: int) -> None:
    session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.created_at < utcnow() - timedelta(seconds=ttl_s))
    )
