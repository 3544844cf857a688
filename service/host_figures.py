"""The figures tdxctl and the dashboard show for a host, computed one way from the API's host object.

The dashboard's ``static/figures.js`` is this module in JavaScript, function for function; the
browser test checks that both show the same figures for the same hosts. The arithmetic is the
scheduler's (``service/scheduler/types.py``, ``HostView``), so what is shown is what placement uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

Scheduling = Literal["draining", "cordoned", "stale", "schedulable"]


def vcpu_limit(host: Mapping[str, Any]) -> int:
    """vCPUs that placements may claim: (physical - reserved) x the CPU allocation ratio.

    Whole vCPUs: VM sizes and usage are whole numbers, so a fraction of a vCPU never fits a VM.
    """
    ratio = float(host.get("cpu_allocation_ratio", 1.0))
    return math.floor((int(host["vcpus"]) - int(host["reserved_vcpus"])) * ratio)


def memory_limit_mib(host: Mapping[str, Any]) -> int:
    """Memory that placements may claim: physical minus reserved minus the TDX module's PAMT (memory is
    never overcommitted)."""
    return int(host["memory_mib"]) - int(host["reserved_memory_mib"]) - int(host.get("tdx", {}).get("pamt_mib") or 0)


def scheduling(host: Mapping[str, Any]) -> Scheduling:
    """Whether new VMs may land here now, in the words both tools use.

    A host the operator left schedulable but that stopped heartbeating (``alive`` false) is
    ``stale``: the scheduler skips it, so it is never shown as schedulable.
    """
    if host["draining"]:
        return "draining"
    if not host["schedulable"]:
        return "cordoned"
    if not host["alive"]:
        return "stale"
    return "schedulable"


def whole_vcpus(free: float) -> int:
    """A free-vCPU total from ``/v1/capacity`` in whole vCPUs (what VMs can use)."""
    return math.floor(free)
