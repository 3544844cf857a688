"""The TDX state rules (service/hosts/readiness.py), as pure functions: states, reason codes, the
kernel's words and remedies."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.hosts.readiness import (
    KernelLog,
    LoadFacts,
    LoadKind,
    TdxState,
    classify_load,
    derive_readiness,
    reload_allowed,
    with_module_health,
)
from service.kernel_messages import MESSAGES
from service.tdx_reasons import REASONS

READY = LoadFacts(
    kvm_intel_loaded=True, tdx_platform=True, tdx_requested=True, tdx_effective=True, keyids_total=15, kvm_tdx=True,
    kernel_log=KernelLog.COMPLETE,
)
HIBERNATION = "virt/tdx: initialization failed: Hibernation support is enabled"
NO_KEYIDS = "kvm_intel: tdx: no TDX private KeyIDs available"
INIT_FAILED = "virt/tdx: module initialization failed (-5)"
PAMT = "virt/tdx: module initialization failed (-12)"
RBP = "virt/tdx: frame pointer (RBP) clobber bug present, upgrade TDX module"
APICV = "kvm_intel: APICv is required for TDX"


def facts(**changes: object) -> LoadFacts:
    values = {name: getattr(READY, name) for name in LoadFacts.__dataclass_fields__}
    values.update(changes)
    return LoadFacts(**values)  # type: ignore[arg-type]


def test_ready() -> None:
    r = derive_readiness(READY)
    assert (r.state, r.reason_code, r.reason, r.remedy, r.vm_capable) == (TdxState.READY, None, None, None, True)


def test_kernel_without_kvm_tdx_is_unsupported_whatever_else() -> None:
    # kvm_intel loaded without a tdx parameter: this kernel has no KVM TDX; a reload cannot help.
    for platform in (True, False):
        r = derive_readiness(facts(kvm_tdx=False, tdx_platform=platform, tdx_effective=False, keyids_total=0))
        assert (r.state, r.reason_code) == (TdxState.UNSUPPORTED, "kernel_without_kvm_tdx")
        assert r.reason == "kernel has no KVM TDX support (Linux 6.16+ with KVM_INTEL_TDX needed)"
        assert r.vm_capable is True
        assert r.remedy and "6.16" in r.remedy


def test_no_platform_flag_without_a_fixable_cause_is_unsupported_in_the_kernels_words() -> None:
    r = derive_readiness(facts(tdx_platform=False, tdx_effective=False, keyids_total=0, errors=(NO_KEYIDS,)))
    assert (r.state, r.reason_code, r.reason) == (TdxState.UNSUPPORTED, "platform_without_tdx", NO_KEYIDS)
    assert r.vm_capable is True  # plain VMs still run there
    bare = derive_readiness(facts(tdx_platform=False, tdx_requested=False, tdx_effective=False, keyids_total=0))
    assert bare.reason == "platform does not support TDX (no tdx_host_platform CPU flag)"


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (HIBERNATION, "hibernation_enabled"),
        ("virt/tdx: initialization failed: too few private KeyIDs available.", "too_few_keyids"),
    ],
)
def test_a_fixable_missing_platform_flag_is_failed_when_tdx_was_asked_for(line: str, code: str) -> None:
    r = derive_readiness(facts(tdx_platform=False, tdx_effective=False, keyids_total=0, errors=(line, NO_KEYIDS)))
    assert (r.state, r.reason_code, r.reason) == (TdxState.FAILED, code, line)
    assert r.remedy == REASONS[code].remedy
    # Not asked for: the host is simply not opted in, and says what would still stop TDX.
    d = derive_readiness(facts(tdx_platform=False, tdx_requested=False, tdx_effective=False, keyids_total=0,
                               errors=(line,)))
    assert (d.state, d.reason_code) == (TdxState.DISABLED, "not_opted_in")
    assert d.reason is not None and line in d.reason


def test_hibernation_remedy_is_nohibernate_and_a_reboot() -> None:
    r = derive_readiness(facts(tdx_platform=False, tdx_effective=False, keyids_total=0, errors=(HIBERNATION,)))
    assert r.remedy is not None and "nohibernate" in r.remedy and "reboot" in r.remedy


def test_kvm_intel_not_loaded_runs_nothing() -> None:
    r = derive_readiness(facts(kvm_intel_loaded=False, kvm_tdx=None, tdx_effective=False, keyids_total=0))
    assert (r.state, r.reason_code, r.vm_capable) == (TdxState.FAILED, "kvm_intel_not_loaded", False)
    assert r.reason == "kvm_intel is not loaded: no VM can run"


@pytest.mark.parametrize(
    ("errors", "code", "words"),
    [
        ((INIT_FAILED,), "tdx_module_init_failed", INIT_FAILED),
        ((PAMT,), "pamt_alloc_failed", PAMT),
        ((RBP, "virt/tdx: module initialization failed (-22)"), "tdx_module_rbp_bug", RBP),
        (("virt/tdx: TDX-Module initialization failed (-5)",), "tdx_module_init_failed",
         "virt/tdx: TDX-Module initialization failed (-5)"),
        (("kvm_intel: Disable TDX: MAX_VCPU_PER_TD (128) smaller than number of logical CPUs (224).",),
         "max_vcpus_per_td_too_small",
         "kvm_intel: Disable TDX: MAX_VCPU_PER_TD (128) smaller than number of logical CPUs (224)."),
    ],
)
def test_a_hard_failure_stops_kvm_intel_and_says_why(errors: tuple[str, ...], code: str, words: str) -> None:
    r = derive_readiness(facts(kvm_intel_loaded=False, kvm_tdx=None, tdx_effective=False, keyids_total=0,
                               errors=errors))
    assert (r.state, r.reason_code, r.reason, r.vm_capable) == (
        TdxState.FAILED, code, f"kvm_intel did not load: {words}", False,
    )
    assert REASONS[code].reboot  # sticky for the boot: only a reboot retries


def test_a_soft_refusal_does_not_explain_an_unloaded_kvm_intel() -> None:
    # An old load's "APICv is required" cannot be why kvm_intel is not there now.
    r = derive_readiness(facts(kvm_intel_loaded=False, kvm_tdx=None, tdx_effective=False, errors=(APICV,)))
    assert r.reason_code == "kvm_intel_not_loaded"


def test_not_requested_is_disabled() -> None:
    r = derive_readiness(facts(tdx_requested=False, tdx_effective=False, keyids_total=0))
    assert (r.state, r.reason_code, r.vm_capable) == (TdxState.DISABLED, "not_opted_in", True)
    assert r.reason == "not opted in: kvm_intel was loaded without tdx=1"
    assert r.remedy is not None and "modprobe kvm_intel tdx=1" in r.remedy


def test_a_sticky_failure_is_named_on_a_disabled_host() -> None:
    r = derive_readiness(facts(tdx_requested=False, tdx_effective=False, keyids_total=0, errors=(INIT_FAILED,)))
    assert r.state is TdxState.DISABLED
    assert r.reason == (
        f"not opted in: kvm_intel was loaded without tdx=1; TDX would still fail until a reboot: {INIT_FAILED}"
    )


@pytest.mark.parametrize(
    ("line", "code", "reboot"),
    [
        (APICV, "missing_apicv", False),
        ("kvm_intel: EPT is required for TDX", "missing_ept", False),
        ("kvm_intel: TDP MMU and MMIO caching and EPT A/D bit is required for TDX", "missing_tdp_mmu", False),
        ("kvm_intel: tdx: tdx requires kvm.enable_virt_at_load=1", "virt_not_enabled_at_load", False),
        ("kvm_intel: tdx: MOVDIR64B is required for TDX", "missing_cpu_feature", True),
        ("kvm_intel: Self-snoop is required for TDX", "missing_cpu_feature", True),
        ("virt/tdx: module not loaded", "tdx_module_not_loaded", True),
    ],
)
def test_a_soft_refusal_is_failed_with_the_kernels_words(line: str, code: str, reboot: bool) -> None:
    r = derive_readiness(facts(tdx_effective=False, keyids_total=0, errors=(line,)))
    assert (r.state, r.reason_code, r.reason, r.vm_capable) == (TdxState.FAILED, code, line, True)
    assert REASONS[code].reboot is reboot


def test_the_most_fundamental_reason_wins() -> None:
    r = derive_readiness(facts(tdx_effective=False, keyids_total=0, errors=(APICV, "virt/tdx: module not loaded")))
    assert r.reason_code == "tdx_module_not_loaded"


@pytest.mark.parametrize(
    ("log", "note"),
    [(KernelLog.UNREADABLE, "could not be read"), (KernelLog.ROTATED, "no longer holds"), (KernelLog.COMPLETE, None)],
)
def test_an_unexplained_refusal_says_whether_the_log_was_read(log: KernelLog, note: str | None) -> None:
    r = derive_readiness(facts(tdx_effective=False, keyids_total=0, kernel_log=log))
    assert (r.state, r.reason_code) == (TdxState.FAILED, "tdx_refused")
    assert r.reason is not None and r.reason.startswith("tdx=1 was asked for but kvm_intel reports tdx=N")
    assert (note in r.reason) if note else r.reason == "tdx=1 was asked for but kvm_intel reports tdx=N"


def test_an_unknown_kernel_line_is_still_the_reason() -> None:
    r = derive_readiness(facts(tdx_effective=False, errors=("virt/tdx: something new went wrong",)))
    assert (r.reason_code, r.reason) == ("tdx_refused", "virt/tdx: something new went wrong")


def test_tdx_on_but_keyids_unknown_is_failed() -> None:
    r = derive_readiness(facts(keyids_total=0, kernel_log=KernelLog.ROTATED))
    assert (r.state, r.reason_code, r.vm_capable) == (TdxState.FAILED, "keyids_unknown", True)
    assert r.reason is not None and "misc cgroup" in r.reason and "no longer holds" in r.reason


def test_errors_do_not_fail_a_ready_load() -> None:
    assert derive_readiness(facts(errors=(APICV, "a harmless warning"))).state is TdxState.READY


def test_a_failed_module_fails_a_ready_host_only() -> None:
    ready = derive_readiness(READY)
    failed = with_module_health(ready, False)
    assert (failed.state, failed.reason_code, failed.vm_capable) == (TdxState.FAILED, "tdx_module_update_failed", True)
    assert failed.remedy is not None and "Reboot" in failed.remedy
    assert with_module_health(ready, True) == ready
    assert with_module_health(ready, None) == ready
    disabled = derive_readiness(facts(tdx_requested=False, tdx_effective=False))
    assert with_module_health(disabled, False) == disabled


# --- every combination: the first row wins, and every non-ready state has a known code ------------


def _expected(f: LoadFacts) -> TdxState:
    """The README's derivation table, written out independently: the first matching row wins."""
    blockers = {"Hibernation", "too few private KeyIDs"}
    has_blocker = any(b in e for e in f.errors for b in blockers)
    if f.kvm_intel_loaded and f.kvm_tdx is False:
        return TdxState.UNSUPPORTED
    if not f.tdx_platform:
        if has_blocker:
            return TdxState.FAILED if f.tdx_requested else TdxState.DISABLED
        return TdxState.UNSUPPORTED
    if not f.kvm_intel_loaded:
        return TdxState.FAILED
    if not f.tdx_requested:
        return TdxState.DISABLED
    if not f.tdx_effective or f.keyids_total == 0:
        return TdxState.FAILED
    return TdxState.READY


