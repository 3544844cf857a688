"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-26 12:27:38.491926
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('subject', sa.String(length=128), nullable=False),
    sa.Column('project', sa.String(length=63), nullable=True),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_events'))
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index('ix_events_kind_id', ['kind', 'id'], unique=False)
        batch_op.create_index('ix_events_project_id', ['project', 'id'], unique=False)
        batch_op.create_index('ix_events_subject_id', ['subject', 'id'], unique=False)

    op.create_table('hosts',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('labels', sa.JSON(), nullable=False),
    sa.Column('vcpus', sa.Integer(), nullable=False),
    sa.Column('memory_mib', sa.BigInteger(), nullable=False),
    sa.Column('reserved_vcpus', sa.Integer(), nullable=False),
    sa.Column('reserved_memory_mib', sa.BigInteger(), nullable=False),
    sa.Column('cpu_allocation_ratio', sa.Float(), nullable=False),
    sa.Column('schedulable', sa.Boolean(), nullable=False),
    sa.Column('draining', sa.Boolean(), nullable=False),
    sa.Column('last_heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('stale_reported_for', sa.DateTime(timezone=True), nullable=True),
    sa.Column('keyids_observed_in_use', sa.Integer(), nullable=True),
    sa.Column('vms_observed_running', sa.Integer(), nullable=True),
    sa.Column('current_load_seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('tdx_state', sa.String(length=16), nullable=False),
    sa.Column('tdx_reason', sa.Text(), nullable=True),
    sa.Column('vm_capable', sa.Boolean(), nullable=False),
    sa.Column('keyids_total', sa.Integer(), nullable=False),
    sa.Column('used_vcpus', sa.Integer(), nullable=False),
    sa.Column('used_memory_mib', sa.BigInteger(), nullable=False),
    sa.Column('used_keyids', sa.Integer(), nullable=False),
    sa.Column('vm_count', sa.Integer(), nullable=False),
    sa.Column('free_memory_mib', sa.BigInteger(), nullable=False),
    sa.Column('generation', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hosts')),
    sa.UniqueConstraint('name', name=op.f('uq_hosts_name'))
    )
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.create_index('ix_hosts_placement', ['tdx_state', 'free_memory_mib'], unique=False)

    op.create_table('idempotency_keys',
    sa.Column('principal', sa.String(length=128), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('vm_id', sa.Uuid(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('principal', 'key', name=op.f('pk_idempotency_keys'))
    )
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_idempotency_keys_created_at'), ['created_at'], unique=False)

    op.create_table('tokens',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('secret_hash', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('host', sa.String(length=63), nullable=True),
    sa.Column('project', sa.String(length=63), nullable=True),
    sa.Column('description', sa.String(length=255), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tokens')),
    sa.UniqueConstraint('secret_hash', name=op.f('uq_tokens_secret_hash'))
    )
    op.create_table('host_labels',
    sa.Column('host_id', sa.Uuid(), nullable=False),
    sa.Column('key', sa.String(length=253), nullable=False),
    sa.Column('value', sa.String(length=253), nullable=False),
    sa.ForeignKeyConstraint(['host_id'], ['hosts.id'], name=op.f('fk_host_labels_host_id_hosts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('host_id', 'key', name=op.f('pk_host_labels'))
    )
    with op.batch_alter_table('host_labels', schema=None) as batch_op:
        batch_op.create_index('ix_host_labels_key_value', ['key', 'value', 'host_id'], unique=False)

    op.create_table('loads',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('host_id', sa.Uuid(), nullable=False),
    sa.Column('boot_id', sa.String(length=64), nullable=False),
    sa.Column('kernel', sa.String(length=255), nullable=False),
    sa.Column('kvm_intel_loaded', sa.Boolean(), nullable=False),
    sa.Column('tdx_platform', sa.Boolean(), nullable=False),
    sa.Column('tdx_requested', sa.Boolean(), nullable=False),
    sa.Column('tdx_effective', sa.Boolean(), nullable=False),
    sa.Column('keyids_total', sa.Integer(), nullable=False),
    sa.Column('module_version', sa.String(length=64), nullable=True),
    sa.Column('errors', sa.JSON(), nullable=False),
    sa.Column('vcpus', sa.Integer(), nullable=True),
    sa.Column('memory_mib', sa.BigInteger(), nullable=True),
    sa.Column('tdx_state', sa.String(length=16), nullable=False),
    sa.Column('tdx_reason', sa.Text(), nullable=True),
    sa.Column('reported_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['host_id'], ['hosts.id'], name=op.f('fk_loads_host_id_hosts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_loads')),
    sa.UniqueConstraint('id', name=op.f('uq_loads_id'))
    )
    with op.batch_alter_table('loads', schema=None) as batch_op:
        batch_op.create_index('ix_loads_host_seq', ['host_id', 'seq'], unique=False)

    op.create_table('vms',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('project', sa.String(length=63), nullable=False),
    sa.Column('vcpus', sa.Integer(), nullable=False),
    sa.Column('memory_mib', sa.BigInteger(), nullable=False),
    sa.Column('tdx', sa.Boolean(), nullable=False),
    sa.Column('selector', sa.JSON(), nullable=False),
    sa.Column('anti_affinity_group', sa.String(length=63), nullable=True),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('status_detail', sa.Text(), nullable=True),
    sa.Column('host_id', sa.Uuid(), nullable=True),
    sa.Column('host_name', sa.String(length=63), nullable=True),
    sa.Column('explanation', sa.Text(), nullable=True),
    sa.Column('reasons', sa.JSON(), nullable=False),
    sa.Column('deadline', sa.DateTime(timezone=True), nullable=False),
    sa.Column('generation', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['host_id'], ['hosts.id'], name=op.f('fk_vms_host_id_hosts'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_vms'))
    )
    with op.batch_alter_table('vms', schema=None) as batch_op:
        batch_op.create_index('ix_vms_group_host', ['anti_affinity_group', 'host_id'], unique=False)
        batch_op.create_index('ix_vms_host_status', ['host_id', 'status'], unique=False)
        batch_op.create_index('ix_vms_project_id', ['project', 'id'], unique=False)
        batch_op.create_index('ix_vms_queue', ['status', 'priority', 'created_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('vms', schema=None) as batch_op:
        batch_op.drop_index('ix_vms_queue')
        batch_op.drop_index('ix_vms_project_id')
        batch_op.drop_index('ix_vms_host_status')
        batch_op.drop_index('ix_vms_group_host')

    op.drop_table('vms')
    with op.batch_alter_table('loads', schema=None) as batch_op:
        batch_op.drop_index('ix_loads_host_seq')

    op.drop_table('loads')
    with op.batch_alter_table('host_labels', schema=None) as batch_op:
        batch_op.drop_index('ix_host_labels_key_value')

    op.drop_table('host_labels')
    op.drop_table('tokens')
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_idempotency_keys_created_at'))

    op.drop_table('idempotency_keys')
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.drop_index('ix_hosts_placement')

    op.drop_table('hosts')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_subject_id')
        batch_op.drop_index('ix_events_project_id')
        batch_op.drop_index('ix_events_kind_id')

    op.drop_table('events')
