"""Why a VM fits nowhere: hosts counted per first failing filter, and one readable line."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy import case, func, literal, select
from sqlalchemy.orm import Session

from service.models import Host
from service.scheduler.filters import (
    REASON_CODES,
    all_rejections,
    keyids_in_use_sql,
    td_vcpu_limit_sql,
    vcpu_limit_sql,
)
from service.scheduler.types import Context, VmRequest

FITS = "fits"

# What each code means, where the code alone does not say it.
_GLOSS: Mapping[str, str] = {
    "tdx_state_unknown": "no kvm_intel load reported yet",
    "tdx_unsupported": "no TDX on the platform",
    "tdx_disabled": "not opted in at kvm_intel load",
    "keyids_exhausted": "every TDX KeyID in use",
    "td_vcpus_exceed_host": "a TD gets at most the host's CPUs",
    "host_stale": "no recent heartbeat",
}


@dataclass(frozen=True, slots=True)
class ReasonCounts:
    considered: int
    fits: int
    counts: dict[str, int]
    # Most free resource among the hosts blamed on each capacity code.
    most_free_memory_mib: int | None = None
    most_free_vcpus: float | None = None
    # The most CPUs a TD could get among the hosts blamed on td_vcpus_exceed_host.
    most_td_vcpus: int | None = None
    # (total, claimed, observed in use) of the host with the most free KeyIDs among those blamed
    # on keyids_exhausted.
    keyids_example: tuple[int, int, int | None] | None = None
    details: dict[str, str] = field(default_factory=dict)


def count_reasons(session: Session, req: VmRequest, ctx: Context) -> ReasonCounts:
    rejections = all_rejections(req, ctx)
    reason_expr = (
        case(*[(cond, literal(code)) for code, cond in rejections], else_=literal(FITS))
        if rejections
        else literal(FITS)
    )
    reason = reason_expr.label("reason")
    rows = session.execute(
        select(
            reason,
            func.count(),
            func.max(Host.free_memory_mib),
            func.max(vcpu_limit_sql() - Host.used_vcpus),
            func.max(td_vcpu_limit_sql()),
        ).group_by(reason)
    ).all()
    counts: dict[str, int] = {}
    fits = 0
    most_mem: int | None = None
    most_vcpus: float | None = None
    most_td_vcpus: int | None = None
    for code, n, max_mem, max_vcpus, max_td_vcpus in rows:
        if code == FITS:
            fits = int(n)
            continue
        counts[str(code)] = int(n)
        if code == "insufficient_memory":
            most_mem = int(max_mem)
        elif code == "insufficient_vcpus":
            most_vcpus = float(max_vcpus)
        elif code == "td_vcpus_exceed_host":
            most_td_vcpus = int(max_td_vcpus)
    example = None
    if "keyids_exhausted" in counts:
        row = session.execute(
            select(Host.keyids_total, Host.used_keyids, Host.keyids_observed_in_use)
            .where(reason_expr == "keyids_exhausted")
            .order_by((Host.keyids_total - keyids_in_use_sql()).desc())
            .limit(1)
        ).first()
        if row is not None:
            example = (int(row[0]), int(row[1]), None if row[2] is None else int(row[2]))
    return ReasonCounts(
        considered=fits + sum(counts.values()),
        fits=fits,
        counts=counts,
        most_free_memory_mib=most_mem,
        most_free_vcpus=most_vcpus,
        most_td_vcpus=most_td_vcpus,
        keyids_example=example,
    )


def _gloss(code: str, req: VmRequest, rc: ReasonCounts) -> str:
    if code == "insufficient_memory" and rc.most_free_memory_mib is not None:
        return f"needs {req.memory_mib} MiB, most free {max(rc.most_free_memory_mib, 0)} MiB"
    if code == "insufficient_vcpus" and rc.most_free_vcpus is not None:
        return f"needs {req.vcpus} vCPUs, most free {max(int(rc.most_free_vcpus), 0)}"
    if code == "td_vcpus_exceed_host" and rc.most_td_vcpus is not None:
        return f"a TD gets at most the host's CPUs: needs {req.vcpus} vCPUs, largest host has {rc.most_td_vcpus}"
    if code == "keyids_exhausted" and rc.keyids_example is not None:
        total, claimed, observed = rc.keyids_example
        free = max(total - max(claimed, observed or 0), 0)
        seen = "not reported" if observed is None else str(observed)
        return (
            f"KeyIDs free = total - max(claimed, observed in use), at best {total} - max({claimed}, {seen}) = {free}"
        )
    if code == "selector_mismatch":
        return "selector " + ",".join(f"{k}={v}" for k, v in req.selector)
    if code == "anti_affinity" and req.anti_affinity_group:
        return f"group {req.anti_affinity_group} already there"
    return _GLOSS.get(code, "")


def explanation(req: VmRequest, rc: ReasonCounts, placed: int = 0) -> str:
    """For example ``0/12 hosts fit: 7 tdx_disabled (not opted in at kvm_intel load), 3 tdx_failed``."""
    head = f"{rc.fits if placed == 0 else placed}/{rc.considered} hosts fit"
    if rc.considered == 0:
        return f"{head}: no hosts are registered"
    order = {code: i for i, code in enumerate(REASON_CODES)}
    parts = []
    for code, n in sorted(rc.counts.items(), key=lambda kv: (-kv[1], order.get(kv[0], 99))):
        gloss = _gloss(code, req, rc)
        parts.append(f"{n} {code} ({gloss})" if gloss else f"{n} {code}")
    if not parts:
        return head
    return f"{head}: " + ", ".join(parts)
