"""The pending queue: pending VMs are retried, highest priority then oldest first, as soon as
capacity may have changed (``capacity_signal``) and on a slow tick; past its deadline a VM fails
with its last explanation.

Safe with several replicas: each VM is retried in its own short transaction that first locks the
VM row with ``FOR UPDATE SKIP LOCKED`` (PostgreSQL), so two replicas never work on the same VM;
placement itself is the same atomic claim as for a new VM.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import uuid
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.clock import as_utc, utcnow
from service.db import Database
from service.hosts.service import report_stale_hosts
from service.metrics import Metrics
from service.models import Vm
from service.signals import Signal
from service.vms.lifecycle import Action, VmStatus
from service.vms.service import (
    CLAIM_CONFLICTS,
    PlacementSettings,
    apply_action,
    emit_vm_event,
    purge_idempotency_keys,
    try_place,
)

log = logging.getLogger("tdx.queue")

BATCH = 500
# A pending VM's explanation is refreshed at most this often when a retry fails again.
REEXPLAIN_AFTER = timedelta(seconds=30)


def _pending_ids(session: Session) -> list[uuid.UUID]:
    return list(
        session.scalars(
            select(Vm.id)
            .where(Vm.status == VmStatus.PENDING.value)
            .order_by(Vm.priority.desc(), Vm.created_at, Vm.id)
            .limit(BATCH)
        ).all()
    )


def _retry_one(
    session: Session, vm_id: uuid.UUID, ps: PlacementSettings, rng: random.Random
) -> tuple[str, int]:
    """Retry one pending VM; its outcome and the claims it lost to concurrent placements."""
    outcome = _retry(session, vm_id, ps, rng)
    return outcome, session.info.get(CLAIM_CONFLICTS, 0)


def _retry(session: Session, vm_id: uuid.UUID, ps: PlacementSettings, rng: random.Random) -> str:
    vm = session.scalars(
        select(Vm)
        .where(Vm.id == vm_id, Vm.status == VmStatus.PENDING.value)
        .with_for_update(skip_locked=True)
    ).first()
    if vm is None:
        return "gone"
    now = utcnow()
    if as_utc(vm.deadline) <= now:
        apply_action(session, vm, Action.DEADLINE, f"no host within the deadline: {vm.explanation}")
        return "failed"
    explain = now - as_utc(vm.updated_at) >= REEXPLAIN_AFTER
    if try_place(session, vm, ps, rng, now, explain=explain):
        emit_vm_event(session, "vm.scheduled", vm)
        return "scheduled"
    return "pending"


async def run_pass(db: Database, ps: PlacementSettings, rng: random.Random, metrics: Metrics) -> dict[str, int]:
    """One sweep over the queue, each VM in its own transaction (and, on SQLite, the event loop
    serves requests between them)."""
    outcome: dict[str, int] = {}
    for vm_id in await db.run(_pending_ids, write=False):
        result, conflicts = await db.run(functools.partial(_retry_one, vm_id=vm_id, ps=ps, rng=rng))
        outcome[result] = outcome.get(result, 0) + 1
        if conflicts:
            metrics.claim_conflicts.inc(conflicts)
        if result in ("scheduled", "failed"):
            metrics.placements.labels(result=result).inc()
    return outcome


async def housekeeping(db: Database, ps: PlacementSettings) -> None:
    await db.run(functools.partial(report_stale_hosts, timeout_s=ps.heartbeat_timeout_s))
    await db.run(functools.partial(purge_idempotency_keys, ttl_s=ps.idempotency_ttl_s))


async def run_forever(
    db: Database, ps: PlacementSettings, signal: Signal, tick_s: float, rng: random.Random, metrics: Metrics
) -> None:
    loop = asyncio.get_running_loop()
    last_housekeeping = -tick_s
    while True:
        seen = signal.version
        try:
            await run_pass(db, ps, rng, metrics)
            if loop.time() - last_housekeeping >= tick_s:
                last_housekeeping = loop.time()
                await housekeeping(db, ps)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("pending-queue pass failed; retrying on the next tick")
        await signal.wait(seen, tick_s)
