"""The TDX state rules: what a kvm_intel load report means for a host. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class TdxState(StrEnum):
    UNKNOWN = "unknown"
    UNSUPPORTED = "unsupported"
    DISABLED = "disabled"
    FAILED = "failed"
    READY = "ready"


@dataclass(frozen=True, slots=True)
class LoadFacts:
    kvm_intel_loaded: bool
    tdx_platform: bool
    tdx_requested: bool
    tdx_effective: bool
    keyids_total: int
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Readiness:
    state: TdxState
    reason: str | None
    # Whether the host can run any VM at all (a non-TDX VM needs kvm_intel loaded too).
    vm_capable: bool


def derive_readiness(facts: LoadFacts) -> Readiness:
    """The state derivation table of API.md, first matching row wins."""
    first_error = facts.errors[0] if facts.errors else None
    capable = facts.kvm_intel_loaded
    if not facts.tdx_platform:
        return Readiness(
            TdxState.UNSUPPORTED, "platform does not support TDX (no tdx_host_platform CPU flag)", capable
        )
    if not facts.kvm_intel_loaded:
        return Readiness(TdxState.FAILED, first_error or "kvm_intel is not loaded: no VM can run", False)
    if not facts.tdx_requested:
        return Readiness(TdxState.DISABLED, "not opted in: kvm_intel was loaded without tdx=1", True)
    if not facts.tdx_effective:
        return Readiness(
            TdxState.FAILED,
            first_error or "tdx=1 was requested but kvm_intel reports tdx=N: TDX bring-up failed",
            True,
        )
    if facts.keyids_total <= 0:
        return Readiness(TdxState.FAILED, first_error or "no TDX private KeyIDs available", True)
    return Readiness(TdxState.READY, None, True)


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
