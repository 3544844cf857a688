"""Project quotas: what a VM counts for, the exact claim a create makes, the release when a VM ends.

Usage is kept, not recounted: one row per project (``projects``) whose counters move in the same
transaction as the VM whose status changes. A create claims with one conditional UPDATE that adds
the VM's resources only if every limit still holds, like the host claims of
service/scheduler/claims.py: on PostgreSQL a concurrent claim on the same row waits for the first
to commit and then re-checks the WHERE clause on the newest row version, so 60 concurrent creates
against ``vms: 20`` give exactly 20 VMs whatever the number of replicas; SQLite has one writer.

The claim runs late in the create transaction (after placement), so that the project row is locked
only for the transaction's tail, which the event log already serializes (service/events.py).
Lock order everywhere: a host before a project; several projects in name order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    BindParameter,
    ColumnElement,
    SQLColumnExpression,
    and_,
    bindparam,
    case,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.errors import ProblemError
from service.models import Project, Vm
from service.prepared import Prepared, connection
from service.vms.lifecycle import COUNTS_FOR_QUOTA

RESOURCES = ("vms", "vcpus", "memory_mib", "tdx_vms")


@dataclass(frozen=True, slots=True)
class Resources:
    """An amount of each quota resource: a VM's need, a project's usage or its limits' headroom."""

    vms: int = 0
    vcpus: int = 0
    memory_mib: int = 0
    tdx_vms: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.vms + other.vms,
            self.vcpus + other.vcpus,
            self.memory_mib + other.memory_mib,
            self.tdx_vms + other.tdx_vms,
        )

    def as_dict(self) -> dict[str, int]:
        return {r: getattr(self, r) for r in RESOURCES}


@dataclass(frozen=True, slots=True)
class Limits:
    """A project's limits; None: no limit."""

    vms: int | None = None
    vcpus: int | None = None
    memory_mib: int | None = None
    tdx_vms: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return {r: getattr(self, r) for r in RESOURCES}


@dataclass(frozen=True, slots=True)
class Exceeded:
    resource: str
    limit: int
    usage: int
    request: int


def need_of(vcpus: int, memory_mib: int, tdx: bool) -> Resources:
    """What one VM counts for: itself, its vCPUs and memory, and one KeyID when it is a TD."""
    return Resources(1, vcpus, memory_mib, 1 if tdx else 0)


def first_exceeded(limits: Limits, usage: Resources, need: Resources) -> Exceeded | None:
    """The first resource (in ``RESOURCES`` order) that ``need`` would take past its limit.
    A request that needs none of a resource is never refused for it, even when a lowered limit
    is already below the usage."""
    for resource in RESOURCES:
        limit: int | None = getattr(limits, resource)
        wanted: int = getattr(need, resource)
        used: int = getattr(usage, resource)
        if limit is not None and wanted > 0 and used + wanted > limit:
            return Exceeded(resource, limit, used, wanted)
    return None


def limits_of(row: Project) -> Limits:
    return Limits(row.limit_vms, row.limit_vcpus, row.limit_memory_mib, row.limit_tdx_vms)


def usage_of(row: Project) -> Resources:
    return Resources(row.used_vms, row.used_vcpus, row.used_memory_mib, row.used_tdx_vms)


def _need(name: str) -> BindParameter[int]:
    return bindparam(name, type_=BigInteger)


def _within(used: SQLColumnExpression[int], limit: SQLColumnExpression[int | None], need: str) -> ColumnElement[bool]:
    """SQL for ``first_exceeded`` finding nothing wrong with one resource."""
    return or_(limit.is_(None), _need(need) == 0, used + _need(need) <= limit)


