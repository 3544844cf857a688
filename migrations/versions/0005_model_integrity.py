"""Agent tokens bound to the host's id (not its name); when a pending VM was last explained

Revision ID: 0005_model_integrity
Revises: 0004_fleet_policy
Create Date: 2026-11-29 21:10:00

An agent token used to be bound to a host *name*, so it outlived ``DELETE /v1/hosts/{name}`` and
worked for a new host of the same name. Existing agent tokens are bound to the host that has their
name now; those whose host is gone are revoked (deleting a host now revokes its agent tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0005_model_integrity"
down_revision: str | None = "0004_fleet_policy"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("host_id", sa.Uuid(), nullable=True))
        batch_op.create_index(batch_op.f("ix_tokens_host_id"), ["host_id"], unique=False)
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.add_column(sa.Column("explained_at", sa.DateTime(timezone=True), nullable=True))

    tokens = sa.table(
        "tokens",
        sa.column("role", sa.String()),
        sa.column("host", sa.String()),
        sa.column("host_id", sa.Uuid()),
        sa.column("revoked_at", sa.DateTime(timezone=True)),
    )
    hosts = sa.table("hosts", sa.column("id", sa.Uuid()), sa.column("name", sa.String()))
    op.execute(
        tokens.update()
        .where(tokens.c.role == "agent")
        .values(host_id=sa.select(hosts.c.id).where(hosts.c.name == tokens.c.host).scalar_subquery())
    )
    op.execute(
        tokens.update()
        .where(tokens.c.role == "agent", tokens.c.host_id.is_(None), tokens.c.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )


def downgrade() -> None:
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.drop_column("explained_at")
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tokens_host_id"))
        batch_op.drop_column("host_id")
