"""CPUs and memory: what the host offers to VMs, and the TD vCPU limit.

KVM caps a TD's vCPUs at the *present* CPUs (``kvm->max_vcpus = min(..., num_present_cpus())`` in
arch/x86/kvm/vmx/tdx.c), whatever the over-commit ratio; capacity counts the *online* CPUs.
"""

from __future__ import annotations

from pathlib import Path

from service.agent.files import read_text


def count_cpu_list(text: str) -> int | None:
    """The number of CPUs in a kernel CPU list like ``0-7,9``; ``None`` when it is empty or garbled."""
    total = 0
    for part in text.strip().split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            return None
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            return None
        total += last - first + 1
    return total or None


def memtotal_mib(meminfo: str) -> int | None:
    for line in meminfo.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "MemTotal:" and parts[1].isdigit():
            mib = int(parts[1]) // 1024
            return mib or None
    return None


def online_cpus(root: Path) -> int | None:
    return count_cpu_list(read_text(root, "sys/devices/system/cpu/online") or "")


def present_cpus(root: Path) -> int | None:
    return count_cpu_list(read_text(root, "sys/devices/system/cpu/present") or "")


def memory_mib(root: Path) -> int | None:
    return memtotal_mib(read_text(root, "proc/meminfo") or "")
