"""Weighers: each scores a host 0..1 for a request; the engine sums score x multiplier.

A negative multiplier inverts a weigher (as in Nova): free-space weighers with +1 spread VMs
out, with -1 they pack them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from service.hosts.readiness import TdxState
from service.scheduler.types import HostView, VmRequest


class Weigher(Protocol):
    name: str

    def weigh(self, host: HostView, req: VmRequest) -> float: ...


class FreeMemoryWeigher:
    name = "free_memory"

    def weigh(self, host: HostView, req: VmRequest) -> float:
        usable = host.memory_mib - host.reserved_memory_mib
        if usable <= 0:
            return 0.0
        return max(0.0, min(1.0, (host.free_memory_mib - req.memory_mib) / usable))


class FreeVcpuWeigher:
    name = "free_vcpus"

    def weigh(self, host: HostView, req: VmRequest) -> float:
        limit = host.vcpu_limit
        if limit <= 0:
            return 0.0
        return max(0.0, min(1.0, (host.free_vcpus - req.vcpus) / limit))


class TdxAffinityWeigher:
    """Keeps TDX-ready hosts (and their scarce KeyIDs) for TDX work: a non-TDX VM prefers a host
    that is not TDX-ready. TDX VMs are indifferent (they only ever see ready hosts)."""

    name = "tdx_affinity"

    def weigh(self, host: HostView, req: VmRequest) -> float:
        if req.tdx:
            return 1.0
        return 0.0 if host.tdx_state == TdxState.READY.value else 1.0


@dataclass(frozen=True, slots=True)
class Weighted:
    weigher: Weigher
    multiplier: float


def default_weighers(policy: str, tdx_affinity_multiplier: float) -> tuple[Weighted, ...]:
    sign = 1.0 if policy == "spread" else -1.0
    return (
        Weighted(FreeMemoryWeigher(), sign),
        Weighted(FreeVcpuWeigher(), sign * 0.5),
        Weighted(TdxAffinityWeigher(), tdx_affinity_multiplier),
    )


def score(host: HostView, req: VmRequest, weighers: tuple[Weighted, ...]) -> float:
    return sum(w.multiplier * w.weigher.weigh(host, req) for w in weighers)
