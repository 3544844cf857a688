"""Atomic resource claims: one conditional UPDATE per host, no lock service.

A claim succeeds only if the host is still at the generation the scheduler looked at and still
has room; otherwise it changes nothing and the caller moves on to the next candidate. Every
placement bumps the generation, so two racing claims that both saw generation g cannot both win,
whatever the number of replicas (PostgreSQL re-checks the WHERE clause on the newest row version
after a concurrent writer commits; SQLite has one writer at a time).
"""

from __future__ import annotations

import uuid

from sqlalchemy import CursorResult, update
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.models import Host
from service.scheduler.filters import vcpu_limit_sql
from service.scheduler.types import HostView, VmRequest


def try_claim(session: Session, host: HostView, req: VmRequest) -> bool:
    stmt = (
        update(Host)
        .where(
            Host.id == host.id,
            Host.generation == host.generation,
            Host.used_vcpus + req.vcpus <= vcpu_limit_sql(),
            Host.free_memory_mib >= req.memory_mib,
            Host.used_keyids + req.keyids <= Host.keyids_total,
        )
        .values(
            used_vcpus=Host.used_vcpus + req.vcpus,
            used_memory_mib=Host.used_memory_mib + req.memory_mib,
            free_memory_mib=Host.free_memory_mib - req.memory_mib,
            used_keyids=Host.used_keyids + req.keyids,
            vm_count=Host.vm_count + 1,
            generation=Host.generation + 1,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    result: CursorResult[tuple[()]] = session.execute(stmt)  # type: ignore[assignment]
    return result.rowcount == 1


def release(session: Session, host_id: uuid.UUID, vcpus: int, memory_mib: int, keyids: int) -> None:
    session.execute(
        update(Host)
        .where(Host.id == host_id)
        .values(
            used_vcpus=Host.used_vcpus - vcpus,
            used_memory_mib=Host.used_memory_mib - memory_mib,
            free_memory_mib=Host.free_memory_mib + memory_mib,
            used_keyids=Host.used_keyids - keyids,
            vm_count=Host.vm_count - 1,
            generation=Host.generation + 1,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
