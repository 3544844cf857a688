"""Scheduling insight, changing nothing: where a VM would land and why not elsewhere; capacity."""

from __future__ import annotations

import math
import random
from dataclasses import replace

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.hosts.readiness import TdxState
from service.models import Host
from service.scheduler.engine import PLAIN_STATES, TDX_STATES, SchedulerConfig, rank, shortlist
from service.scheduler.explain import count_reasons, explanation
from service.scheduler.filters import keyids_in_use_sql, td_vcpu_limit_sql, vcpu_limit_sql
from service.scheduler.types import Policy, VmRequest, memory_charge
from service.vms.schemas import CandidateOut, CapacityOut, FitOut, PreviewOut, StateCapacity
from service.vms.service import placement_context


def preview(
    session: Session, req: VmRequest, cfg: SchedulerConfig, heartbeat_timeout_s: float, policy: Policy
) -> PreviewOut:
    ctx = placement_context(utcnow(), heartbeat_timeout_s, policy)
    ranked = rank(shortlist(session, req, ctx, cfg), req, replace(cfg, jitter=0.0), random.Random(0))
    rc = count_reasons(session, req, ctx)
    return PreviewOut(
        host=ranked[0].host.name if ranked else None,
        explanation=explanation(req, rc),
        reasons=rc.counts,
        candidates=[CandidateOut(host=c.host.name, score=round(c.score, 6)) for c in ranked],
        hosts_considered=rc.considered,
        hosts_fit=rc.fits,
    )


def _zero() -> StateCapacity:
    return StateCapacity(
        hosts=0, hosts_alive=0, vcpus_free=0, memory_mib_free=0,
        keyids_total=0, keyids_used=0, keyids_free=0, keyids_stranded=0, pamt_mib=0, tds_building=0,
    )


def capacity(session: Session, size: VmRequest | None, heartbeat_timeout_s: float, policy: Policy) -> CapacityOut:
    now = utcnow()
    alive_after = placement_context(now, heartbeat_timeout_s).alive_after
    need_vcpus = size.vcpus if size else 1
    need_memory = memory_charge(size, policy) if size else 1
    free_vcpus = vcpu_limit_sql() - Host.used_vcpus
    full = (free_vcpus < need_vcpus) | (Host.free_memory_mib < need_memory)
    # KeyIDs free = total - max(claimed, observed in use), as placement counts them.
    free_keyids = Host.keyids_total - keyids_in_use_sql()
    rows = session.execute(
        select(
            Host.tdx_state,
            func.count(),
            func.sum(case((Host.last_heartbeat_at >= alive_after, 1), else_=0)),
            func.sum(case((free_vcpus > 0, free_vcpus), else_=0)),
            func.sum(case((Host.free_memory_mib > 0, Host.free_memory_mib), else_=0)),
            func.sum(Host.keyids_total),
            func.sum(Host.used_keyids),
            func.sum(case((free_keyids > 0, free_keyids), else_=0)),
            func.sum(case((full & (free_keyids > 0), free_keyids), else_=0)),
            func.sum(Host.pamt_mib),
            func.sum(Host.tds_building),
        ).group_by(Host.tdx_state)
    ).all()
    by_state = {state.value: _zero() for state in TdxState}
    totals = _zero()
    for state, hosts, alive, vcpus, memory, k_total, k_used, k_free, stranded, pamt, building in rows:
        entry = StateCapacity(
            hosts=int(hosts),
            hosts_alive=int(alive or 0),
            vcpus_free=float(vcpus or 0),
            memory_mib_free=int(memory or 0),
            keyids_total=int(k_total or 0),
            keyids_used=int(k_used or 0),
            keyids_free=int(k_free or 0),
            keyids_stranded=int(stranded or 0),
            pamt_mib=int(pamt or 0),
            tds_building=int(building or 0),
        )
        by_state[str(state)] = entry
        totals = StateCapacity(
            **{k: getattr(totals, k) + getattr(entry, k) for k in StateCapacity.model_fields}
        )
    fit = None
    if size is not None:
        fit = FitOut(
            vcpus=size.vcpus, memory_mib=size.memory_mib, tdx=size.tdx,
            memory_mib_charged=memory_charge(size, policy),
            fits_now=_fits_now(session, size, alive_after, policy),
        )
    return CapacityOut(
        by_tdx_state=by_state, totals=totals, fit=fit,
        td_memory_overhead_mib=policy.td_memory_overhead_mib,
        max_td_builds_per_host=policy.max_td_builds_per_host,
    )


def _fits_now(session: Session, size: VmRequest, alive_after: object, policy: Policy) -> int:
    """How many VMs of this size fit now: per eligible host the minimum over its dimensions (a TD
    also within the host's free build slots, on hosts the policy's floor and the VMM allow)."""
    states = TDX_STATES if size.tdx else PLAIN_STATES
    conditions = [
        Host.tdx_state.in_(states),
        Host.vm_capable.is_(True),
        Host.schedulable.is_(True),
        Host.draining.is_(False),
        Host.last_heartbeat_at >= alive_after,
    ]
    if size.tdx:
        conditions.append(func.coalesce(Host.vmm_tdx, "") != "unsupported")
        if policy.min_module_key is not None:
            conditions.append(Host.tdx_module_key >= policy.min_module_key)
    if size.attestation:
        conditions.append(Host.attestation_ready.is_(True))
    rows = session.execute(
        select(
            Host.vcpus, Host.reserved_vcpus, Host.cpu_allocation_ratio, Host.used_vcpus,
            Host.free_memory_mib, Host.keyids_total, keyids_in_use_sql(), td_vcpu_limit_sql(), Host.tds_building,
        ).where(*conditions)
    ).all()
    charge = memory_charge(size, policy)
    total = 0
    for vcpus, reserved, ratio, used_vcpus, free_mem, k_total, k_in_use, td_vcpu_limit, building in rows:
        by_vcpu = math.floor(((vcpus - reserved) * ratio - used_vcpus) / size.vcpus)
        by_memory = free_mem // charge
        per_host = min(by_vcpu, by_memory)
        if size.tdx:
            slots = policy.max_td_builds_per_host - building
            per_host = min(per_host, k_total - k_in_use, slots) if size.vcpus <= td_vcpu_limit else 0
        total += max(per_host, 0)
    return total



