"""Why a VM fits nowhere: hosts counted per first failing filter, and one readable line."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy import case, false, func, literal, select
from sqlalchemy.orm import Session

from service.models import Host
from service.prepared import Prepared, connection
from service.scheduler.engine import TemplateKey, template, template_key, template_params
from service.scheduler.filters import (
    REASON_CODES,
    all_rejections,
    keyids_in_use_sql,
    td_vcpu_limit_sql,
    vcpu_limit_sql,
)
from service.scheduler.types import Context, Policy, VmRequest, memory_charge

FITS = "fits"

# What each code means, where the code alone does not say it.
_GLOSS: Mapping[str, str] = {
    "tdx_state_unknown": "no kvm_intel load reported yet",
    "tdx_unsupported": "no TDX on the platform",
    "tdx_disabled": "not opted in at kvm_intel load",
    "keyids_exhausted": "every TDX KeyID in use",
    "td_vcpus_exceed_host": "a TD gets at most the host's CPUs",
    "host_stale": "no recent heartbeat",
    "vmm_tdx_unsupported": "QEMU/libvirt without TDX",
    "attestation_unavailable": "quote generation service not answering",
}
# How many module versions an explanation names.
_VERSIONS_SHOWN = 5


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
    # (free memory, PAMT) of the host with the most free memory among those blamed on insufficient_memory.
    memory_example: tuple[int, int] | None = None
    # The fewest TDs building on a host blamed on td_build_burst.
    fewest_building: int | None = None
    # Module versions of the hosts blamed on tdx_module_too_old ("unknown" for none), a few.
    module_versions: tuple[str, ...] = ()
    # Hosts blamed on attestation_unavailable whose QGS did not answer (the others were not checked).
    attestation_down: int | None = None
    # One VMM detail among the hosts blamed on vmm_tdx_unsupported (e.g. "QEMU 9.2.0").
    vmm_example: str | None = None
    policy_floor: str | None = None
    max_td_builds: int | None = None
    td_overhead_mib: int = 0
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Statements:
    counts: Prepared
    keyids: Prepared
    memory: Prepared
    versions: Prepared


def _build(req: VmRequest, ctx: Context) -> _Statements:
    rejections = all_rejections(req, ctx)
    reason_expr = (
        case(*[(cond, literal(code)) for code, cond in rejections], else_=literal(FITS))
        if rejections
        else literal(FITS)
    )
    reason = reason_expr.label("reason")
    return _Statements(
        counts=Prepared(
            select(
                reason,
                func.count(),
                func.max(Host.free_memory_mib),
                func.max(vcpu_limit_sql() - Host.used_vcpus),
                func.max(td_vcpu_limit_sql()),
                func.min(Host.tds_building),
                func.sum(case((Host.attestation_ready == false(), 1), else_=0)),
                func.max(Host.vmm_detail),
            ).group_by(reason)
        ),
        keyids=Prepared(
            select(Host.keyids_total, Host.used_keyids, Host.keyids_observed_in_use)
            .where(reason_expr == "keyids_exhausted")
            .order_by((Host.keyids_total - keyids_in_use_sql()).desc())
            .limit(1)
        ),
        memory=Prepared(
            select(Host.free_memory_mib, Host.pamt_mib)
            .where(reason_expr == "insufficient_memory")
            .order_by(Host.free_memory_mib.desc())
            .limit(1)
        ),
        versions=Prepared(
            select(Host.module_version, Host.tdx_module_key)
            .where(reason_expr == "tdx_module_too_old")
            .group_by(Host.module_version, Host.tdx_module_key)
            .order_by(Host.tdx_module_key.desc())
            .limit(_VERSIONS_SHOWN + 1)
        ),
    )


# Built once per request shape with the values bound (engine.template), like the shortlist: the
# explanation of a "no host" answer had cost more to build than to run.
_statements: dict[TemplateKey, _Statements] = {}


def count_reasons(session: Session, req: VmRequest, ctx: Context) -> ReasonCounts:
    key = template_key(req, ctx)
    stmts = _statements.get(key)
    if stmts is None:
        stmts = _statements[key] = _build(*template(req, ctx))
    if session.new or session.dirty or session.deleted:
        session.flush()  # what autoflush would do
    conn = connection(session)
    params = template_params(req, ctx)
    rows = stmts.counts.rows(conn, params)
    counts: dict[str, int] = {}
    fits = 0
    most_mem: int | None = None
    most_vcpus: float | None = None
    most_td_vcpus: int | None = None
    fewest_building: int | None = None
    attestation_down: int | None = None
    vmm_example: str | None = None
    for code, n, max_mem, max_vcpus, max_td_vcpus, min_building, qgs_down, vmm_detail in rows:
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
        elif code == "td_build_burst":
            fewest_building = int(min_building)
        elif code == "attestation_unavailable":
            attestation_down = int(qgs_down or 0)
        elif code == "vmm_tdx_unsupported":
            vmm_example = vmm_detail
    example = None
    if "keyids_exhausted" in counts:
        found_keyids = stmts.keyids.rows(conn, params)
        if found_keyids:
            row = found_keyids[0]
            example = (int(row[0]), int(row[1]), None if row[2] is None else int(row[2]))
    memory_example = None
    if "insufficient_memory" in counts:
        found_memory = stmts.memory.rows(conn, params)
        if found_memory:
            mem_row = found_memory[0]
            memory_example = (int(mem_row[0]), int(mem_row[1]))
    versions: tuple[str, ...] = ()
    if "tdx_module_too_old" in counts:
        found = stmts.versions.rows(conn, params)
        known = sorted({str(v) for v, key in found if v is not None and key is not None}, key=_version_order)
        unknown = ["unknown"] if any(key is None for _, key in found) else []
        versions = tuple(known + unknown)
    return ReasonCounts(
        considered=fits + sum(counts.values()),
        fits=fits,
        counts=counts,
        most_free_memory_mib=most_mem,
        most_free_vcpus=most_vcpus,
        most_td_vcpus=most_td_vcpus,
        keyids_example=example,
        memory_example=memory_example,
        fewest_building=fewest_building,
        module_versions=versions,
        attestation_down=attestation_down,
        vmm_example=vmm_example,
        policy_floor=ctx.policy.min_module_version,
        max_td_builds=ctx.policy.max_td_builds_per_host,
        td_overhead_mib=ctx.policy.td_memory_overhead_mib if req.tdx else 0,
    )


def _version_order(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.strip().split(".") if p.isdigit())


def _gloss(code: str, req: VmRequest, rc: ReasonCounts) -> str:
    if code == "insufficient_memory" and rc.most_free_memory_mib is not None:
        need = f"{req.memory_mib} MiB"
        if rc.td_overhead_mib:
            charge = memory_charge(req, _policy(rc))
            need = f"{req.memory_mib} MiB + {rc.td_overhead_mib} MiB TD overhead = {charge} MiB"
        free = max(rc.most_free_memory_mib, 0)
        pamt = rc.memory_example[1] if rc.memory_example is not None else 0
        after = f" after {pamt} MiB PAMT" if pamt else ""
        return f"needs {need}, most free {free} MiB{after}"
    if code == "tdx_module_too_old":
        hosts = ", ".join(rc.module_versions[:_VERSIONS_SHOWN]) or "unknown"
        more = ", ..." if len(rc.module_versions) > _VERSIONS_SHOWN else ""
        return f"floor {rc.policy_floor}, hosts at {hosts}{more}"
    if code == "td_build_burst" and rc.fewest_building is not None:
        return f"{rc.fewest_building}/{rc.max_td_builds} TDs building"
    if code == "attestation_unavailable" and rc.attestation_down is not None:
        n = rc.counts.get(code, 0)
        parts = []
        if rc.attestation_down:
            parts.append(f"{rc.attestation_down} not answering")
        if n - rc.attestation_down:
            parts.append(f"{n - rc.attestation_down} not checked")
        return "quote generation service: " + ", ".join(parts)
    if code == "vmm_tdx_unsupported" and rc.vmm_example:
        return f"QEMU/libvirt without TDX, e.g. {rc.vmm_example}"
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


def _policy(rc: ReasonCounts) -> Policy:
    return Policy(td_memory_overhead_mib=rc.td_overhead_mib)


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