# Built once; the values are bound per call (building the statement costs more than running it).
_CLAIM = Prepared(
    update(Project)
    .where(
        Project.name == bindparam("project"),
        and_(
            _within(Project.used_vms, Project.limit_vms, "vms"),
            _within(Project.used_vcpus, Project.limit_vcpus, "vcpus"),
            _within(Project.used_memory_mib, Project.limit_memory_mib, "memory_mib"),
            _within(Project.used_tdx_vms, Project.limit_tdx_vms, "tdx_vms"),
        ),
    )
    .values(
        used_vms=Project.used_vms + _need("vms"),
        used_vcpus=Project.used_vcpus + _need("vcpus"),
        used_memory_mib=Project.used_memory_mib + _need("memory_mib"),
        used_tdx_vms=Project.used_tdx_vms + _need("tdx_vms"),
    )
)
_RELEASE = (
    update(Project)
    .where(Project.name == bindparam("project"))
    .values(
        used_vms=Project.used_vms - _need("vms"),
        used_vcpus=Project.used_vcpus - _need("vcpus"),
        used_memory_mib=Project.used_memory_mib - _need("memory_mib"),
        used_tdx_vms=Project.used_tdx_vms - _need("tdx_vms"),
    )
)


def ensure_project(session: Session, project: str) -> None:
    """The project's row, created empty (no limits, no usage) if it does not exist yet; safe
    against a concurrent creator (the loser's insert does nothing)."""
    conn = session.connection()
    now = utcnow()
    values = {"name": project, "used_vms": 0, "used_vcpus": 0, "used_memory_mib": 0, "used_tdx_vms": 0,
              "generation": 0, "created_at": now, "updated_at": now}
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    conn.execute(insert(Project).values(values).on_conflict_do_nothing(index_elements=["name"]))


def claim(session: Session, project: str, need: Resources) -> None:
    """Count ``need`` against ``project``'s quota in the caller's transaction, or raise 403
    ``quota_exceeded`` (the caller's transaction is then rolled back: nothing is written)."""
    if session.new or session.dirty or session.deleted:
        session.flush()  # the VM row first: lock order is host, then project, then nothing else
    conn = connection(session)
    params = {"project": project, **need.as_dict()}
    for _ in range(3):
        if _CLAIM.run(conn, params).rowcount == 1:
            return
        row = session.get(Project, project, populate_existing=True)
        if row is None:
            ensure_project(session, project)
            continue
        exceeded = first_exceeded(limits_of(row), usage_of(row), need)
        if exceeded is not None:
            raise quota_exceeded(project, exceeded)
        # A concurrent release landed between the claim and the read: claim again.
    raise ProblemError(503, "quota_contended", "the project's quota is changing too fast; retry")


def quota_exceeded(project: str, e: Exceeded) -> ProblemError:
    return ProblemError(
        403,
        "quota_exceeded",
        f"project {project!r} would exceed its {e.resource} quota: {e.usage} in use + {e.request} "
        f"requested > limit {e.limit}",
        project=project,
        resource=e.resource,
        limit=e.limit,
        usage=e.usage,
        request=e.request,
    )


def release(session: Session, project: str, amount: Resources) -> None:
    """Give ``amount`` back to ``project``: a VM of it ended (deleted, failed, lost)."""
    session.connection().execute(_RELEASE, {"project": project, **amount.as_dict()})


def release_many(session: Session, amounts: Mapping[str, Resources]) -> None:
    """Several projects at once, in name order (the lock order between projects)."""
    for project in sorted(amounts):
        release(session, project, amounts[project])


def recount(session: Session) -> dict[str, Resources]:
    """Usage per project counted from the VMs themselves (what the kept counters must equal)."""
    rows = session.execute(
        select(
            Vm.project,
            func.count(),
            func.coalesce(func.sum(Vm.vcpus), 0),
            func.coalesce(func.sum(Vm.memory_mib), 0),
            func.coalesce(func.sum(case((Vm.tdx, 1), else_=0)), 0),
        )
        .where(Vm.status.in_(sorted(s.value for s in COUNTS_FOR_QUOTA)))
        .group_by(Vm.project)
    ).all()
    return {str(p): Resources(int(n), int(v), int(m), int(t)) for p, n, v, m, t in rows}


def kept(session: Session) -> dict[str, Resources]:
    """The kept counters of every project with any usage."""
    rows = session.scalars(select(Project).where(Project.used_vms != 0)).all()
    return {row.name: usage_of(row) for row in rows}
