"""The plain data the scheduler works on: what a VM asks for and what a host offers."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True, slots=True)
class VmRequest:
    vcpus: int
    memory_mib: int
    tdx: bool
    selector: tuple[tuple[str, str], ...] = ()
    anti_affinity_group: str | None = None
    # Only on hosts whose quote generation service answers (a TD that must attest).
    attestation: bool = False

    @property
    def keyids(self) -> int:
        """Each trust domain takes exactly one KeyID."""
        return 1 if self.tdx else 0


@dataclass(frozen=True, slots=True)
class HostView:
    id: uuid.UUID
    name: str
    tdx_state: str
    vm_capable: bool
    last_heartbeat_at: datetime | None
    schedulable: bool
    draining: bool
    vcpus: int
    reserved_vcpus: int
    cpu_allocation_ratio: float
    used_vcpus: int
    memory_mib: int
    reserved_memory_mib: int
    used_memory_mib: int
    keyids_total: int
    used_keyids: int
    generation: int
    # None: not reported (the TD vCPU cap falls back to vcpus; KeyIDs in use to the claimed ones).
    present_cpus: int | None = None
    keyids_observed_in_use: int | None = None
    # The TDX module version's sortable key (service/policy/versions.py); None: unknown.
    tdx_module_key: str | None = None
    attestation_ready: bool | None = None
    vmm_tdx: str | None = None
    pamt_mib: int = 0
    tds_building: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    # Anti-affinity groups of the VMs active on this host.
    groups: frozenset[str] = frozenset()

    @property
    def vcpu_limit(self) -> float:
        return (self.vcpus - self.reserved_vcpus) * self.cpu_allocation_ratio

    @property
    def free_vcpus(self) -> float:
        return self.vcpu_limit - self.used_vcpus

    @property
    def free_memory_mib(self) -> int:
        """What a placement may take: the PAMT of the TDX module is never schedulable."""
        return self.memory_mib - self.reserved_memory_mib - self.pamt_mib - self.used_memory_mib

    @property
    def td_vcpu_limit(self) -> int:
        """KVM caps a TD's vCPUs at the present CPUs, whatever the allocation ratio."""
        return self.present_cpus if self.present_cpus is not None else self.vcpus

    @property
    def keyids_in_use(self) -> int:
        """Claimed by placements, or seen in use by the agent (TDs started elsewhere, leaked KeyIDs)."""
        return max(self.used_keyids, self.keyids_observed_in_use or 0)

    @property
    def free_keyids(self) -> int:
        return self.keyids_total - self.keyids_in_use


DEFAULT_MAX_TD_BUILDS_PER_HOST = 4


@dataclass(frozen=True, slots=True)
class Policy:
    """The fleet policy the filters apply (GET /v1/policy, service/policy/)."""

    # The TDX module floor: its version, and its sortable key; None: no floor.
    min_module_version: str | None = None
    min_module_key: str | None = None
    # TDs per host in ``scheduled`` (placed, not yet running) at once.
    max_td_builds_per_host: int = DEFAULT_MAX_TD_BUILDS_PER_HOST
    # Memory charged to a host per TD besides the TD's own (VMM, S-EPT page tables, TD control pages).
    td_memory_overhead_mib: int = 0


@dataclass(frozen=True, slots=True)
class Context:
    """What filters need besides the host and the request."""

    alive_after: datetime  # a heartbeat at or after this instant means alive
    policy: Policy = Policy()


def memory_charge(req: VmRequest, policy: Policy) -> int:
    """The memory a placement takes from its host: a TD's own plus the per-TD overhead."""
    return req.memory_mib + (policy.td_memory_overhead_mib if req.tdx else 0)
