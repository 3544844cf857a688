"""Seeding the bulk of a large fleet straight into the database, for fleets too large to register
through the API within a benchmark run's time.

The rows are exactly what ``POST /v1/hosts`` followed by ``POST /v1/hosts/{name}/loads`` write
(the TDX state comes from the service's own ``derive_readiness``), minus the event log entries.
The API loading rate is always measured on the hosts the run registers through the API, after the
seeded ones, so it is measured against the full-size table.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from sqlalchemy import Table, create_engine, func, insert, select, text

from bench import fleet as fleetmod
from service.hosts.readiness import LoadFacts, derive_readiness
from service.models import Host, HostLabel, Load

BATCH = 5_000


def _table(model: type) -> Table:
    table = model.__table__  # type: ignore[attr-defined]
    assert isinstance(table, Table)
    return table


def seed_hosts(
    url: str, first: int, last: int, keyids: int, cpu_allocation_ratio: float = 4.0
) -> tuple[dict[str, str], dict[str, str]]:
    """Hosts ``first``..``last - 1`` of the fleet; returns their TDX states and load ids by name."""
    engine = create_engine(url)
    states: dict[str, str] = {}
    load_ids: dict[str, str] = {}
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            next_seq = int(conn.execute(select(func.coalesce(func.max(Load.seq), 0))).scalar_one()) + 1
            for start in range(first, last, BATCH):
                hosts, labels, loads = [], [], []
                for i in range(start, min(start + BATCH, last)):
                    body = json.loads(fleetmod.host_body(i))
                    state = fleetmod.state_of(i)
                    host_id = uuid.uuid4()
                    host = {
                        "id": host_id, "name": body["name"], "labels": body["labels"], "vcpus": body["vcpus"],
                        "memory_mib": body["memory_mib"], "reserved_vcpus": body["reserved_vcpus"],
                        "reserved_memory_mib": body["reserved_memory_mib"],
                        "cpu_allocation_ratio": cpu_allocation_ratio, "schedulable": True, "draining": False,
                        "last_heartbeat_at": None, "stale_reported_for": None, "keyids_observed_in_use": None,
                        "vms_observed_running": None, "current_load_seq": None, "tdx_state": "unknown",
                        "tdx_reason": None, "vm_capable": False, "keyids_total": 0, "used_vcpus": 0,
                        "used_memory_mib": 0, "used_keyids": 0, "vm_count": 0,
                        "free_memory_mib": body["memory_mib"] - body["reserved_memory_mib"],
                        "generation": 1, "created_at": now, "updated_at": now,
                    }
                    labels += [{"host_id": host_id, "key": k, "value": v} for k, v in body["labels"].items()]
                    if state != "unknown":
                        report = fleetmod.load_body(state, keyids)
                        errors = list(report["errors"])  # type: ignore[call-overload]
                        readiness = derive_readiness(
                            LoadFacts(
                                kvm_intel_loaded=bool(report["kvm_intel_loaded"]),
                                tdx_platform=bool(report["tdx_platform"]),
                                tdx_requested=bool(report["tdx_requested"]),
                                tdx_effective=bool(report["tdx_effective"]),
                                keyids_total=int(report["keyids_total"]),  # type: ignore[call-overload]
                                errors=tuple(errors),
                            )
                        )
                        loads.append({
                            "seq": next_seq, "id": uuid.UUID(str(report["load_id"])), "host_id": host_id,
                            "boot_id": report["boot_id"], "kernel": report["kernel"],
                            "kvm_intel_loaded": report["kvm_intel_loaded"], "tdx_platform": report["tdx_platform"],
                            "tdx_requested": report["tdx_requested"], "tdx_effective": report["tdx_effective"],
                            "keyids_total": report["keyids_total"], "module_version": report["module_version"],
                            "errors": errors, "vcpus": None, "memory_mib": None,
                            "tdx_state": readiness.state.value, "tdx_reason": readiness.reason, "reported_at": now,
                        })
                        host.update(
                            current_load_seq=next_seq, tdx_state=readiness.state.value, tdx_reason=readiness.reason,
                            vm_capable=readiness.vm_capable, keyids_total=report["keyids_total"],
                            last_heartbeat_at=now, generation=2,
                        )
                        load_ids[body["name"]] = str(report["load_id"])
                        next_seq += 1
                    hosts.append(host)
                    states[body["name"]] = str(host["tdx_state"])
                conn.execute(insert(_table(Host)), hosts)
                conn.execute(insert(_table(HostLabel)), labels)
                if loads:
                    conn.execute(insert(_table(Load)), loads)
            if conn.dialect.name == "postgresql":
                # What autovacuum's autoanalyze does within a minute of a bulk registration; without
                # statistics right after the seed, PostgreSQL plans the shortlist as a bitmap scan
                # of a whole TDX state plus a sort (about 60 ms at 100k hosts) instead of a 16-row
                # walk of the placement index (under 0.1 ms).
                conn.execute(text("ANALYZE hosts"))
                conn.execute(text(
                    "SELECT setval(pg_get_serial_sequence('loads', 'seq'), (SELECT max(seq) FROM loads))"
                ))
    finally:
        engine.dispose()
    return states, load_ids
