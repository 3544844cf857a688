"""The TDX state rules: what a kvm_intel load report (and the module's health since) means for a
host. Pure functions.

Every non-ready state carries a stable reason code (service/tdx_reasons.py), the kernel's words
when a kernel-log line of the load says why (service/kernel_messages.py), and a remedy.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from service.kernel_messages import reason_codes
from service.tdx_reasons import PRIORITY, REASONS


class TdxState(StrEnum):
    UNKNOWN = "unknown"
    UNSUPPORTED = "unsupported"
    DISABLED = "disabled"
    FAILED = "failed"
    READY = "ready"


class KernelLog(StrEnum):
    """How much of this boot's kernel log the agent could read."""

    COMPLETE = "complete"
    ROTATED = "rotated"  # the oldest records of this boot were overwritten
    UNREADABLE = "unreadable"


@dataclass(frozen=True, slots=True)
class LoadFacts:
    kvm_intel_loaded: bool
    tdx_platform: bool
    tdx_requested: bool
    tdx_effective: bool
    keyids_total: int
    errors: tuple[str, ...] = ()
    # /sys/module/kvm_intel/parameters/tdx exists; None when not known (kvm_intel not loaded, old agent).
    kvm_tdx: bool | None = None
    kernel_log: KernelLog | None = None


@dataclass(frozen=True, slots=True)
class Readiness:
    state: TdxState
    reason_code: str | None
    reason: str | None
    # Whether the host can run any VM at all (a non-TDX VM needs kvm_intel loaded too).
    vm_capable: bool

    @property
    def remedy(self) -> str | None:
        return remedy_of(self.reason_code)


def remedy_of(code: str | None) -> str | None:
    known = REASONS.get(code) if code else None
    return known.remedy if known else None


READY = Readiness(TdxState.READY, None, None, True)

# Boot-time failures of the TDX host core that leave the tdx_host_platform flag unset: the
# operator can fix them, so the host is `failed` (when it asked for TDX), not `unsupported`.
PLATFORM_BLOCKERS = frozenset({"hibernation_enabled", "too_few_keyids", "tdx_module_init_failed"})
# Failures on a path that makes kvm_intel fail to load (with tdx=1) instead of loading with tdx=N.
LOAD_BLOCKERS = frozenset({
    "tdx_module_init_failed", "pamt_alloc_failed", "tdx_module_rbp_bug", "tdx_module_not_loaded",
    "max_vcpus_per_td_too_small", "missing_cpu_feature",
})

_LOG_NOTE = {
    KernelLog.UNREADABLE: "the kernel log could not be read, so the kernel's reason is not known",
    KernelLog.ROTATED: "the kernel log no longer holds this boot's first records, so the kernel's reason may be lost",
}


def _verdict(state: TdxState, code: str, words: str | None, vm_capable: bool) -> Readiness:
    return Readiness(state, code, words or REASONS[code].summary, vm_capable)


def _with_note(text: str, facts: LoadFacts) -> str:
    note = _LOG_NOTE.get(facts.kernel_log) if facts.kernel_log else None
    return f"{text} ({note})" if note else text


def explanations(errors: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(code, kernel line)`` the load's kernel-log lines give, most fundamental first, one per code."""
    seen: dict[str, str] = {}
    for code, line in reason_codes(errors):
        seen.setdefault(code, line)
    return sorted(seen.items(), key=lambda item: PRIORITY[item[0]])


def _disabled(found: list[tuple[str, str]], vm_capable: bool) -> Readiness:
    text = REASONS["not_opted_in"].summary
    blocker = next(((c, line) for c, line in found if REASONS[c].reboot and REASONS[c].state == "failed"), None)
    if blocker is not None:
        text += f"; TDX would still fail until a reboot: {blocker[1]}"
    return Readiness(TdxState.DISABLED, "not_opted_in", text, vm_capable)


def derive_readiness(facts: LoadFacts) -> Readiness:
    """The state derivation table (README, "TDX state derivation"); the first matching row wins."""
    loaded = facts.kvm_intel_loaded
    found = explanations(facts.errors)
    if loaded and facts.kvm_tdx is False:
        return _verdict(TdxState.UNSUPPORTED, "kernel_without_kvm_tdx", None, True)
    if not facts.tdx_platform:
        blocker = next(((c, line) for c, line in found if c in PLATFORM_BLOCKERS), None)
        if blocker is not None:
            if facts.tdx_requested:
                return _verdict(TdxState.FAILED, blocker[0], blocker[1], loaded)
            return _disabled(found, loaded)
        words = next((line for c, line in found if c == "platform_without_tdx"), None)
        return _verdict(TdxState.UNSUPPORTED, "platform_without_tdx", words, loaded)
    if not loaded:
        blocker = next(((c, line) for c, line in found if c in LOAD_BLOCKERS), None)
        if blocker is not None:
            return _verdict(TdxState.FAILED, blocker[0], f"kvm_intel did not load: {blocker[1]}", False)
        return _verdict(TdxState.FAILED, "kvm_intel_not_loaded", facts.errors[0] if facts.errors else None, False)
    if not facts.tdx_requested:
        return _disabled(found, True)
    if not facts.tdx_effective:
        # Only a failure explains a refusal here (the platform flag is set, whatever a line says).
        failure = next(((c, line) for c, line in found if REASONS[c].state == "failed"), None)
        if failure is not None:
            return _verdict(TdxState.FAILED, failure[0], failure[1], True)
        words = facts.errors[0] if facts.errors else _with_note(REASONS["tdx_refused"].summary, facts)
        return _verdict(TdxState.FAILED, "tdx_refused", words, True)
    if facts.keyids_total <= 0:
        return _verdict(TdxState.FAILED, "keyids_unknown", _with_note(REASONS["keyids_unknown"].summary, facts), True)
    return READY


def with_module_health(load: Readiness, module_healthy: bool | None) -> Readiness:
    """The host's readiness: its load's, unless the TDX module stopped working under it since (a
    failed runtime update: its version can no longer be read and its TDs are gone)."""
    if module_healthy is False and load.state is TdxState.READY:
        return _verdict(TdxState.FAILED, "tdx_module_update_failed", None, True)
    return load


class LoadKind(StrEnum):
    FIRST = "first"  # the host's first report
    RELOAD = "reload"  # kvm_intel reloaded on the same boot
    REBOOT = "reboot"  # a new boot_id: the host restarted


def classify_load(current_boot_id: str | None, new_boot_id: str) -> LoadKind:
    if current_boot_id is None:
        return LoadKind.FIRST
    if current_boot_id == new_boot_id:
        return LoadKind.RELOAD
    return LoadKind.REBOOT


def reload_allowed(kind: LoadKind, active_vms: int) -> bool:
    """KVM cannot be reloaded under running VMs, so a same-boot reload needs an empty host.

    A reboot is always accepted: whatever ran there is gone (its VMs become ``lost``).
    """
    return kind is not LoadKind.RELOAD or active_vms == 0
