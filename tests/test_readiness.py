"""The TDX state rules (service/hosts/readiness.py), as pure functions."""

from __future__ import annotations

import itertools

import pytest

from service.hosts.readiness import (
    LoadFacts,
    LoadKind,
    TdxState,
    classify_load,
    derive_readiness,
    reload_allowed,
)

READY = LoadFacts(kvm_intel_loaded=True, tdx_platform=True, tdx_requested=True, tdx_effective=True, keyids_total=15)


def facts(**changes: object) -> LoadFacts:
    values = {
        "kvm_intel_loaded": READY.kvm_intel_loaded,
        "tdx_platform": READY.tdx_platform,
        "tdx_requested": READY.tdx_requested,
        "tdx_effective": READY.tdx_effective,
        "keyids_total": READY.keyids_total,
        "errors": READY.errors,
    }
    values.update(changes)
    return LoadFacts(**values)  # type: ignore[arg-type]


def test_ready() -> None:
    r = derive_readiness(READY)
    assert (r.state, r.reason, r.vm_capable) == (TdxState.READY, None, True)


def test_unsupported_without_platform() -> None:
    r = derive_readiness(facts(tdx_platform=False, tdx_requested=False, tdx_effective=False, keyids_total=0))
    assert r.state is TdxState.UNSUPPORTED
    assert r.reason
    assert r.vm_capable is True  # plain VMs still run there


def test_kvm_intel_not_loaded_is_failed_and_runs_nothing() -> None:
    r = derive_readiness(facts(kvm_intel_loaded=False, tdx_effective=False))
    assert r.state is TdxState.FAILED
    assert r.reason and "kvm_intel" in r.reason
    assert r.vm_capable is False


def test_kvm_intel_not_loaded_keeps_the_first_error() -> None:
    r = derive_readiness(facts(kvm_intel_loaded=False, errors=("virt/tdx: boom", "other")))
    assert (r.state, r.reason, r.vm_capable) == (TdxState.FAILED, "virt/tdx: boom", False)


def test_not_requested_is_disabled() -> None:
    r = derive_readiness(facts(tdx_requested=False, tdx_effective=False))
    assert r.state is TdxState.DISABLED
    assert r.reason and "tdx=1" in r.reason
    assert r.vm_capable is True


def test_requested_not_effective_is_failed_with_first_error() -> None:
    errors = ("virt/tdx: module initialization failed (-5)", "kvm_intel: TDX not available")
    r = derive_readiness(facts(tdx_effective=False, errors=errors))
    assert (r.state, r.reason, r.vm_capable) == (TdxState.FAILED, errors[0], True)


def test_requested_not_effective_without_errors_has_a_reason() -> None:
    r = derive_readiness(facts(tdx_effective=False))
    assert r.state is TdxState.FAILED
    assert r.reason


def test_zero_keyids_is_failed() -> None:
    r = derive_readiness(facts(keyids_total=0))
    assert r.state is TdxState.FAILED
    assert r.reason and "KeyID" in r.reason
    assert r.vm_capable is True
    with_error = derive_readiness(facts(keyids_total=0, errors=("kvm_intel: tdx: no TDX private KeyIDs available",)))
    assert with_error.reason == "kvm_intel: tdx: no TDX private KeyIDs available"


def test_errors_do_not_fail_a_ready_load() -> None:
    r = derive_readiness(facts(errors=("a harmless warning",)))
    assert r.state is TdxState.READY


def _expected(f: LoadFacts) -> TdxState:
    """The table of API.md, written out independently: the first matching row wins."""
    if not f.tdx_platform:
        return TdxState.UNSUPPORTED
    if not f.kvm_intel_loaded:
        return TdxState.FAILED
    if not f.tdx_requested:
        return TdxState.DISABLED
    if not f.tdx_effective or f.keyids_total == 0:
        return TdxState.FAILED
    return TdxState.READY


@pytest.mark.parametrize(
    ("platform", "loaded", "requested", "effective", "keyids"),
    list(itertools.product([False, True], [False, True], [False, True], [False, True], [0, 4])),
)
def test_first_row_wins_over_every_combination(
    platform: bool, loaded: bool, requested: bool, effective: bool, keyids: int
) -> None:
    f = LoadFacts(
        kvm_intel_loaded=loaded, tdx_platform=platform, tdx_requested=requested, tdx_effective=effective,
        keyids_total=keyids, errors=("first", "second"),
    )
    r = derive_readiness(f)
    assert r.state is _expected(f)
    assert r.vm_capable is loaded
    if r.state is TdxState.FAILED:
        assert r.reason == "first"
    if r.state is TdxState.READY:
        assert r.reason is None


def test_precedence_examples() -> None:
    # No platform beats everything else, even an unloaded module.
    assert derive_readiness(facts(tdx_platform=False, kvm_intel_loaded=False)).state is TdxState.UNSUPPORTED
    # An unloaded module beats "not requested".
    assert derive_readiness(facts(kvm_intel_loaded=False, tdx_requested=False)).state is TdxState.FAILED
    # "Not requested" beats "not effective" and zero KeyIDs: an operator choice, not a failure.
    assert (
        derive_readiness(facts(tdx_requested=False, tdx_effective=False, keyids_total=0)).state
        is TdxState.DISABLED
    )


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
