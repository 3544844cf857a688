"""Atomic resource claims: one conditional UPDATE per host, no lock service.

A claim succeeds only if the host is still at the generation the scheduler looked at and still
has room; otherwise it changes nothing and the caller moves on to the next candidate. Every
placement bumps the generation, so two racing claims that both saw generation g cannot both win,
whatever the number of replicas (PostgreSQL re-checks the WHERE clause on the newest row version
after a concurrent writer commits; SQLite has one writer at a time).

On PostgreSQL each attempt runs in a savepoint that is rolled back when the claim loses: the
re-check locks the newest row version *before* it rejects it, and that lock would otherwise stay
until the end of the transaction, so a loser moving on to its next candidate could hold one host
while waiting for another, and two losers could deadlock.
"""

from __future__ import annotations

import uuid

from sqlalchemy import BigInteger, Integer, bindparam, or_, update
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.models import Host, UTCDateTime
from service.prepared import Prepared, connection
from service.scheduler.filters import keyids_in_use_sql, td_vcpu_limit_sql, vcpu_limit_sql
from service.scheduler.types import Context, HostView, VmRequest, memory_charge

# Built once; the values are bound per call (building the statement costs more than running it).
_CLAIM = Prepared(
    update(Host)
    .where(
        Host.id == bindparam("host_id"),
        Host.generation == bindparam("seen_generation"),
        Host.used_vcpus + bindparam("need_vcpus", type_=Integer) <= vcpu_limit_sql(),
        Host.free_memory_mib >= bindparam("need_memory_mib", type_=BigInteger),
        # The same limits as the filters: a TD's vCPUs within the present CPUs (0 for other VMs),
        # and a KeyID free after max(claimed, observed in use).
        td_vcpu_limit_sql() >= bindparam("need_td_vcpus", type_=Integer),
        or_(
            bindparam("need_keyids", type_=Integer) == 0,
            keyids_in_use_sql() + bindparam("need_keyids", type_=Integer) <= Host.keyids_total,
        ),
        # A TD build slot (the policy's TDs per host in scheduled at once).
        or_(
            bindparam("need_builds", type_=Integer) == 0,
            Host.tds_building + bindparam("need_builds", type_=Integer) <= bindparam("max_builds", type_=Integer),
        ),
    )
    .values(
        used_vcpus=Host.used_vcpus + bindparam("need_vcpus", type_=Integer),
        used_memory_mib=Host.used_memory_mib + bindparam("need_memory_mib", type_=BigInteger),
        free_memory_mib=Host.free_memory_mib - bindparam("need_memory_mib", type_=BigInteger),
        used_keyids=Host.used_keyids + bindparam("need_keyids", type_=Integer),
        tds_building=Host.tds_building + bindparam("need_builds", type_=Integer),
        vm_count=Host.vm_count + 1,
        generation=Host.generation + 1,
        updated_at=bindparam("now", type_=UTCDateTime),
    )
)


def try_claim(session: Session, host: HostView, req: VmRequest, ctx: Context) -> bool:
    """Claim ``req``'s resources on ``host`` (its memory charge includes the policy's per-TD
    overhead, and a TD takes a build slot), or change nothing."""
    conn = connection(session)
    savepoint = conn.dialect.name == "postgresql"
    if savepoint:
        conn.exec_driver_sql("SAVEPOINT tdx_claim")
    result = _CLAIM.run(
        conn,
        {
            "host_id": host.id,
            "seen_generation": host.generation,
            "need_vcpus": req.vcpus,
            "need_memory_mib": memory_charge(req, ctx.policy),
            "need_keyids": req.keyids,
            "need_builds": 1 if req.tdx else 0,
            "max_builds": ctx.policy.max_td_builds_per_host,
            "need_td_vcpus": req.vcpus if req.tdx else 0,
            "now": utcnow(),
        },
    )
    won = result.rowcount == 1
    if savepoint:
        conn.exec_driver_sql("RELEASE SAVEPOINT tdx_claim" if won else "ROLLBACK TO SAVEPOINT tdx_claim")
    return won


def release(
    session: Session, host_id: uuid.UUID, vcpus: int, memory_mib: int, keyids: int, builds: int = 0
) -> None:
    """Give a VM's claim back (``memory_mib`` as charged: with its overhead; ``builds``: 1 for a TD
    that was still being built)."""
    session.execute(
        update(Host)
        .where(Host.id == host_id)
        .values(
            used_vcpus=Host.used_vcpus - vcpus,
            used_memory_mib=Host.used_memory_mib - memory_mib,
            free_memory_mib=Host.free_memory_mib + memory_mib,
            used_keyids=Host.used_keyids - keyids,
            tds_building=Host.tds_building - builds,
            vm_count=Host.vm_count - 1,
            generation=Host.generation + 1,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )


def finish_build(session: Session, host_id: uuid.UUID) -> None:
    """A TD placed on ``host_id`` is running: its build slot is free. Not a change of what the host
    offers a scheduler racing on its generation, only of the build count the claim checks itself."""
    session.execute(
        update(Host)
        .where(Host.id == host_id)
        .values(tds_building=Host.tds_building - 1, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
