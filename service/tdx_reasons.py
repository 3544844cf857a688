"""Why a host is not TDX-ready: every stable reason code, the TDX state it gives, what it means and
what the operator does about it.

Shared by the agent and the service (pure data, no server imports). The README's derivation table
lists the same codes and remedies; ``tests/test_tdx_reasons.py`` holds the two equal. Codes are
listed most fundamental first: when the kernel gives several reasons at once, the first listed here
is the host's reason (its remedy usually unblocks the others, or needs the reboot they need too).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

UNSUPPORTED = "unsupported"
DISABLED = "disabled"
FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Reason:
    code: str
    state: str
    summary: str  # the reason in our words, when no kernel line says it
    remedy: str
    # Only a reboot (after the fix) helps: reloading kvm_intel cannot.
    reboot: bool


_ALL = (
    Reason(
        "kernel_without_kvm_tdx", UNSUPPORTED,
        "kernel has no KVM TDX support (Linux 6.16+ with KVM_INTEL_TDX needed)",
        "Boot a Linux 6.16 or later kernel built with CONFIG_KVM_INTEL_TDX=y (and CONFIG_INTEL_TDX_HOST=y).",
        True,
    ),
    Reason(
        "tdx_module_update_failed", FAILED,
        "a runtime TDX module update failed: the module's version cannot be read and its TDs are gone",
        "Reboot the host: the TDX module is loaded and initialized again at boot. Its TDX VMs were marked lost.",
        True,
    ),
    Reason(
        "tdx_module_rbp_bug", FAILED,
        "the TDX module has the frame pointer (RBP) clobber bug",
        "Update the TDX module (a BIOS update, or a newer module where the firmware's SEAM loader takes it "
        "from), then reboot.",
        True,
    ),
    Reason(
        "hibernation_enabled", FAILED,
        "TDX was not initialized at boot because hibernation is enabled",
        "Add nohibernate to the kernel command line, then reboot.",
        True,
    ),
    Reason(
        "too_few_keyids", FAILED,
        "the BIOS gives TDX fewer than 2 private KeyIDs (one is the TDX module's own)",
        "In the BIOS, give TDX at least 2 private KeyIDs (the TME-MT/TDX KeyID split), then reboot.",
        True,
    ),
    Reason(
        "missing_cpu_feature", FAILED,
        "the CPU or the kernel command line hides a feature TDX needs (XSAVE/OSXSAVE, MOVDIR64B, self-snoop)",
        "Remove noxsave or clearcpuid= settings that hide XSAVE, MOVDIR64B or self-snoop from the kernel "
        "command line (or use a TDX-capable CPU), then reboot.",
        True,
    ),
    Reason(
        "tdx_module_not_loaded", FAILED,
        "the BIOS did not load the TDX module (the first SEAMCALL failed)",
        "Enable the TDX module and its SEAM loader in the BIOS (or install the module where the firmware loads "
        "it from), then reboot.",
        True,
    ),
    Reason(
        "pamt_alloc_failed", FAILED,
        "the TDX module could not be initialized: no memory for its PAMT (about 1/256 of RAM, physically "
        "contiguous)",
        "Reboot and bring TDX up early, before memory fragments: put kvm_intel.tdx=1 on the kernel command line "
        "and reserve fewer huge pages at boot. A failed TDX module initialization stays failed until the next "
        "boot; reloading kvm_intel cannot retry it.",
        True,
    ),
    Reason(
        "tdx_module_init_failed", FAILED,
        "the TDX module initialization failed",
        "Fix the cause the kernel log gives, then reboot: a failed TDX module initialization stays failed for the "
        "whole boot, and reloading kvm_intel cannot retry it.",
        True,
    ),
    Reason(
        "max_vcpus_per_td_too_small", FAILED,
        "the TDX module supports fewer vCPUs per TD than this host has logical CPUs",
        "Update the TDX module to one that supports this many CPUs, or boot with fewer CPUs (nr_cpus=), then "
        "reboot.",
        True,
    ),
    Reason(
        "virt_not_enabled_at_load", FAILED,
        "KVM was loaded with enable_virt_at_load=0, which TDX cannot work with",
        "Drain the host, then: modprobe -r kvm_intel kvm && modprobe kvm enable_virt_at_load=1 && "
        "modprobe kvm_intel tdx=1 (1 is the default; drop enable_virt_at_load=0 from modprobe.d).",
        False,
    ),
    Reason(
        "missing_ept", FAILED,
        "kvm_intel was loaded with EPT off, which TDX needs",
        "Drain the host, then: modprobe -r kvm_intel && modprobe kvm_intel ept=1 tdx=1 (ept=1 is the default; "
        "drop ept=0 from modprobe.d).",
        False,
    ),
    Reason(
        "missing_tdp_mmu", FAILED,
        "KVM was loaded without the TDP MMU, MMIO caching or EPT A/D bits, which TDX needs",
        "Drain the host, then reload KVM with its defaults: modprobe -r kvm_intel kvm && modprobe kvm "
        "tdp_mmu=1 enable_mmio_caching=1 && modprobe kvm_intel eptad=1 tdx=1.",
        False,
    ),
    Reason(
        "missing_apicv", FAILED,
        "kvm_intel was loaded with APICv off, which TDX needs",
        "Drain the host, then: modprobe -r kvm_intel && modprobe kvm_intel enable_apicv=1 tdx=1 (1 is the "
        "default; drop enable_apicv=0 from modprobe.d).",
        False,
    ),
    Reason(
        "platform_without_tdx", UNSUPPORTED,
        "platform does not support TDX (no tdx_host_platform CPU flag)",
        "Enable TDX in the BIOS on a TDX-capable CPU (memory encryption TME and TME-MT, TDX, the SEAM loader, "
        "a KeyID split with at least 2 TDX KeyIDs), boot a kernel with CONFIG_INTEL_TDX_HOST=y, then reboot.",
        True,
    ),
    Reason(
        "kvm_intel_not_loaded", FAILED,
        "kvm_intel is not loaded: no VM can run",
        "Load it: modprobe kvm_intel (add tdx=1 to opt in). If it does not load, the kernel log says why.",
        False,
    ),
    Reason(
        "tdx_refused", FAILED,
        "tdx=1 was asked for but kvm_intel reports tdx=N",
        "Read the kernel's reason in its log (journalctl -k -b, the virt/tdx and kvm_intel lines), fix it, then "
        "drain the host and reload kvm_intel with tdx=1. Let the agent read the kernel log (it needs CAP_SYSLOG) "
        "to see the reason here.",
        False,
    ),
    Reason(
        "keyids_unknown", FAILED,
        "TDX is on (tdx=Y) but the number of TDX KeyIDs is unknown: no misc cgroup and no KeyID range in the "
        "kernel log",
        "Mount the misc cgroup controller (cgroup v2, or v1 at /sys/fs/cgroup/misc), or let the agent read the "
        "kernel log from boot (CAP_SYSLOG, a log buffer large enough to keep the boot records).",
        False,
    ),
    Reason(
        "not_opted_in", DISABLED,
        "not opted in: kvm_intel was loaded without tdx=1",
        "Drain the host, check a one-off modprobe -r kvm_intel && modprobe kvm_intel tdx=1, then persist "
        "'options kvm_intel tdx=1' in /etc/modprobe.d (README: operator guide).",
        False,
    ),
)

REASONS: Mapping[str, Reason] = {r.code: r for r in _ALL}
# The first listed wins when several apply (see the module docstring).
PRIORITY: Mapping[str, int] = {r.code: i for i, r in enumerate(_ALL)}


def reason(code: str) -> Reason:
    return REASONS[code]
