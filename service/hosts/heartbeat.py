"""The common heartbeat without the ORM: every host sends one every few seconds.

Almost every heartbeat only says "alive, under the same load" and repeats observations that have
not changed. That case is one read of the host and its current load and one ``UPDATE`` of the
liveness columns, both prepared statements (service/prepared.py), and the reply is built from the
row read. Anything else a heartbeat can mean (the host coming back alive, a changed observation
that is evented, a KeyID count that frees KeyIDs, a change of the TDX module's health) returns
``None`` before anything is written, and the caller runs the full rules of
``service.hosts.service.heartbeat`` in the same transaction. Same races as the full rules: neither
takes a row lock for the liveness columns, and neither bumps the host's generation.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.errors import ProblemError, not_found
from service.hosts.readiness import TdxState
from service.hosts.schemas import Heartbeat, HostOut
from service.hosts.service import host_out, is_alive, keyids_free
from service.models import Host, Load
from service.prepared import Prepared, connection

_HOST_COLUMNS = tuple(c.key for c in Host.__table__.columns)
_LOAD_COLUMNS = tuple(c.key for c in Load.__table__.columns)
_READ = Prepared(
    select(*Host.__table__.columns, *[c.label(f"load_{c.key}") for c in Load.__table__.columns])
    .select_from(Host.__table__.outerjoin(Load.__table__, Load.seq == Host.current_load_seq))
    .where(Host.name == bindparam("name"))
)
_LIVENESS = ("last_heartbeat_at", "vms_observed_running", "keyids_observed_in_use", "tdx_configured")
_UPDATE = Prepared(
    update(Host).where(Host.id == bindparam("host_id")).values({c: bindparam(c) for c in _LIVENESS})
)


def _needs_full_rules(host: Any, body: Heartbeat, sent: set[str], alive: bool) -> bool:
    if not alive:
        return True  # host.alive
    if "module_healthy" in sent and body.module_healthy != host.module_healthy:
        return True  # may change the TDX state and release TDs
    if "module_version" in sent and body.module_version != host.module_version:
        return True
    if "attestation_ready" in sent and body.attestation_ready != host.attestation_ready:
        return True
    if "vmm_tdx" in sent and (body.vmm_tdx, body.vmm_detail) != (host.vmm_tdx, host.vmm_detail):
        return True
    if body.keyids_in_use is not None and host.tdx_state == TdxState.READY.value:
        after = SimpleNamespace(
            keyids_total=host.keyids_total, used_keyids=host.used_keyids, keyids_observed_in_use=body.keyids_in_use
        )
        if keyids_free(after) > keyids_free(host):  # type: ignore[arg-type]
            return True  # host.keyids_freed
    return False


def heartbeat(session: Session, name: str, body: Heartbeat, timeout_s: float) -> HostOut | None:
    """The reply to a heartbeat that only refreshes liveness, or None (nothing written) when the
    full rules must run."""
    conn = connection(session)
    rows = _READ.rows(conn, {"name": name})
    if not rows:
        raise not_found("host", name)
    row = rows[0]
    host = SimpleNamespace(**dict(zip(_HOST_COLUMNS, row[: len(_HOST_COLUMNS)], strict=True)))
    load_values = dict(zip(_LOAD_COLUMNS, row[len(_HOST_COLUMNS) :], strict=True))
    load = None if load_values["seq"] is None else SimpleNamespace(**load_values)
    if load is None or load.id != body.load_id:
        raise ProblemError(
            409,
            "stale_load",
            f"load {body.load_id} is not the current load of host {name!r}; report the load first",
            current_load_id=str(load.id) if load else None,
        )
    sent = body.model_fields_set
    now = utcnow()
    if _needs_full_rules(host, body, sent, is_alive(host.last_heartbeat_at, now, timeout_s)):
        return None
    host.last_heartbeat_at = now
    if body.running_vms is not None:
        host.vms_observed_running = len(body.running_vms)
    if "tdx_configured" in sent:
        host.tdx_configured = body.tdx_configured
    if body.keyids_in_use is not None:
        host.keyids_observed_in_use = body.keyids_in_use
    _UPDATE.run(conn, {"host_id": host.id, **{c: getattr(host, c) for c in _LIVENESS}})
    return host_out(host, load, now, timeout_s)  # type: ignore[arg-type]
