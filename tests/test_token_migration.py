"""Migration 0005 binds existing agent tokens to their host's id and revokes those of deleted hosts."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import command
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from service.auth import hash_secret, lookup_token
from service.migrate import alembic_config
from service.models import Token


def test_existing_agent_tokens_are_bound_to_their_hosts_id(fresh_url: str) -> None:
    cfg = alembic_config(fresh_url)
    command.upgrade(cfg, "0004_fleet_policy")
    now = datetime.now(UTC)
    when = sa.DateTime(timezone=True)
    hosts = sa.table(
        "hosts", sa.column("id", sa.Uuid()), sa.column("name"), sa.column("labels", sa.JSON()),
        sa.column("vcpus"), sa.column("memory_mib"), sa.column("reserved_vcpus"), sa.column("reserved_memory_mib"),
        sa.column("cpu_allocation_ratio"), sa.column("schedulable"), sa.column("draining"),
        sa.column("tdx_state"), sa.column("vm_capable"), sa.column("keyids_total"), sa.column("used_vcpus"),
        sa.column("used_memory_mib"), sa.column("used_keyids"), sa.column("vm_count"), sa.column("free_memory_mib"),
        sa.column("generation"), sa.column("created_at", when), sa.column("updated_at", when),
    )
    tokens = sa.table(
        "tokens", sa.column("id", sa.Uuid()), sa.column("secret_hash"), sa.column("role"), sa.column("host"),
        sa.column("project"), sa.column("created_at", when), sa.column("revoked_at", when),
    )
    host_id = uuid.uuid4()
    engine = create_engine(fresh_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.insert(hosts), [{
                "id": host_id, "name": "node-1", "labels": {}, "vcpus": 8, "memory_mib": 4096, "reserved_vcpus": 0,
                "reserved_memory_mib": 0, "cpu_allocation_ratio": 4.0, "schedulable": True, "draining": False,
                "tdx_state": "unknown", "vm_capable": False, "keyids_total": 0, "used_vcpus": 0,
                "used_memory_mib": 0, "used_keyids": 0, "vm_count": 0, "free_memory_mib": 4096, "generation": 1,
                "created_at": now, "updated_at": now,
            }])
            conn.execute(sa.insert(tokens), [
                {"id": uuid.uuid4(), "secret_hash": hash_secret(secret), "role": role, "host": host,
                 "project": project, "created_at": now, "revoked_at": None}
                for secret, role, host, project in [
                    ("alive", "agent", "node-1", None),
                    ("orphan", "agent", "gone-1", None),
                    ("client", "client", None, "p"),
                ]
            ])
        command.upgrade(cfg, "head")
        with Session(engine) as s:
            rows = {t.host or t.project: t for t in s.scalars(sa.select(Token))}
            assert rows["node-1"].host_id == host_id and rows["node-1"].revoked_at is None
            assert rows["gone-1"].host_id is None and rows["gone-1"].revoked_at is not None
            assert rows["p"].host_id is None and rows["p"].revoked_at is None
            alive = lookup_token(s, hash_secret("alive"))
            assert alive is not None and alive.host == "node-1"
            assert lookup_token(s, hash_secret("orphan")) is None
            client = lookup_token(s, hash_secret("client"))
            assert client is not None and client.project == "p"
    finally:
        engine.dispose()
