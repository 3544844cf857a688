"""The ``tdx_host_platform`` CPU flag: set at boot by the TDX host core only when the KeyID MSR is
readable, the BIOS gives TDX at least 2 KeyIDs, hibernation is off and the kernel was built with
``INTEL_TDX_HOST``. Without it KVM cannot offer TDX whatever ``kvm_intel.tdx`` says."""

from __future__ import annotations

from pathlib import Path

from service.agent.files import read_text

FLAG = "tdx_host_platform"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The ``flags`` of the first CPU in /proc/cpuinfo (``tdx_host_platform`` is system wide)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return set(value.split())
    return set()


def tdx_host_platform(root: Path) -> bool:
    return FLAG in cpu_flags(read_text(root, "proc/cpuinfo") or "")