@pytest.mark.parametrize(
    ("platform", "loaded", "requested", "effective", "keyids", "kvm_tdx", "errors"),
    list(itertools.product(
        [False, True], [False, True], [False, True], [False, True], [0, 4], [None, False, True],
        [(), (HIBERNATION, NO_KEYIDS)],
    )),
)
def test_first_row_wins_over_every_combination(
    platform: bool, loaded: bool, requested: bool, effective: bool, keyids: int, kvm_tdx: bool | None,
    errors: tuple[str, ...],
) -> None:
    f = LoadFacts(
        kvm_intel_loaded=loaded, tdx_platform=platform, tdx_requested=requested, tdx_effective=effective,
        keyids_total=keyids, errors=errors, kvm_tdx=kvm_tdx,
    )
    r = derive_readiness(f)
    assert r.state is _expected(f)
    assert r.vm_capable is loaded


_LINES = [m.render(*([-12] * m.fmt.count("%"))) for m in MESSAGES] + ["virt/tdx: an unknown failure"]


@settings(max_examples=1000, deadline=None)
@given(
    loaded=st.booleans(), platform=st.booleans(), requested=st.booleans(), effective=st.booleans(),
    keyids=st.integers(0, 3), kvm_tdx=st.sampled_from([None, False, True]),
    log=st.sampled_from([None, *KernelLog]), errors=st.lists(st.sampled_from(_LINES), max_size=4),
    healthy=st.sampled_from([None, False, True]),
)
def test_every_non_ready_state_has_a_stable_code_words_and_a_remedy(
    loaded: bool, platform: bool, requested: bool, effective: bool, keyids: int, kvm_tdx: bool | None,
    log: KernelLog | None, errors: list[str], healthy: bool | None,
) -> None:
    f = LoadFacts(loaded, platform, requested, effective, keyids, tuple(errors), kvm_tdx, log)
    r = with_module_health(derive_readiness(f), healthy)
    if r.state is TdxState.READY:
        assert (r.reason_code, r.reason, r.remedy) == (None, None, None)
        return
    assert r.reason_code in REASONS
    assert REASONS[r.reason_code].state == r.state.value
    assert r.reason and r.remedy == REASONS[r.reason_code].remedy


def test_classify_load() -> None:
    assert classify_load(None, "b1") is LoadKind.FIRST
    assert classify_load("b1", "b1") is LoadKind.RELOAD
    assert classify_load("b1", "b2") is LoadKind.REBOOT


@pytest.mark.parametrize(
    ("kind", "active", "allowed"),
    [
        (LoadKind.FIRST, 0, True),
        (LoadKind.FIRST, 3, True),
        (LoadKind.RELOAD, 0, True),
        (LoadKind.RELOAD, 1, False),
        (LoadKind.RELOAD, 50, False),
        (LoadKind.REBOOT, 0, True),
        (LoadKind.REBOOT, 7, True),
    ],
)
def test_reload_allowed(kind: LoadKind, active: int, allowed: bool) -> None:
    assert reload_allowed(kind, active) is allowed
