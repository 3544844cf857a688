"""projects (quota limits and usage) and the fair pending queue's columns and indexes

Revision ID: 0003_quotas
Revises: 0002
Create Date: 2026-11-29 17:40:00

Usage is backfilled from the VMs not yet ended, so an existing deployment starts with counters
equal to a recount. Pending VMs get their placement class (the digest the pending queue's memo
uses; service/scheduler/shape_memo.py, frozen here as it was when this migration was written).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0003_quotas"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOT_ENDED = ("pending", "scheduled", "running", "deleting")


def _placement_class(tdx: bool, selector: dict[str, str], group: str | None) -> str:
    rest = {"anti_affinity_group": group, "selector": sorted(selector.items()), "tdx": bool(tdx)}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("limit_vms", sa.BigInteger(), nullable=True),
        sa.Column("limit_vcpus", sa.BigInteger(), nullable=True),
        sa.Column("limit_memory_mib", sa.BigInteger(), nullable=True),
        sa.Column("limit_tdx_vms", sa.BigInteger(), nullable=True),
        sa.Column("used_vms", sa.BigInteger(), nullable=False),
        sa.Column("used_vcpus", sa.BigInteger(), nullable=False),
        sa.Column("used_memory_mib", sa.BigInteger(), nullable=False),
        sa.Column("used_tdx_vms", sa.BigInteger(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_projects")),
    )
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.add_column(sa.Column("placement_class", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("queue_rank", sa.Integer(), nullable=True))
    op.execute("UPDATE vms SET queue_rank = -priority")
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.alter_column("queue_rank", existing_type=sa.Integer(), nullable=False)
        batch_op.drop_index("ix_vms_queue")
        batch_op.create_index(
            "ix_vms_project_queue", ["status", "project", "queue_rank", "created_at", "id"], unique=False
        )
        batch_op.create_index("ix_vms_status_deadline", ["status", "deadline"], unique=False)

    vms = sa.table(
        "vms",
        sa.column("id", sa.Uuid()),
        sa.column("project", sa.String()),
        sa.column("vcpus", sa.Integer()),
        sa.column("memory_mib", sa.BigInteger()),
        sa.column("tdx", sa.Boolean()),
        sa.column("selector", sa.JSON()),
        sa.column("anti_affinity_group", sa.String()),
        sa.column("status", sa.String()),
        sa.column("placement_class", sa.String()),
    )
    projects = sa.table(
        "projects",
        *(
            sa.column(name)
            for name in (
                "name", "used_vms", "used_vcpus", "used_memory_mib", "used_tdx_vms", "generation",
                "created_at", "updated_at",
            )
        ),
    )
    now = sa.literal(datetime.now(UTC), sa.DateTime(timezone=True))
    usage = (
        sa.select(
            vms.c.project,
            sa.func.count(),
            sa.func.sum(vms.c.vcpus),
            sa.func.sum(vms.c.memory_mib),
            sa.func.sum(sa.case((vms.c.tdx, 1), else_=0)),
            sa.literal(0),
            now,
            now,
        )
        .where(vms.c.status.in_(NOT_ENDED))
        .group_by(vms.c.project)
    )
    op.execute(projects.insert().from_select(list(projects.c.keys()), usage))

    bind = op.get_bind()
    pending = bind.execute(
        sa.select(vms.c.id, vms.c.tdx, vms.c.selector, vms.c.anti_affinity_group).where(vms.c.status == "pending")
    ).all()
    for row in pending:
        bind.execute(
            sa.update(vms)
            .where(vms.c.id == row.id)
            .values(placement_class=_placement_class(row.tdx, row.selector or {}, row.anti_affinity_group))
        )


def downgrade() -> None:
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.drop_index("ix_vms_status_deadline")
        batch_op.drop_index("ix_vms_project_queue")
        batch_op.create_index("ix_vms_queue", ["status", "priority", "created_at"], unique=False)
        batch_op.drop_column("queue_rank")
        batch_op.drop_column("placement_class")
    op.drop_table("projects")
