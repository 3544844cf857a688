"""Project quota rules: read, set (admin), list. The usage itself is kept by quota.py."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.auth import Principal
from service.clock import utcnow
from service.errors import ProblemError
from service.events import emit
from service.models import Project
from service.pagination import Page, encode_cursor
from service.preconditions import parse_if_match, shown
from service.projects import quota
from service.projects.schemas import LimitsOut, QuotaLimits, QuotaOut, QuotaUsageOut


def quota_out(project: str, row: Project | None) -> QuotaOut:
    limits = quota.limits_of(row) if row is not None else quota.Limits()
    usage = quota.usage_of(row) if row is not None else quota.Resources()
    return QuotaOut(
        project=project,
        limits=LimitsOut(**limits.as_dict()),
        usage=QuotaUsageOut(**usage.as_dict()),
        generation=row.generation if row is not None else 0,
    )


def require_reader_of(principal: Principal, project: str) -> None:
    """Admins and readers see every project's quota; a client token only its own project's."""
    if principal.role in ("admin", "reader"):
        return
    if principal.role == "client" and principal.project == project:
        return
    raise ProblemError(403, "forbidden", f"this token may not read project {project!r}'s quota")


def get_quota(session: Session, project: str) -> QuotaOut:
    """Any project name has a quota: one never seen has no limits and no usage."""
    return quota_out(project, session.get(Project, project))


def set_quota(session: Session, project: str, body: QuotaLimits, if_match: str | None) -> QuotaOut:
    """Replace the limits. A limit below the current usage refuses new VMs and touches none of the
    existing ones."""
    row = session.scalars(select(Project).where(Project.name == project).with_for_update()).first()
    accepted = parse_if_match(if_match)
    current = row.generation if row is not None else 0
    if accepted is not None and current not in accepted:
        raise ProblemError(
            412,
            "precondition_failed",
            f"project {project!r}'s quota is at generation {current}, not {shown(if_match)}",
            current_generation=current,
        )
    wanted = (body.vms, body.vcpus, body.memory_mib, body.tdx_vms)
    stored = (row.limit_vms, row.limit_vcpus, row.limit_memory_mib, row.limit_tdx_vms) if row else (None,) * 4
    if wanted == stored:
        return quota_out(project, row)  # the same limits: same generation, no event
    if row is None:
        quota.ensure_project(session, project)
        row = session.scalars(select(Project).where(Project.name == project).with_for_update()).one()
    before = quota.limits_of(row)
    row.limit_vms = body.vms
    row.limit_vcpus = body.vcpus
    row.limit_memory_mib = body.memory_mib
    row.limit_tdx_vms = body.tdx_vms
    row.generation += 1
    row.updated_at = utcnow()
    out = quota_out(project, row)
    emit(
        session,
        "project.quota_updated",
        project,
        {
            "limits": out.limits.model_dump(),
            "previous": before.as_dict(),
            "usage": out.usage.model_dump(),
            "generation": out.generation,
        },
        project=project,
    )
    return out


def list_projects(session: Session, after: str | None, limit: int) -> Page[QuotaOut]:
    """Every project with a quota or VMs, by name."""
    query = select(Project)
    if after is not None:
        query = query.where(Project.name > after)
    rows = session.scalars(query.order_by(Project.name).limit(limit + 1)).all()
    items = [quota_out(r.name, r) for r in rows[:limit]]
    return Page[QuotaOut](items=items, next=encode_cursor(items[-1].project) if len(rows) > limit else None)
