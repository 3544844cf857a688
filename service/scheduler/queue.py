"""The pending queue: pending VMs are retried as soon as capacity may have changed
(``capacity_signal``) and on a slow tick; past its deadline a VM fails with its last explanation.

Fair across projects: a pass interleaves the projects that have pending VMs, one attempt each per
round (round robin, the first project rotating from pass to pass), so no number of one project's
pending VMs delays another project's VM; ``priority`` orders VMs only within their project.

Bounded per wake-up: each project's VMs are walked by priority, then age, in small pages; a VM
whose shape is known not to fit (service/scheduler/shape_memo.py) is skipped without a placement
query, and the most useful memo entries are pushed into the page query so that the database skips
them. The memo and the walk's position hold until capacity may have grown, so a wake-up with
nothing new costs one small query per project; a capacity change restarts every walk from the top.

Safe with several replicas: each VM is retried in its own short transaction that first locks the
VM row with ``FOR UPDATE SKIP LOCKED`` (PostgreSQL), so two replicas never work on the same VM;
placement itself is the same atomic claim as for a new VM.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Integer, Select, String, Uuid, and_, bindparam, func, not_, select, tuple_
from sqlalchemy.orm import Session

from service.clock import as_utc, utcnow
from service.db import Database
from service.hosts.service import report_stale_hosts
from service.metrics import Metrics
from service.models import UTCDateTime, Vm
from service.policy import service as fleet_policy
from service.scheduler.shape_memo import Shape, ShapeMemo
from service.signals import Signal
from service.vms.lifecycle import Action, VmStatus
from service.vms.service import (
    CLAIM_CONFLICTS,
    PlacementSettings,
    apply_action,
    emit_unschedulable,
    emit_vm_event,
    purge_idempotency_keys,
    try_place,
)

log = logging.getLogger("tdx.queue")

PAGE = 32  # VMs read per project and query
ATTEMPTS_PER_PASS = 400  # placement attempts before a pass yields to the next (which goes on at once)
EXPIRED_PER_PASS = 200  # VMs failed for their deadline per pass
MEMO_SQL_TERMS = 32  # memo entries pushed into the page query
# Even without any capacity notification the memo and the walks start over this often.
MEMO_TTL_S = 60.0
# A pending VM's explanation is refreshed at most this often when a retry fails again.
REEXPLAIN_AFTER = timedelta(seconds=30)

PENDING = VmStatus.PENDING.value


@dataclass(frozen=True, slots=True)
class Candidate:
    id: uuid.UUID
    project: str
    shape: Shape
    priority: int
    created_at: datetime


@dataclass
class ProjectWalk:
    """Where the queue is in one project's pending VMs, in queue order (highest priority first,
    oldest first within one). The position is kept between passes until capacity may have grown,
    so a pass goes on with what is new instead of reading again what did not fit."""

    project: str
    after: tuple[int, datetime, uuid.UUID] | None = None  # (queue_rank, created_at, id) of the last read
    exhausted: bool = False  # nothing more to read in this pass
    page: list[Candidate] = field(default_factory=list)


@dataclass
class PassStats:
    attempts: int = 0
    skipped: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    more: bool = False  # a budget ran out or a retry is due: run the next pass at once

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


# ---- queries (each runs in its own short transaction) ----------------------------------------


def pending_projects(session: Session) -> list[str]:
    """The projects with pending VMs, by name: a loose index scan (one index probe per project,
    however many VMs each has pending), written as a recursive query both databases run."""
    first = select(func.min(Vm.project).label("project")).where(Vm.status == PENDING)
    walk = first.cte("pending_projects", recursive=True)
    step = select(
        select(func.min(Vm.project))
        .where(Vm.status == PENDING, Vm.project > walk.c.project)
        .scalar_subquery()
    ).where(walk.c.project.is_not(None))
    walk = walk.union_all(step)
    return [p for p in session.scalars(select(walk.c.project).where(walk.c.project.is_not(None))) if p]


_PAGE_COLUMNS = (
    Vm.id, Vm.project, Vm.priority, Vm.queue_rank, Vm.created_at, Vm.placement_class, Vm.vcpus, Vm.memory_mib,
)
# Page statements are built once per (memo terms, resuming), with the values as bound parameters:
# building the expression costs far more than running it.
_page_statements: dict[tuple[int, bool], Select[Any]] = {}


def _page_statement(terms: int, resume: bool) -> Select[Any]:
    key = (terms, resume)
    stmt = _page_statements.get(key)
    if stmt is None:
        stmt = select(*_PAGE_COLUMNS).where(Vm.status == PENDING, Vm.project == bindparam("project"))
        if resume:
            after = tuple_(
                bindparam("rank", type_=Integer), bindparam("created_at", type_=UTCDateTime),
                bindparam("vm_id", type_=Uuid),
            )
            stmt = stmt.where(tuple_(Vm.queue_rank, Vm.created_at, Vm.id) > after)
        for i in range(terms):
            stmt = stmt.where(
                not_(
                    and_(
                        Vm.placement_class == bindparam(f"class_{i}", type_=String),
                        Vm.vcpus >= bindparam(f"vcpus_{i}", type_=Integer),
                        Vm.memory_mib >= bindparam(f"memory_{i}", type_=BigInteger),
                    )
                )
            )
        stmt = stmt.order_by(Vm.queue_rank, Vm.created_at, Vm.id).limit(PAGE)
        _page_statements[key] = stmt
    return stmt


_LAST_PENDING = (
    select(Vm.queue_rank, Vm.created_at, Vm.id)
    .where(Vm.status == PENDING, Vm.project == bindparam("project"))
    .order_by(Vm.queue_rank.desc(), Vm.created_at.desc(), Vm.id.desc())
    .limit(1)
)


def _candidate(row: Any) -> Candidate:
    vm_id, project, priority, _rank, created_at, cls, vcpus, memory_mib = row
    # A VM without a class (written by something that did not set one) is a class of its own:
    # the memo then never skips it for another VM's failure.
    return Candidate(vm_id, project, Shape(cls or f"vm:{vm_id}", vcpus, memory_mib), priority, created_at)


def next_page(session: Session, walk: ProjectWalk, exclusions: list[tuple[str, int, int]]) -> None:
    """Fill ``walk.page`` with the next pending VMs of its project in queue order, leaving out
    those the memo excludes, or mark the walk exhausted (its position stays on the last VM read)."""
    params: dict[str, Any] = {"project": walk.project}
    if walk.after is not None:
        params["rank"], params["created_at"], params["vm_id"] = walk.after
    for i, (cls, vcpus, memory_mib) in enumerate(exclusions):
        params.update({f"class_{i}": cls, f"vcpus_{i}": vcpus, f"memory_{i}": memory_mib})
    stmt = _page_statement(len(exclusions), walk.after is not None)
    conn = session.connection()
    rows = conn.execute(stmt, params).all()
    walk.page = [_candidate(row) for row in rows]
    if len(rows) == PAGE:
        walk.after = (rows[-1].queue_rank, rows[-1].created_at, rows[-1].id)
        return
    # The scan reached the project's last pending VM (what it left out, the memo excludes): go on
    # from there next time, so that a pass with nothing new reads nothing.
    last = conn.execute(_LAST_PENDING, {"project": walk.project}).first()
    if last is not None and (walk.after is None or tuple(last) > walk.after):
        walk.after = (last.queue_rank, last.created_at, last.id)
    walk.exhausted = not rows


def expired_ids(session: Session, now: datetime) -> list[uuid.UUID]:
    return list(
        session.scalars(
            select(Vm.id)
            .where(Vm.status == PENDING, Vm.deadline <= now)
            .order_by(Vm.deadline)
            .limit(EXPIRED_PER_PASS)
        ).all()
    )


def _locked_pending(session: Session, vm_id: uuid.UUID) -> Vm | None:
    return session.scalars(
        select(Vm).where(Vm.id == vm_id, Vm.status == PENDING).with_for_update(skip_locked=True)
    ).first()


def fail_expired(session: Session, vm_id: uuid.UUID) -> bool:
    vm = _locked_pending(session, vm_id)
    if vm is None or as_utc(vm.deadline) > utcnow():
        return False
    apply_action(session, vm, Action.DEADLINE, f"no host within the deadline: {vm.explanation}")
    return True


def retry(session: Session, vm_id: uuid.UUID, ps: PlacementSettings, rng: random.Random) -> tuple[str, int]:
    """Retry one pending VM: ``scheduled``, ``pending`` (nothing fits its shape), ``contended``
    (it fit, but the claims were lost to concurrent placements), ``failed`` (deadline) or
    ``gone``; and the claims it lost."""
    vm = _locked_pending(session, vm_id)
    if vm is None:
        return "gone", 0
    now = utcnow()
    if as_utc(vm.deadline) <= now:
        apply_action(session, vm, Action.DEADLINE, f"no host within the deadline: {vm.explanation}")
        return "failed", 0
    policy = fleet_policy.current(session, ps.policy_defaults)
    # Re-explained at most every REEXPLAIN_AFTER, and at once under a policy newer than its explanation.
    explained_at = as_utc(vm.explained_at or vm.updated_at)
    explain = now - explained_at >= REEXPLAIN_AFTER or (
        policy.updated_at is not None and explained_at < policy.updated_at
    )
    generation = vm.generation
    placed = try_place(session, vm, ps, rng, now, explain=explain, policy=policy.scheduler)
    conflicts: int = session.info.get(CLAIM_CONFLICTS, 0)
    if placed:
        emit_vm_event(session, "vm.scheduled", vm)
        return "scheduled", conflicts
    if vm.generation != generation:  # explained anew: watchers learn why it still waits
        emit_unschedulable(session, vm)
    return ("contended" if conflicts else "pending"), conflicts


# ---- the queue -----------------------------------------------------------------------------


class PendingQueue:
    """One replica's pending queue: its memo, its walks and its fairness rotation."""

    def __init__(
        self, db: Database, ps: PlacementSettings, rng: random.Random, metrics: Metrics, signal: Signal
    ) -> None:
        self.db = db
        self.ps = ps
        self.rng = rng
        self.metrics = metrics
        self.signal = signal
        self.memo = ShapeMemo()
        self._walks: dict[str, ProjectWalk] = {}
        self._seen_version: int | None = None
        self._memo_since = 0.0
        self._rotation = 0
        self._retry_soon: list[Candidate] = []

    def _start_over_if_capacity_changed(self) -> int:
        version = self.signal.version
        stale = time.monotonic() - self._memo_since >= MEMO_TTL_S
        if version != self._seen_version or stale:
            self.memo.clear()
            self._walks.clear()
            self._retry_soon.clear()
            self._seen_version = version
            self._memo_since = time.monotonic()
        return version

    def _fair_order(self, projects: list[str]) -> list[str]:
        if not projects:
            return []
        start = self._rotation % len(projects)
        self._rotation += 1
        return projects[start:] + projects[:start]

    async def _next(self, walk: ProjectWalk, stats: PassStats) -> Candidate | None:
        while True:
            if not walk.page:
                if walk.exhausted:
                    return None
                exclusions = self.memo.exclusions(MEMO_SQL_TERMS)
                await self.db.run(functools.partial(next_page, walk=walk, exclusions=exclusions), write=False)
                continue
            cand = walk.page.pop(0)
            if self.memo.known_not_to_fit(cand.shape):
                stats.skipped += 1
                continue
            return cand

    async def _attempt(self, cand: Candidate, stats: PassStats) -> None:
        outcome, conflicts = await self.db.run(
            functools.partial(retry, vm_id=cand.id, ps=self.ps, rng=self.rng)
        )
        stats.attempts += 1
        stats.count(outcome)
        if conflicts:
            self.metrics.claim_conflicts.inc(conflicts)
        if outcome in ("scheduled", "failed"):
            self.metrics.placements.labels(result=outcome).inc()
        if outcome == "pending":
            self.memo.record_no_fit(cand.shape)
        elif outcome == "contended":
            self._retry_soon.append(cand)
            stats.more = True

    async def _fail_expired(self, stats: PassStats) -> None:
        ids = await self.db.run(functools.partial(expired_ids, now=utcnow()), write=False)
        for vm_id in ids:
            if await self.db.run(functools.partial(fail_expired, vm_id=vm_id)):
                stats.count("failed")
                self.metrics.placements.labels(result="failed").inc()
        if len(ids) == EXPIRED_PER_PASS:
            stats.more = True

    async def run_pass(self) -> PassStats:
        started = time.perf_counter()
        stats = PassStats()
        version = self._start_over_if_capacity_changed()
        await self._fail_expired(stats)
        retry_now, self._retry_soon = self._retry_soon, []
        for cand in retry_now:
            await self._attempt(cand, stats)
        projects = await self.db.run(pending_projects, write=False)
        self._walks = {p: self._walks.get(p) or ProjectWalk(p) for p in projects}
        walks = [self._walks[p] for p in self._fair_order(projects)]
        for walk in walks:
            walk.exhausted = False
        active = walks
        while active:
            still = []
            for walk in active:
                found = await self._next(walk, stats)
                if found is None:
                    continue
                await self._attempt(found, stats)
                still.append(walk)
            active = still
            if self.signal.version != version:
                break  # capacity may have grown: the next pass starts every walk over
            if stats.attempts >= ATTEMPTS_PER_PASS:
                stats.more = True
                break
        self.metrics.queue_passes.inc()
        self.metrics.queue_attempts.inc(stats.attempts)
        self.metrics.queue_skipped.inc(stats.skipped)
        self.metrics.queue_pass_seconds.observe(time.perf_counter() - started)
        return stats


async def housekeeping(db: Database, ps: PlacementSettings) -> None:
    await db.run(functools.partial(report_stale_hosts, timeout_s=ps.heartbeat_timeout_s))
    await db.run(functools.partial(purge_idempotency_keys, ttl_s=ps.idempotency_ttl_s))


async def run_forever(
    db: Database, ps: PlacementSettings, signal: Signal, tick_s: float, rng: random.Random, metrics: Metrics
) -> None:
    loop = asyncio.get_running_loop()
    queue = PendingQueue(db, ps, rng, metrics, signal)
    last_housekeeping = -tick_s
    while True:
        seen = signal.version
        more = False
        try:
            more = (await queue.run_pass()).more
            if loop.time() - last_housekeeping >= tick_s:
                last_housekeeping = loop.time()
                await housekeeping(db, ps)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("pending-queue pass failed; retrying on the next tick")
        if more:
            await asyncio.sleep(0)  # let requests in between passes
        else:
            await signal.wait(seen, tick_s)

