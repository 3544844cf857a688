"""Fleet TDX policy: module floor key, attestation and VMM observations, PAMT, TD build bursts,
per-TD memory overhead, guided opt-in operations

Revision ID: 0004_fleet_policy
Revises: 0003_quotas
Create Date: 2026-11-29 18:35:27.866778
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# The host's and the floor's version keys compare bytewise ("C" keeps PostgreSQL's locale out of it).
VERSION_KEY = sa.String(length=128).with_variant(sa.String(length=128, collation='C'), 'postgresql')
RUNNING_ONLY = {"sqlite_where": sa.text("status = 'running'"), "postgresql_where": sa.text("status = 'running'")}

revision: str = "0004_fleet_policy"
down_revision: str | None = "0003_quotas"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('fleet_policy',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('tdx_min_module_version', sa.String(length=64), nullable=True),
    sa.Column('tdx_min_module_key', VERSION_KEY, nullable=True),
    sa.Column('max_td_builds_per_host', sa.Integer(), nullable=True),
    sa.Column('td_memory_overhead_mib', sa.Integer(), nullable=True),
    sa.Column('generation', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fleet_policy'))
    )
    op.create_table('operations',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('host_id', sa.Uuid(), nullable=False),
    sa.Column('host_name', sa.String(length=63), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('step', sa.String(length=32), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('blocking_vms', sa.JSON(), nullable=False),
    sa.Column('blocking_total', sa.Integer(), nullable=False),
    sa.Column('start_load_seq', sa.BigInteger(), nullable=True),
    sa.Column('cordoned', sa.Boolean(), nullable=False),
    sa.Column('reason_code', sa.String(length=64), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('remedy', sa.Text(), nullable=True),
    sa.Column('history', sa.JSON(), nullable=False),
    sa.Column('deadline', sa.DateTime(timezone=True), nullable=False),
    sa.Column('generation', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_operations'))
    )
    with op.batch_alter_table('operations', schema=None) as batch_op:
        batch_op.create_index('ix_operations_host_name_id', ['host_name', 'id'], unique=False)
        batch_op.create_index('ix_operations_status_id', ['status', 'id'], unique=False)
        batch_op.create_index('uq_operations_running_host', ['host_id'], unique=True, **RUNNING_ONLY)

    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tdx_module_key', VERSION_KEY, nullable=True))
        batch_op.add_column(sa.Column('attestation_ready', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('vmm_tdx', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('vmm_detail', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('pamt_mib', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('tds_building', sa.Integer(), server_default='0', nullable=False))
        batch_op.create_index(batch_op.f('ix_hosts_tdx_module_key'), ['tdx_module_key'], unique=False)

    with op.batch_alter_table('loads', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pamt_kb', sa.BigInteger(), nullable=True))

    with op.batch_alter_table('vms', schema=None) as batch_op:
        batch_op.add_column(sa.Column('attestation', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('memory_overhead_mib', sa.BigInteger(), server_default='0', nullable=False))

    _backfill()


def _version_key(version: str) -> str | None:
    """service/policy/versions.py as of this revision (migrations never import code that may change)."""
    parts = version.strip().split(".")
    if not 1 <= len(parts) <= 8 or not all(p.isascii() and p.isdigit() and len(p) <= 10 for p in parts):
        return None
    numbers = [int(p) for p in parts]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    return "".join(f"{n:010d}" for n in numbers)


def _backfill() -> None:
    conn = op.get_bind()
    hosts = sa.table(
        'hosts', sa.column('id', sa.Uuid()), sa.column('module_version', sa.String()),
        sa.column('tdx_module_key', sa.String()), sa.column('tds_building', sa.Integer()),
    )
    vms = sa.table(
        'vms', sa.column('host_id', sa.Uuid()), sa.column('status', sa.String()), sa.column('tdx', sa.Boolean()),
    )
    for host_id, version in conn.execute(sa.select(hosts.c.id, hosts.c.module_version).where(
        hosts.c.module_version.is_not(None)
    )).all():
        conn.execute(hosts.update().where(hosts.c.id == host_id).values(tdx_module_key=_version_key(version)))
    building = (
        sa.select(sa.func.count()).select_from(vms)
        .where(vms.c.host_id == hosts.c.id, vms.c.status == 'scheduled', vms.c.tdx.is_(True))
        .scalar_subquery()
    )
    conn.execute(hosts.update().values(tds_building=building))



def downgrade() -> None:
    with op.batch_alter_table('vms', schema=None) as batch_op:
        batch_op.drop_column('memory_overhead_mib')
        batch_op.drop_column('attestation')

    with op.batch_alter_table('loads', schema=None) as batch_op:
        batch_op.drop_column('pamt_kb')

    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hosts_tdx_module_key'))
        batch_op.drop_column('tds_building')
        batch_op.drop_column('pamt_mib')
        batch_op.drop_column('vmm_detail')
        batch_op.drop_column('vmm_tdx')
        batch_op.drop_column('attestation_ready')
        batch_op.drop_column('tdx_module_key')

    with op.batch_alter_table('operations', schema=None) as batch_op:
        batch_op.drop_index('uq_operations_running_host', **RUNNING_ONLY)
        batch_op.drop_index('ix_operations_status_id')
        batch_op.drop_index('ix_operations_host_name_id')

    op.drop_table('operations')
    op.drop_table('fleet_policy')
