"""Operations: the guided TDX opt-in of a host (cordon, wait until no VM is active, wait for a new
kvm_intel load, uncordon when it is ready, or stop with the reason and the remedy).

Its state is in the database and only there. Every replica's background loop advances running
operations (runner.py), each in a short transaction that first locks the operation row (``FOR
UPDATE SKIP LOCKED`` on PostgreSQL: a replica never waits on another's, and no two advance one at
once), then the host row; starting and canceling take the same locks. A restart loses nothing: the
next pass of any replica goes on from the stored step. One running operation per host is a unique
partial index, so two replicas starting one at once cannot both succeed.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.clock import as_utc, utcnow
from service.errors import ProblemError, not_found
from service.events import emit
from service.hosts.readiness import TdxState, remedy_of
from service.hosts.service import get_host_row, set_schedulable
from service.ids import uuid7
from service.models import ACTIVE_VM_STATUSES, Host, Operation, Vm
from service.operations.schemas import BlockingVm, HistoryEntry, OperationOut, OperationStatus, Step
from service.pagination import Page, encode_cursor

OPT_IN = "tdx_opt_in"
BLOCKERS_SHOWN = 20


def operation_out(op: Operation) -> OperationOut:
    return OperationOut(
        id=op.id,
        kind=op.kind,
        host=op.host_name,
        status=OperationStatus(op.status),
        step=Step(op.step),
        detail=op.detail,
        blocking_vms=[BlockingVm(**vm) for vm in op.blocking_vms or []],
        blocking_vms_total=op.blocking_total,
        reason_code=op.reason_code,
        reason=op.reason,
        remedy=op.remedy,
        history=[HistoryEntry(**entry) for entry in op.history or []],
        deadline=as_utc(op.deadline),
        generation=op.generation,
        created_at=as_utc(op.created_at),
        updated_at=as_utc(op.updated_at),
        finished_at=as_utc(op.finished_at) if op.finished_at else None,
    )


def _event(session: Session, kind: str, op: Operation, **extra: Any) -> None:
    emit(session, kind, str(op.id), {"host": op.host_name, "kind": op.kind, "step": op.step, **extra})


def _record(op: Operation, step: Step, message: str, now: datetime) -> None:
    op.step = step.value
    op.detail = message
    op.history = [*(op.history or []), {"at": now.isoformat(), "step": step.value, "message": message}]
    op.updated_at = now
    op.generation += 1


def _finish(
    session: Session, op: Operation, status: OperationStatus, step: Step, message: str, now: datetime,
    *, reason_code: str | None = None, reason: str | None = None, remedy: str | None = None,
) -> None:
    _record(op, step, message, now)
    op.status = status.value
    op.finished_at = now
    op.reason_code = reason_code
    op.reason = reason
    op.remedy = remedy
    if status is not OperationStatus.RUNNING:
        op.blocking_vms = []
        op.blocking_total = 0
    extra: dict[str, Any] = {"detail": message}
    if reason_code is not None or reason is not None:
        extra.update(reason_code=reason_code, reason=reason, remedy=remedy)
    _event(session, f"operation.{status.value}", op, **extra)


def start_opt_in(session: Session, name: str, timeout_s: int) -> Operation:
    host = get_host_row(session, name, for_update=True)
    if host.tdx_state == TdxState.READY.value:
        raise ProblemError(409, "tdx_already_ready", f"host {name!r} is TDX-ready already: nothing to opt in")
    running = session.scalar(
        select(Operation.id).where(Operation.host_id == host.id, Operation.status == OperationStatus.RUNNING.value)
    )
    if running is not None:
        raise _in_progress(name, running)
    now = utcnow()
    op = Operation(
        id=uuid7(), kind=OPT_IN, host_id=host.id, host_name=host.name, status=OperationStatus.RUNNING.value,
        step=Step.CORDON.value, detail=None, blocking_vms=[], blocking_total=0,
        start_load_seq=host.current_load_seq, cordoned=False, history=[],
        deadline=now + timedelta(seconds=timeout_s), generation=0, created_at=now, updated_at=now,
    )
    try:
        with session.begin_nested():
            session.add(op)
    except IntegrityError as exc:  # another replica started one for this host at the same moment
        other = session.scalar(
            select(Operation.id).where(Operation.host_id == host.id, Operation.status == OperationStatus.RUNNING.value)
        )
        raise _in_progress(name, other) from exc
    _event(session, "operation.started", op)
    if host.schedulable:
        set_schedulable(session, host, False, reason=f"TDX opt-in {op.id}")
        op.cordoned = True
        _record(op, Step.CORDON, f"cordoned {host.name}: no new VMs land there", now)
    else:
        _record(op, Step.CORDON, f"{host.name} was cordoned already", now)
    _advance(session, op, host, now)
    return op


def _in_progress(name: str, op_id: uuid.UUID | None) -> ProblemError:
    return ProblemError(
        409, "operation_in_progress", f"host {name!r} has a TDX opt-in running already ({op_id})",
        operation_id=str(op_id) if op_id else None,
    )


def _blockers(session: Session, host: Host) -> tuple[list[dict[str, Any]], int]:
    active = (Vm.host_id == host.id) & Vm.status.in_(ACTIVE_VM_STATUSES)
    total = session.scalar(select(func.count()).select_from(Vm).where(active)) or 0
    rows = session.scalars(select(Vm).where(active).order_by(Vm.id).limit(BLOCKERS_SHOWN)).all()
    return [{"id": str(v.id), "name": v.name, "project": v.project, "status": v.status} for v in rows], int(total)


def _advance(session: Session, op: Operation, host: Host | None, now: datetime) -> None:
    """Take the operation as far as the host allows now (several steps at once when they are met)."""
    if host is None:
        _finish(session, op, OperationStatus.FAILED, Step(op.step), "the host was deleted", now,
                reason="the host was deleted during the opt-in")
        return
    if host.schedulable:
        # Someone uncordoned it by hand: new VMs may land, so the drain cannot be relied on.
        _finish(session, op, OperationStatus.CANCELED, Step(op.step),
                f"{host.name} was uncordoned outside the operation", now)
        return
    if op.step in (Step.CORDON.value, Step.WAIT_FOR_EMPTY.value):
        blocking, total = _blockers(session, host)
        if total:
            if as_utc(op.deadline) <= now:
                _timeout(session, op, host, f"{total} VM(s) still active on {host.name}", now)
                return
            if op.step != Step.WAIT_FOR_EMPTY.value or blocking != op.blocking_vms or total != op.blocking_total:
                names = ", ".join(f"{b['name']} ({b['status']})" for b in blocking)
                more = f" and {total - len(blocking)} more" if total > len(blocking) else ""
                op.blocking_vms = blocking
                op.blocking_total = total
                message = (f"waiting for {total} active VM(s) to end (TDs cannot live-migrate; "
                           f"stop or delete them): {names}{more}")
                _record(op, Step.WAIT_FOR_EMPTY, message, now)
                _event(session, "operation.progress", op, detail=message, blocking_vms=total)
            return
        op.blocking_vms = []
        op.blocking_total = 0
        message = (f"no active VM on {host.name}; waiting for a new kvm_intel load: on the host, "
                   "modprobe -r kvm_intel && modprobe kvm_intel tdx=1 (or reboot with kvm_intel.tdx=1)")
        _record(op, Step.WAIT_FOR_LOAD, message, now)
        _event(session, "operation.progress", op, detail=message)
    if op.step == Step.WAIT_FOR_LOAD.value:
        if host.current_load_seq is None or host.current_load_seq == op.start_load_seq:
            if as_utc(op.deadline) <= now:
                _timeout(session, op, host, f"no new kvm_intel load was reported by {host.name}", now)
            return
        _verify(session, op, host, now)


def _verify(session: Session, op: Operation, host: Host, now: datetime) -> None:
    if host.tdx_state != TdxState.READY.value:
        code = host.tdx_reason_code
        message = f"the new load of {host.name} is {host.tdx_state}: {host.tdx_reason or code}; the host stays cordoned"
        _finish(session, op, OperationStatus.FAILED, Step.VERIFY, message, now,
                reason_code=code, reason=host.tdx_reason, remedy=remedy_of(code))
        return
    _record(op, Step.VERIFY, f"the new load of {host.name} is TDX-ready ({host.keyids_total} KeyIDs)", now)
    set_schedulable(session, host, True, reason=f"TDX opt-in {op.id}")
    _finish(session, op, OperationStatus.SUCCEEDED, Step.UNCORDON, f"uncordoned {host.name}: it takes TDX VMs", now)


def _timeout(session: Session, op: Operation, host: Host, what: str, now: datetime) -> None:
    code = host.tdx_reason_code
    _finish(session, op, OperationStatus.FAILED, Step(op.step), f"timed out: {what}; the host stays cordoned", now,
            reason_code=code, reason=f"timed out: {what}", remedy=remedy_of(code))


def advance(session: Session, op_id: uuid.UUID) -> str:
    """One step of the background loop for one operation: ``gone`` when another replica holds it or
    it ended, else its status after advancing."""
    op = session.scalars(
        select(Operation)
        .where(Operation.id == op_id, Operation.status == OperationStatus.RUNNING.value)
        .with_for_update(skip_locked=True)
    ).first()
    if op is None:
        return "gone"
    host = session.scalars(select(Host).where(Host.id == op.host_id).with_for_update()).first()
    before = op.generation
    _advance(session, op, host, utcnow())
    return op.status if op.generation != before else "waiting"


def running_ids(session: Session) -> list[uuid.UUID]:
    return list(
        session.scalars(
            select(Operation.id).where(Operation.status == OperationStatus.RUNNING.value).order_by(Operation.id)
        ).all()
    )


def get_operation(session: Session, op_id: uuid.UUID) -> Operation:
    op = session.get(Operation, op_id)
    if op is None:
        raise not_found("operation", op_id)
    return op


def cancel(session: Session, op_id: uuid.UUID) -> Operation:
    op = session.scalars(select(Operation).where(Operation.id == op_id).with_for_update()).first()
    if op is None:
        raise not_found("operation", op_id)
    if op.status != OperationStatus.RUNNING.value:
        raise ProblemError(409, "operation_finished", f"operation {op_id} is {op.status} already",
                           operation_status=op.status)
    host = session.scalars(select(Host).where(Host.id == op.host_id).with_for_update()).first()
    now = utcnow()
    message = "canceled"
    if host is not None and op.cordoned and not host.schedulable:
        set_schedulable(session, host, True, reason=f"TDX opt-in {op.id} canceled")
        message = f"canceled; {host.name} uncordoned (it was schedulable when the operation began)"
    _finish(session, op, OperationStatus.CANCELED, Step(op.step), message, now)
    return op


def list_operations(
    session: Session, status: OperationStatus | None, host: str | None, after: str | None, limit: int
) -> Page[OperationOut]:
    """Newest first."""
    query = select(Operation)
    if status is not None:
        query = query.where(Operation.status == status.value)
    if host is not None:
        query = query.where(Operation.host_name == host)
    if after is not None:
        try:
            query = query.where(Operation.id < uuid.UUID(str(after)))
        except ValueError as exc:
            raise ProblemError(400, "invalid_cursor", "cursor is not one this server issued") from exc
    rows = session.scalars(query.order_by(Operation.id.desc()).limit(limit + 1)).all()
    items = [operation_out(op) for op in rows[:limit]]
    nxt = encode_cursor(str(items[-1].id)) if len(rows) > limit else None
    return Page[OperationOut](items=items, next=nxt)
