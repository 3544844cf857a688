"""Property tests of the placement engine on random fleets, against a real database.

For any fleet, request and fleet policy: each filter's SQL form agrees with its Python form host by
host; a placement satisfies every filter and leaves no host over any capacity; a TDX VM lands only on
a ``ready`` host, gets no more vCPUs than the host's present CPUs and takes a KeyID only while
total - max(claimed, observed in use) > 0, a build slot only while fewer than the policy's limit are
building, and memory with the per-TD overhead within what the host's PAMT leaves; when the engine
finds nothing, a brute-force search over every host agrees; and the reason counts add up to the
hosts considered.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import case, delete, literal, select
from sqlalchemy.orm import Session

from service.clock import as_utc, utcnow
from service.db import Database, make_engine
from service.migrate import migrate
from service.models import Host, HostLabel, Vm
from service.policy.versions import version_key
from service.scheduler.engine import _HOST_COLUMNS, SchedulerConfig, _rank_rows, place, rank, row_scorer
from service.scheduler.explain import count_reasons
from service.scheduler.filters import all_rejections, first_rejection
from service.scheduler.types import Context, HostView, Policy, VmRequest, memory_charge
from service.scheduler.weighers import default_weighers, score

STATES = ["unknown", "unsupported", "disabled", "failed", "ready"]
NOW = utcnow().replace(microsecond=0)
CTX = Context(alive_after=NOW - timedelta(seconds=40))
VERSIONS = [None, "1.5", "1.5.06", "1.5.10", "1.5.10.0", "1.10.0", "2.0.01", "not-a-version"]


@st.composite
def contexts(draw: st.DrawFn) -> Context:
    floor = draw(st.sampled_from([None, "1.5.06", "1.5.10", "1.9"]))
    return Context(
        alive_after=CTX.alive_after,
        policy=Policy(
            min_module_version=floor,
            min_module_key=version_key(floor),
            max_td_builds_per_host=draw(st.integers(1, 4)),
            td_memory_overhead_mib=draw(st.sampled_from([0, 1, 256])),
        ),
    )


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    path: Path = tmp_path_factory.mktemp("props") / "props.db"
    engine = make_engine(f"sqlite:///{path}", sqlite_synchronous="OFF")  # type: ignore[arg-type]
    migrate(engine)
    database = Database(engine)
    yield database
    database.dispose()


@st.composite
def host_specs(draw: st.DrawFn, index: int) -> HostView:
    state = draw(st.sampled_from(STATES))
    vm_capable = state not in ("unknown",) and (state != "failed" or draw(st.booleans()))
    vcpus = draw(st.integers(1, 64))
    reserved_vcpus = draw(st.integers(0, vcpus))
    ratio = draw(st.sampled_from([1.0, 1.5, 4.0]))
    limit = (vcpus - reserved_vcpus) * ratio
    memory = draw(st.integers(1, 65536))
    reserved_memory = draw(st.integers(0, memory))
    pamt = draw(st.sampled_from([0, 0, memory // 256, memory // 4]))
    version = draw(st.sampled_from(VERSIONS))
    keyids_total = draw(st.integers(1 if state == "ready" else 0, 8))
    used_keyids = draw(st.integers(0, keyids_total))
    return HostView(
        id=uuid.UUID(int=index + 1),
        name=f"h{index:02d}",
        tdx_state=state,
        vm_capable=vm_capable,
        last_heartbeat_at=draw(st.sampled_from([None, NOW - timedelta(seconds=41), NOW - timedelta(seconds=5)])),
        schedulable=draw(st.booleans()),
        draining=draw(st.booleans()),
        vcpus=vcpus,
        reserved_vcpus=reserved_vcpus,
        cpu_allocation_ratio=ratio,
        used_vcpus=draw(st.integers(0, int(limit))),
        memory_mib=memory,
        reserved_memory_mib=reserved_memory,
        used_memory_mib=draw(st.integers(0, max(memory - reserved_memory - pamt, 0))),
        keyids_total=keyids_total,
        used_keyids=used_keyids,
        generation=1,
        # Present CPUs at or above the online ones, or not reported.
        present_cpus=draw(st.one_of(st.none(), st.integers(vcpus, vcpus + 8))),
        # The agent may see more KeyIDs in use than placed (TDs started elsewhere, leaks), or fewer.
        keyids_observed_in_use=draw(st.one_of(st.none(), st.integers(0, keyids_total + 2))),
        tdx_module_key=version_key(version),
        attestation_ready=draw(st.sampled_from([None, False, True])),
        vmm_tdx=draw(st.sampled_from([None, "supported", "unsupported", "unknown"])),
        pamt_mib=pamt,
        tds_building=draw(st.integers(0, 5)),
        labels=draw(st.dictionaries(st.sampled_from(["zone", "rack"]), st.sampled_from(["a", "b"]), max_size=2)),
        groups=frozenset(draw(st.sets(st.sampled_from(["g1", "g2"]), max_size=2))),
    )


@st.composite
def fleets(draw: st.DrawFn) -> list[HostView]:
    n = draw(st.integers(0, 10))
    return [draw(host_specs(i)) for i in range(n)]


requests = st.builds(
    VmRequest,
    vcpus=st.integers(1, 80),
    memory_mib=st.integers(1, 32768),
    tdx=st.booleans(),
    selector=st.dictionaries(st.sampled_from(["zone", "rack"]), st.sampled_from(["a", "b"]), max_size=2).map(
        lambda d: tuple(sorted(d.items()))
    ),
    anti_affinity_group=st.sampled_from([None, "g1", "g2"]),
    attestation=st.booleans(),
)


def _store(session: Session, fleet: list[HostView]) -> None:
    session.execute(delete(Vm))
    session.execute(delete(HostLabel))
    session.execute(delete(Host))
    for h in fleet:
        session.add(
            Host(
                id=h.id, name=h.name, labels=h.labels, vcpus=h.vcpus, memory_mib=h.memory_mib,
                reserved_vcpus=h.reserved_vcpus, reserved_memory_mib=h.reserved_memory_mib,
                cpu_allocation_ratio=h.cpu_allocation_ratio, schedulable=h.schedulable, draining=h.draining,
                last_heartbeat_at=h.last_heartbeat_at, tdx_state=h.tdx_state, vm_capable=h.vm_capable,
                keyids_total=h.keyids_total, used_vcpus=h.used_vcpus, used_memory_mib=h.used_memory_mib,
                used_keyids=h.used_keyids, vm_count=len(h.groups), free_memory_mib=h.free_memory_mib,
                generation=h.generation, created_at=NOW, updated_at=NOW, present_cpus=h.present_cpus,
                keyids_observed_in_use=h.keyids_observed_in_use, tdx_module_key=h.tdx_module_key,
                attestation_ready=h.attestation_ready, vmm_tdx=h.vmm_tdx, pamt_mib=h.pamt_mib,
                tds_building=h.tds_building,
            )
        )
        session.flush()
        session.add_all(HostLabel(host_id=h.id, key=k, value=v) for k, v in h.labels.items())
        for group in h.groups:
            session.add(
                Vm(
                    name="member", project="p", vcpus=1, memory_mib=1, tdx=False, selector={},
                    anti_affinity_group=group, priority=0, status="running", host_id=h.id, host_name=h.name,
                    reasons={}, deadline=NOW, generation=1, created_at=NOW, updated_at=NOW,
                )
            )
    session.flush()


def _sql_reasons(session: Session, req: VmRequest, ctx: Context) -> dict[str, str]:
    rejections = all_rejections(req, ctx)
    reason = case(*[(cond, literal(code)) for code, cond in rejections], else_=literal("fits"))
    return {name: code for name, code in session.execute(select(Host.name, reason))}


def _after(session: Session, host_id: uuid.UUID) -> Host:
    host = session.get(Host, host_id, populate_existing=True)
    assert host is not None
    return host


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(fleet=fleets(), req=requests, ctx=contexts())
def test_sql_and_python_filters_agree_host_by_host(
    db: Database, fleet: list[HostView], req: VmRequest, ctx: Context
) -> None:
    with db.session() as s:
        _store(s, fleet)
        sql = _sql_reasons(s, req, ctx)
        s.rollback()
    python = {h.name: first_rejection(h, req, ctx) or "fits" for h in fleet}
    assert sql == python


@SETTINGS
@given(
    fleet=fleets(), req=requests, policy=st.sampled_from(["spread", "pack"]), seed=st.integers(0, 2**16),
    ctx=contexts(),
)
def test_placement_respects_every_filter_and_capacity(
    db: Database, fleet: list[HostView], req: VmRequest, policy: str, seed: int, ctx: Context
) -> None:
    cfg = SchedulerConfig(policy=policy, weighers=default_weighers(policy, 10.0), candidate_limit=3)
    brute_force = [h for h in fleet if first_rejection(h, req, ctx) is None]
    with db.session() as s:
        _store(s, fleet)
        rc = count_reasons(s, req, ctx)
        placement = place(s, req, ctx, cfg, random.Random(seed))
        if placement.host is None:
            assert brute_force == [], "the engine found nothing but a host fits"
        else:
            chosen = next(h for h in fleet if h.id == placement.host.id)
            assert first_rejection(chosen, req, ctx) is None
            if req.tdx:
                assert chosen.tdx_state == "ready"
                assert req.vcpus <= (chosen.present_cpus or chosen.vcpus)
                assert max(chosen.used_keyids, chosen.keyids_observed_in_use or 0) < chosen.keyids_total
                assert chosen.tds_building < ctx.policy.max_td_builds_per_host
                if ctx.policy.min_module_key is not None:
                    assert chosen.tdx_module_key is not None and chosen.tdx_module_key >= ctx.policy.min_module_key
                assert chosen.vmm_tdx != "unsupported"
            if req.attestation:
                assert chosen.attestation_ready is True
            after = _after(s, chosen.id)
            assert after.used_vcpus <= (after.vcpus - after.reserved_vcpus) * after.cpu_allocation_ratio
            assert after.used_memory_mib + after.reserved_memory_mib + after.pamt_mib <= after.memory_mib
            assert after.used_memory_mib == chosen.used_memory_mib + memory_charge(req, ctx.policy)
            assert after.tds_building == chosen.tds_building + (1 if req.tdx else 0)
            assert after.free_memory_mib == (
                after.memory_mib - after.reserved_memory_mib - after.pamt_mib - after.used_memory_mib
            )
            assert after.used_keyids <= after.keyids_total
            assert after.used_keyids == chosen.used_keyids + req.keyids
            assert after.generation == chosen.generation + 1
        s.rollback()
    assert rc.considered == len(fleet)
    assert rc.fits == len(brute_force)
    expected = Counter(first_rejection(h, req, ctx) for h in fleet if first_rejection(h, req, ctx))
    assert rc.counts == dict(expected)


@SETTINGS
@given(fleet=fleets(), req=requests, ctx=contexts())
def test_a_claim_against_a_moved_generation_changes_nothing(
    db: Database, fleet: list[HostView], req: VmRequest, ctx: Context
) -> None:
    from dataclasses import replace

    from service.scheduler.claims import try_claim

    with db.session() as s:
        _store(s, fleet)
        for h in fleet:
            assert not try_claim(s, replace(h, generation=h.generation + 1), req, ctx)
            host = _after(s, h.id)
            assert (host.used_vcpus, host.used_memory_mib, host.used_keyids) == (
                h.used_vcpus, h.used_memory_mib, h.used_keyids
            )
        s.rollback()


@SETTINGS
@given(fleet=fleets(), req=requests, ctx=contexts())
def test_the_claim_enforces_the_capacity_filters_limits(
    db: Database, fleet: list[HostView], req: VmRequest, ctx: Context
) -> None:
    # The claim is the last word under races: it must hold every capacity limit the filters hold
    # (TD vCPUs within present CPUs, KeyIDs free after max(claimed, observed), vCPUs, memory with
    # the per-TD overhead after the PAMT, TD build slots).
    from service.scheduler.claims import try_claim
    from service.scheduler.filters import KeyIdFilter, MemoryFilter, TdBuildBurstFilter, TdVcpuFilter, VcpuFilter

    limits = (TdVcpuFilter(), KeyIdFilter(), VcpuFilter(), MemoryFilter(), TdBuildBurstFilter())
    with db.session() as s:
        _store(s, fleet)
        for h in fleet:
            fits = all(f.check(h, req, ctx) is None for f in limits)
            assert try_claim(s, h, req, ctx) is fits, h
        s.rollback()


@given(fleet=fleets(), req=requests)
@settings(max_examples=300, deadline=None)
def test_weighers_stay_within_zero_and_one(fleet: list[HostView], req: VmRequest) -> None:
    for weighted in default_weighers("spread", 1.0):
        for h in fleet:
            assert 0.0 <= weighted.weigher.weigh(h, req) <= 1.0


def test_fixture_times_are_timezone_aware() -> None:
    assert as_utc(datetime(2026, 1, 1)).tzinfo is not None


@SETTINGS
@given(fleet=fleets(), req=requests, ctx=contexts())
def test_a_selector_is_the_requests_scope(db: Database, fleet: list[HostView], req: VmRequest, ctx: Context) -> None:
    """Every host the selector excludes counts as selector_mismatch, whatever else is wrong with it;
    the other reasons count only hosts the selector admits (API.md: a request's selector is its scope)."""
    outside = [h for h in fleet if any(h.labels.get(k) != v for k, v in req.selector)]
    with db.session() as s:
        _store(s, fleet)
        rc = count_reasons(s, req, ctx)
        s.rollback()
    assert rc.counts.get("selector_mismatch", 0) == len(outside)
    inside = [h for h in fleet if h not in outside]
    assert sum(n for code, n in rc.counts.items() if code != "selector_mismatch") + rc.fits == len(inside)
    assert all(first_rejection(h, req, ctx) == "selector_mismatch" for h in outside)


@SETTINGS
@given(
    fleet=fleets(), req=requests, policy=st.sampled_from(["spread", "pack"]),
    affinity=st.sampled_from([0.0, 2.0, 10.0]), seed=st.integers(0, 2**16),
)
def test_row_ranking_agrees_with_host_view_ranking(
    fleet: list[HostView], req: VmRequest, policy: str, affinity: float, seed: int
) -> None:
    """The placement ranks the shortlist's raw rows (engine.row_scorer); the preview ranks HostViews
    with the weighers. Same scores to the last bit, same order with the same random draws."""
    cfg = SchedulerConfig(policy=policy, weighers=default_weighers(policy, affinity))
    rows = [tuple(getattr(h, c.key) for c in _HOST_COLUMNS) for h in fleet]
    scorer = row_scorer(cfg.weighers, req)
    assert scorer is not None
    for h, row in zip(fleet, rows, strict=True):
        assert scorer(row) == score(h, req, cfg.weighers)
    by_rows = [(r[1], sc) for sc, r in _rank_rows(rows, req, cfg, random.Random(seed))]
    by_views = [(c.host.name, c.score) for c in rank(fleet, req, cfg, random.Random(seed))]
    assert by_rows == by_views
