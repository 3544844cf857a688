"""Placement filters. Each is one small class with its stable reason codes (API.md) and two
forms that must agree: ``check`` on plain data (unit- and property-tested) and ``rejects`` as SQL
conditions, so that hard constraints run in the database on indexed columns instead of a Python
scan of every host. A property test holds the two forms equal on random fleets.

The registry order is the order of blame: a host that fails several filters is counted under the
first, so the reason counts of an explanation add up to the hosts considered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

from sqlalchemy import ColumnElement, and_, case, exists, false, func, not_, or_
from sqlalchemy.sql.expression import literal

from service.hosts.readiness import TdxState
from service.models import ACTIVE_VM_STATUSES, Host, HostLabel, Vm
from service.scheduler.types import Context, HostView, VmRequest, memory_charge

Rejection = tuple[str, ColumnElement[bool]]


class Filter(Protocol):
    codes: ClassVar[tuple[str, ...]]

    def check(self, host: HostView, req: VmRequest, ctx: Context) -> str | None:
        """The reason code this filter rejects the host for, or None when it passes."""

    def rejects(self, req: VmRequest, ctx: Context) -> Sequence[Rejection]:
        """SQL conditions on ``hosts`` that reject a host, each with its code, in check order."""


_TDX_STATE_CODES = {
    TdxState.UNKNOWN.value: "tdx_state_unknown",
    TdxState.UNSUPPORTED.value: "tdx_unsupported",
    TdxState.DISABLED.value: "tdx_disabled",
    TdxState.FAILED.value: "tdx_failed",
}


class TdxReadinessFilter:
    """TDX VMs only on ``ready`` hosts; any VM needs a reported load with kvm_intel loaded."""

    codes: ClassVar[tuple[str, ...]] = ("tdx_state_unknown", "tdx_unsupported", "tdx_disabled", "tdx_failed")

    def check(self, host: HostView, req: VmRequest, ctx: Context) -> str | None:
        if host.tdx_state == TdxState.UNKNOWN.value:
            return "tdx_state_unknown"
        if req.tdx:
            return _TDX_STATE_CODES.get(host.tdx_state)
        if not host.vm_capable:
            return "tdx_failed"
        return None

    def rejects(self, req: VmRequest, ctx: Context) -> Sequence[Rejection]:
        unknown = ("tdx_state_unknown", Host.tdx_state == TdxState.UNKNOWN.value)
        if req.tdx:
            return [unknown] + [
                (code, Host.tdx_state == state)
                for state, code in _TDX_STATE_CODES.items()
                if state != TdxState.UNKNOWN.value
            ]
        return [unknown, ("tdx_failed", Host.vm_capable == false())]


class LivenessFilter:
    codes: ClassVar[tuple[str, ...]] = ("host_stale",)

    def check(self, host: HostView, req: VmRequest, ctx: Context) -> str | None:
        if host.last_heartbeat_at is None or host.last_heartbeat_at < ctx.alive_after:
            return "host_stale"
        return None

    def rejects(self, req: VmRequest, ctx: Context) -> Sequence[Rejection]:
        return [
            (
                "host_stale",
                or_(Host.last_heartbeat_at.is_(None), Host.last_heartbeat_at < ctx.alive_after),
            )
        ]


class AdminStateFilter:
    codes: ClassVar[tuple[str, ...]] = ("host_cordoned", "host_draining")

    def check(self, host: HostView, req: VmRequest, ctx: Context) -> str | None:
        if not host.schedulable:
            return "host_cordoned"
        if host.draining:
            return "host_draining"
        return None

    def rejects(self, req: VmRequest, ctx: Context) -> Sequence[Rejection]:
        return [("host_cordoned", Host.schedulable == false()), ("host_draining", Host.draining == literal(True))]


class TdxModuleFloorFilter:
    """The fleet's TDX module floor (policy ``tdx_min_module_version``): while one is set, a TD goes
    only to a host whose module version is known and at least the floor (dotted numeric order, on
    the host's sortable version key)."""

    codes: ClassVar[tuple[str, ...]] = ("tdx_module_too_old",)

    def check(self, host: HostView, req: VmRequest, ctx: Context) -> str | None:
        floor = ctx.policy.min_module_key
        if req.tdx and floor is not None and (host.tdx_module_key is None or host.tdx_module_key < floor):
            return "tdx_module_too_old"
        return None

    def rejects(self, req: VmRequest, ctx: Context) -> Sequence[Rejection]:
        floor = ctx.policy.min_module_key
        if not req.tdx or floor is None:
            return []
        return [("tdx_module_too_old", or_(Host.tdx_module_key.is_(None), Host.tdx_module_key < floor))]


class VmmFilter:
    """A TD needs a VMM that can build one (QEMU 10.1+, libvirt listing TDX): hosts whose agent
    reports it unsupported are skipped; unknown is given the benefit of the doubt."""

    codes: ClassVar[tuple[str, ...]] = ("vmm_tdx_unsupported",)

    def check(self, host: HostView, req: VmRequest, ctx: Context) -> str | None:
        if req.tdx and host.vmm_tdx == "unsupported":
            return "vmm_tdx_unsupported"
        return None

    def rejects(self, req: VmRequest, ctx: Context) -> Sequence[Rejection]:
        if not req.tdx:
            return []
        return [("vmm_tdx_unsupported", func.coalesce(Host.vmm_tdx, "") == "unsupported")]


class AttestationFilter:
    """A VM asking for attestation goes only where the host's latest heartbeat saw its quote
    generation service answer."""

    codes: ClassVar[tuple[str, ...]] = ("attestation_unavailable",)

    def check(self, host: HostView, req: VmRequest, ctx: Context) -> str | None:
        if req.attestation and host.attestation_ready is not True:
            return "attestation_unavailable"
        return None

    def rejects(self, req: VmRequest, ctx: Context) -> Sequence[Rejection]:
        if not req.attestation:
            return []
        return [("attestation_unavailable", func.coalesce(Host.attestation_ready, false()) == false())]


def td_vcpu_limit_sql() -> ColumnElement[Any]:
    return func.coalesce(Host.present_cpus, Host.vcpus)


class TdVcpuFilter:
    """KVM caps a trust domain's vCPUs at the host's present CPUs, whatever the allocation ratio
    (``kvm->max_vcpus = min(..., num_present_cpus())``): a bigger TD could never start there."""

    codes: ClassVar[tuple[str, ...]] = ("td_vcpus_exceed_host",)

    def check(self, host: HostView, req: VmRequest, ctx: Context) -> str | None:
        if req.tdx and req.vcpus > host.td_vcpu_limit:
            return "td_vcpus_exceed_host"
        return None

    def rejects(self, req: VmRequest, ctx: Context) -> Sequence[Rejection]:
        if not req.tdx:
            return []
        return [("td_vcpus_exceed_host", td_vcpu_limit_sql() < req.vcpus)]


def keyids_in_use_sql() -> ColumnElement[Any]:
    """max(claimed, observed in use): the agent sees TDs the control plane did not place, and leaks."""
    observed = func.coalesce(Host.keyids_observed_in_use, 0)
    return case((observed > Host.used_keyids, observed), else_=Host.used_keyids)


class KeyIdFilter:
    """One KeyID per trust domain: free = the load's KeyIDs - max(claimed, observed in use)."""

    codes: ClassVar[tuple[str, ...]] = ("keyids_exhausted",)

    def check(self, host: HostView, req: VmRequest, ctx: Context) -> str | None:
        if req.tdx and host.keyids_in_use + 1 > host.keyids_total:
            return "keyids_exhausted"
        return None

    def rejects(self, req: VmRequest, ctx: Context) -> Sequence[Rejection]:
        if not req.tdx:
            return []
        return [("keyids_exhausted", keyids_in_use_sql() + 1 > Host.keyids_total)]


def vcpu_limit_sql() -> ColumnElement[Any]:
    return (Host.vcpus - Host.reserved_vcpus) * Host.cpu_allocation_ratio


class VcpuFilter:
    """vCPUs may be over-committed up to the host's CPU allocation ratio."""

    codes: ClassVar[tuple[str, ...]] = ("insufficient_vcpus",)

    def check(self, host: HostView, req: VmRequest, ctx: Context) -> str | None:
        if host.used_vcpus + req.vcpus > host.vcpu_limit:
            return "insufficient_vcpus"
        return None

    def rejects(self, req: VmRequest, ctx: Context) -> Sequence[Rejection]:
        return [("insufficient_vcpus", Host.used_vcpus + req.vcpus > vcpu_limit_sql())]


class MemoryFilter:
    """A trust domain's memory is private: memory is never over-committed, for any VM. A TD is
    charged the policy's per-TD overhead on top; the host's PAMT is never free."""

    codes: ClassVar[tuple[str, ...]] = ("insufficient_memory",)

    def check(self, host: HostView, req: VmRequest, ctx: Context) -> str | None:
        if memory_charge(req, ctx.policy) > host.free_memory_mib:
            return "insufficient_memory"
        return None

    def rejects(self, req: VmRequest, ctx: Context) -> Sequence[Rejection]:
        return [("insufficient_memory", Host.free_memory_mib < memory_charge(req, ctx.policy))]


class TdBuildBurstFilter:
    """At most ``max_td_builds_per_host`` TDs per host in ``scheduled`` (placed, not yet running):
    building a TD (adding and measuring its private pages) is heavy, and a burst of builds on one
    host slows every one of them. A TD turning running frees a slot."""

    codes: ClassVar[tuple[str, ...]] = ("td_build_burst",)

    def check(self, host: HostView, req: VmRequest, ctx: Context) -> str | None:
        if req.tdx and host.tds_building >= ctx.policy.max_td_builds_per_host:
            return "td_build_burst"
        return None

    def rejects(self, req: VmRequest, ctx: Context) -> Sequence[Rejection]:
        if not req.tdx:
            return []
        return [("td_build_burst", Host.tds_building >= ctx.policy.max_td_builds_per_host)]


class SelectorFilter:
    codes: ClassVar[tuple[str, ...]] = ("selector_mismatch",)

    def check(self, host: HostView, req: VmRequest, ctx: Context) -> str | None:
        if any(host.labels.get(k) != v for k, v in req.selector):
            return "selector_mismatch"
        return None

    def rejects(self, req: VmRequest, ctx: Context) -> Sequence[Rejection]:
        if not req.selector:
            return []
        return [
            (
                "selector_mismatch",
                or_(
                    *[
                        not_(
                            exists().where(
                                HostLabel.host_id == Host.id, HostLabel.key == k, HostLabel.value == v
                            )
                        )
                        for k, v in req.selector
                    ]
                ),
            )
        ]


class AntiAffinityFilter:
    """At most one active VM of an anti-affinity group per host."""

    codes: ClassVar[tuple[str, ...]] = ("anti_affinity",)

    def check(self, host: HostView, req: VmRequest, ctx: Context) -> str | None:
        if req.anti_affinity_group is not None and req.anti_affinity_group in host.groups:
            return "anti_affinity"
        return None

    def rejects(self, req: VmRequest, ctx: Context) -> Sequence[Rejection]:
        if req.anti_affinity_group is None:
            return []
        return [
            (
                "anti_affinity",
                exists().where(
                    and_(
                        Vm.anti_affinity_group == req.anti_affinity_group,
                        Vm.host_id == Host.id,
                        Vm.status.in_(ACTIVE_VM_STATUSES),
                    )
                ),
            )
        ]


# The registry: order matters (see the module docstring). A request's selector is its scope (API.md):
# the hosts it excludes are selector_mismatch whatever else is wrong with them, so that every other
# reason in an explanation speaks only of the hosts the request asked for.
FILTERS: tuple[Filter, ...] = (
    SelectorFilter(),
    TdxReadinessFilter(),
    LivenessFilter(),
    AdminStateFilter(),
    TdxModuleFloorFilter(),
    VmmFilter(),
    AttestationFilter(),
    TdVcpuFilter(),
    KeyIdFilter(),
    VcpuFilter(),
    MemoryFilter(),
    TdBuildBurstFilter(),
    AntiAffinityFilter(),
)

REASON_CODES: tuple[str, ...] = tuple(code for f in FILTERS for code in f.codes)


def first_rejection(host: HostView, req: VmRequest, ctx: Context) -> str | None:
    for flt in FILTERS:
        code = flt.check(host, req, ctx)
        if code is not None:
            return code
    return None


def all_rejections(req: VmRequest, ctx: Context) -> list[Rejection]:
    return [rej for flt in FILTERS for rej in flt.rejects(req, ctx)]
