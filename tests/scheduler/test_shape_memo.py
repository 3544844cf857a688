"""The pending queue's "nothing of this shape fits" memo: the filters' monotonicity it rests on, and
the memo itself against a plain list of what did not fit."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from service.scheduler.filters import first_rejection
from service.scheduler.shape_memo import Shape, ShapeMemo, placement_class
from service.scheduler.types import Context, HostView, VmRequest
from tests.scheduler.test_properties import contexts, fleets, requests


@settings(max_examples=300, deadline=None)
@given(
    fleet=fleets(), req=requests, more_vcpus=st.integers(0, 64), more_memory=st.integers(0, 65536), ctx=contexts()
)
def test_a_larger_vm_of_the_same_class_fits_nowhere_a_smaller_one_does_not(
    fleet: list[HostView], req: VmRequest, more_vcpus: int, more_memory: int, ctx: Context
) -> None:
    """What the memo rests on: every filter is monotone in the VM's size, and sees nothing of the
    VM but its ``VmRequest`` (size plus placement class)."""
    larger = replace(req, vcpus=req.vcpus + more_vcpus, memory_mib=req.memory_mib + more_memory)
    assert placement_class(larger) == placement_class(req)
    for host in fleet:
        if first_rejection(host, req, ctx) is not None:
            assert first_rejection(host, larger, ctx) is not None


@given(requests, requests)
def test_placement_class_ignores_size_only(a: VmRequest, b: VmRequest) -> None:
    same_rest = (a.tdx, a.selector, a.anti_affinity_group, a.attestation) == (
        b.tdx, b.selector, b.anti_affinity_group, b.attestation
    )
    assert (placement_class(a) == placement_class(b)) == same_rest


shapes = st.builds(Shape, st.sampled_from(["c1", "c2", "c3"]), st.integers(1, 8), st.integers(1, 8))


@settings(max_examples=300, deadline=None)
@given(recorded=st.lists(shapes, max_size=30), probes=st.lists(shapes, max_size=30))
def test_the_memo_knows_exactly_what_a_recorded_failure_dominates(recorded: list[Shape], probes: list[Shape]) -> None:
    memo = ShapeMemo()
    for shape in recorded:
        memo.record_no_fit(shape)
    for probe in probes + recorded:
        expected = any(
            r.placement_class == probe.placement_class and probe.vcpus >= r.vcpus and probe.memory_mib >= r.memory_mib
            for r in recorded
        )
        assert memo.known_not_to_fit(probe) == expected
    # The front keeps only the minimal sizes: none dominates another.
    exclusions = memo.exclusions(1000)
    assert len(exclusions) == len(memo)
    for cls, v, m in exclusions:
        for cls2, v2, m2 in exclusions:
            if (cls, v, m) != (cls2, v2, m2) and cls == cls2:
                assert not (v >= v2 and m >= m2)
    assert len(memo.exclusions(2)) == min(2, len(memo))
    memo.clear()
    assert not any(memo.known_not_to_fit(p) for p in probes + recorded)
