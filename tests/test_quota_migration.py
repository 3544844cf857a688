"""The quotas migration starts an existing deployment with usage equal to a recount of its VMs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import command
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from service.migrate import alembic_config
from service.models import Project, Vm
from service.projects import quota
from service.scheduler.shape_memo import placement_class
from service.vms.service import vm_request


def test_existing_vms_become_the_projects_usage(fresh_url: str) -> None:
    cfg = alembic_config(fresh_url)
    command.upgrade(cfg, "0003_quotas-1")  # the schema just before the quotas migration
    now = datetime.now(UTC)
    when = sa.DateTime(timezone=True)
    vms = sa.table(
        "vms", sa.column("id", sa.Uuid()), sa.column("name"), sa.column("project"), sa.column("vcpus"),
        sa.column("memory_mib"), sa.column("tdx", sa.Boolean()), sa.column("selector", sa.JSON()),
        sa.column("anti_affinity_group"), sa.column("priority"), sa.column("status"),
        sa.column("reasons", sa.JSON()), sa.column("deadline", when), sa.column("generation"),
        sa.column("created_at", when), sa.column("updated_at", when),
    )
    rows = [
        ("a", 2, 1024, True, "pending", {"zone": "x"}, "g"),
        ("a", 4, 2048, False, "running", {}, None),
        ("a", 1, 512, True, "deleted", {}, None),
        ("b", 8, 4096, True, "deleting", {}, None),
        ("b", 1, 256, True, "lost", {}, None),
        ("c", 1, 256, False, "failed", {}, None),
    ]
    engine = create_engine(fresh_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.insert(vms),
                [
                    {"id": uuid.uuid4(), "name": f"vm-{i}", "project": p, "vcpus": v, "memory_mib": m, "tdx": t,
                     "selector": sel, "anti_affinity_group": g, "priority": 0, "status": st, "reasons": {},
                     "deadline": now + timedelta(hours=1), "generation": 1, "created_at": now, "updated_at": now}
                    for i, (p, v, m, t, st, sel, g) in enumerate(rows)
                ],
            )
        command.upgrade(cfg, "head")
        with Session(engine) as s:
            assert quota.kept(s) == quota.recount(s) == {
                "a": quota.Resources(2, 6, 3072, 1),
                "b": quota.Resources(1, 8, 4096, 1),
            }
            assert {p.name: p.generation for p in s.scalars(sa.select(Project))} == {"a": 0, "b": 0}
            pending = s.scalars(sa.select(Vm).where(Vm.status == "pending")).one()
            assert pending.placement_class == placement_class(vm_request(pending))
    finally:
        engine.dispose()
