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
        return self.memory_mib - self.reserved_memory_mib - self.used_memory_mib

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


@dataclass(frozen=True, slots=True)
class Context:
    """What filters need besides the host and the request."""

    alive_after: datetime  # a heartbeat at or after this instant means alive
