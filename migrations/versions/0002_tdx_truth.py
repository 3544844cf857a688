"""TDX truth: reason codes, KVM TDX presence, kernel-log status, present CPUs, heartbeat observations

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('module_version', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('module_healthy', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('tdx_configured', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('tdx_reason_code', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('present_cpus', sa.Integer(), nullable=True))

    with op.batch_alter_table('loads', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kvm_tdx', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('kernel_log', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('present_cpus', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('tdx_reason_code', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('loads', schema=None) as batch_op:
        batch_op.drop_column('tdx_reason_code')
        batch_op.drop_column('present_cpus')
        batch_op.drop_column('kernel_log')
        batch_op.drop_column('kvm_tdx')

    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.drop_column('present_cpus')
        batch_op.drop_column('tdx_reason_code')
        batch_op.drop_column('tdx_configured')
        batch_op.drop_column('module_healthy')
        batch_op.drop_column('module_version')
