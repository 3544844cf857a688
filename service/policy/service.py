"""The fleet's TDX policy: one row, read inside the transaction that applies it (a placement, a
queue retry), so every replica applies the same policy with no cache to invalidate.

What is policy and what is a setting: the rules an operator tunes while the fleet runs (the TDX
module floor, TD build bursts, the per-TD memory overhead) are policy: in the database, changed with
``PUT /v1/policy``, evented (``policy.updated``), the same on every replica at once. What a process
needs to start (database, timeouts, the queue's tick) stays a setting; two settings give the
policy's numbers their defaults until a PUT sets them (``TDX_MAX_TD_BUILDS_PER_HOST``,
``TDX_TD_MEMORY_OVERHEAD_MIB``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.clock import as_utc, utcnow
from service.errors import ProblemError
from service.events import emit
from service.models import FleetPolicy
from service.policy.schemas import PolicyDefaults, PolicyOut, PolicyUpdate
from service.policy.versions import version_key
from service.prepared import Prepared, connection
from service.scheduler.types import Policy

POLICY_ID = 1
FIELDS = ("tdx_min_module_version", "max_td_builds_per_host", "td_memory_overhead_mib")


class _PolicyRow(NamedTuple):
    tdx_min_module_version: str | None
    tdx_min_module_key: str | None
    max_td_builds_per_host: int | None
    td_memory_overhead_mib: int | None
    generation: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    scheduler: Policy
    generation: int
    updated_at: datetime | None  # None: never set (the defaults apply)


def _effective(row: FleetPolicy | _PolicyRow | None, defaults: PolicyDefaults) -> EffectivePolicy:
    if row is None or row.generation == 0:
        return EffectivePolicy(
            Policy(
                max_td_builds_per_host=defaults.max_td_builds_per_host,
                td_memory_overhead_mib=defaults.td_memory_overhead_mib,
            ),
            0,
            None,
        )
    return EffectivePolicy(
        Policy(
            min_module_version=row.tdx_min_module_version,
            min_module_key=row.tdx_min_module_key,
            max_td_builds_per_host=(
                row.max_td_builds_per_host if row.max_td_builds_per_host is not None
                else defaults.max_td_builds_per_host
            ),
            td_memory_overhead_mib=(
                row.td_memory_overhead_mib if row.td_memory_overhead_mib is not None
                else defaults.td_memory_overhead_mib
            ),
        ),
        row.generation,
        as_utc(row.updated_at),
    )


# Built once; a plain row, not an ORM object: every placement reads it (an ORM get cost more than
# the rest of the placement's reads together).
_CURRENT = Prepared(select(
    FleetPolicy.tdx_min_module_version,
    FleetPolicy.tdx_min_module_key,
    FleetPolicy.max_td_builds_per_host,
    FleetPolicy.td_memory_overhead_mib,
    FleetPolicy.generation,
    FleetPolicy.updated_at,
).where(FleetPolicy.id == POLICY_ID))


def current(session: Session, defaults: PolicyDefaults) -> EffectivePolicy:
    rows = _CURRENT.rows(connection(session), {})
    return _effective(_PolicyRow(*rows[0]) if rows else None, defaults)


def policy_out(policy: EffectivePolicy, defaults: PolicyDefaults) -> PolicyOut:
    p = policy.scheduler
    return PolicyOut(
        tdx_min_module_version=p.min_module_version,
        max_td_builds_per_host=p.max_td_builds_per_host,
        td_memory_overhead_mib=p.td_memory_overhead_mib,
        defaults=defaults,
        generation=policy.generation,
        updated_at=policy.updated_at,
    )


def _locked_row(session: Session) -> FleetPolicy:
    row = session.scalars(select(FleetPolicy).where(FleetPolicy.id == POLICY_ID).with_for_update()).first()
    if row is not None:
        return row
    try:
        with session.begin_nested():
            session.add(FleetPolicy(id=POLICY_ID, generation=0, updated_at=utcnow()))
    except IntegrityError:  # another replica created it first: take its row
        pass
    row = session.scalars(
        select(FleetPolicy).where(FleetPolicy.id == POLICY_ID).with_for_update().execution_options(
            populate_existing=True
        )
    ).first()
    assert row is not None
    return row


def _stored(row: FleetPolicy) -> dict[str, Any]:
    return {f: getattr(row, f) for f in FIELDS}


def update(
    session: Session, body: PolicyUpdate, defaults: PolicyDefaults, accepted: list[int] | None
) -> EffectivePolicy:
    """Set the fields ``body`` names. A change emits ``policy.updated``, which wakes the pending queue
    (its VMs are retried and re-explained under the new policy); placed VMs stay where they are."""
    row = _locked_row(session)
    if accepted is not None and row.generation not in accepted:
        raise ProblemError(
            412, "precondition_failed", f"the policy is at generation {row.generation}",
            current_generation=row.generation,
        )
    before = _effective(row, defaults)
    old = _stored(row)
    for name in body.model_fields_set:
        setattr(row, name, getattr(body, name))
    row.tdx_min_module_key = version_key(row.tdx_min_module_version)
    new = _stored(row)
    changed = sorted(f for f in FIELDS if old[f] != new[f])
    if not changed:
        return before
    row.generation += 1
    row.updated_at = utcnow()
    after = _effective(row, defaults)
    emit(
        session, "policy.updated", "policy",
        {
            "changed": changed, "generation": row.generation,
            "policy": policy_out(after, defaults).model_dump(mode="json", exclude={"defaults", "updated_at"}),
        },
    )
    return after
