"""Placement: a short list of candidates from SQL, weighed in Python, claimed atomically.

The candidate query walks the ``(tdx_state, free_memory_mib)`` index from the policy's end
(most free memory first to spread, least first to pack) with every filter's SQL form in the WHERE
clause, and stops after ``candidate_limit`` rows: the cost of a placement does not grow with the
fleet. Only when nothing fits does the scheduler count, over all hosts, why.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Integer, Select, String, and_, bindparam, not_, select, union_all
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Executable

from service.clock import as_utc
from service.hosts.readiness import TdxState
from service.models import Host, UTCDateTime
from service.prepared import Prepared, connection
from service.scheduler.claims import try_claim
from service.scheduler.filters import all_rejections
from service.scheduler.types import Context, HostView, Policy, VmRequest
from service.scheduler.weighers import (
    FreeMemoryWeigher,
    FreeVcpuWeigher,
    TdxAffinityWeigher,
    Weighted,
    score,
)

# States whose hosts may run a VM of each kind (failed hosts only while kvm_intel is loaded).
TDX_STATES = (TdxState.READY.value,)
PLAIN_STATES = (
    TdxState.DISABLED.value,
    TdxState.UNSUPPORTED.value,
    TdxState.FAILED.value,
    TdxState.READY.value,
)

_HOST_COLUMNS = (
    Host.id,
    Host.name,
    Host.tdx_state,
    Host.vm_capable,
    Host.last_heartbeat_at,
    Host.schedulable,
    Host.draining,
    Host.vcpus,
    Host.reserved_vcpus,
    Host.cpu_allocation_ratio,
    Host.used_vcpus,
    Host.memory_mib,
    Host.reserved_memory_mib,
    Host.used_memory_mib,
    Host.keyids_total,
    Host.used_keyids,
    Host.generation,
    Host.present_cpus,
    Host.keyids_observed_in_use,
    Host.tdx_module_key,
    Host.attestation_ready,
    Host.vmm_tdx,
    Host.pamt_mib,
    Host.tds_building,
)


_COL = {c.key: i for i, c in enumerate(_HOST_COLUMNS)}
_READY = TdxState.READY.value


def row_scorer(weighers: tuple[Weighted, ...], req: VmRequest) -> Callable[[Sequence[Any]], float] | None:
    """``weighers.score`` on a shortlist row (before any column is converted), for the built-in
    weighers (None for any other): the same arithmetic in the same order, so the same floats
    (a property test holds the two equal)."""
    terms: list[tuple[str, float]] = []
    for w in weighers:
        kind = type(w.weigher)
        if kind is FreeMemoryWeigher:
            terms.append(("memory", w.multiplier))
        elif kind is FreeVcpuWeigher:
            terms.append(("vcpus", w.multiplier))
        elif kind is TdxAffinityWeigher:
            terms.append(("tdx", w.multiplier))
        else:
            return None
    mem, res_mem, used_mem, pamt, cpus, res_cpus, ratio, used_cpus = (
        _COL[k]
        for k in (
            "memory_mib", "reserved_memory_mib", "used_memory_mib", "pamt_mib",
            "vcpus", "reserved_vcpus", "cpu_allocation_ratio", "used_vcpus",
        )
    )
    state = _COL["tdx_state"]
    need_mem, need_cpus, tdx = req.memory_mib, req.vcpus, req.tdx

    def scorer(r: Sequence[Any]) -> float:
        total: float = 0
        for term, multiplier in terms:
            if term == "memory":
                usable = r[mem] - r[res_mem]
                free = usable - r[pamt] - r[used_mem]
                value = 0.0 if usable <= 0 else max(0.0, min(1.0, (free - need_mem) / usable))
            elif term == "vcpus":
                limit = (r[cpus] - r[res_cpus]) * r[ratio]
                value = 0.0 if limit <= 0 else max(0.0, min(1.0, ((limit - r[used_cpus]) - need_cpus) / limit))
            else:
                value = 1.0 if tdx else (0.0 if r[state] == _READY else 1.0)
            total += multiplier * value
        return total

    return scorer


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    policy: str
    weighers: tuple[Weighted, ...]
    candidate_limit: int = 16
    # Random noise added to scores so that concurrent replicas rarely pick the same host.
    jitter: float = 0.05
    rounds: int = 3


@dataclass(frozen=True, slots=True)
class Candidate:
    host: HostView
    score: float


@dataclass(frozen=True, slots=True)
class Placement:
    host: HostView | None
    conflicts: int
    candidates: tuple[Candidate, ...]


def _bucket(state: str, req: VmRequest, ctx: Context, cfg: SchedulerConfig) -> Select[tuple[object, ...]]:
    passes = [not_(cond) for _, cond in all_rejections(req, ctx)]
    order = Host.free_memory_mib.desc() if cfg.policy == "spread" else Host.free_memory_mib.asc()
    return (
        select(*_HOST_COLUMNS)
        .where(and_(Host.tdx_state == state, *passes))
        .order_by(order)
        .limit(cfg.candidate_limit)
    )


def _build_shortlist(req: VmRequest, ctx: Context, cfg: SchedulerConfig) -> Executable:
    states = TDX_STATES if req.tdx else PLAIN_STATES
    if len(states) == 1:
        return _bucket(states[0], req, ctx, cfg)
    return union_all(*[select(_bucket(s, req, ctx, cfg).subquery()) for s in states])


# Shortlist statements are built once per request shape, with the request's values as bound
# parameters: building the expression tree and its cache key cost far more than running it.
_ShapeKey = tuple[bool, str, int, int, bool, bool, bool]
_shortlists: dict[_ShapeKey, Prepared] = {}


def _template_ctx(floor: bool) -> Context:
    policy = Policy(
        min_module_key=bindparam("min_module_key", type_=String) if floor else None,  # type: ignore[arg-type]
        max_td_builds_per_host=bindparam("max_td_builds", type_=Integer),  # type: ignore[arg-type]
        td_memory_overhead_mib=bindparam("td_overhead", type_=BigInteger),  # type: ignore[arg-type]
    )
    return Context(alive_after=bindparam("alive_after", type_=UTCDateTime), policy=policy)  # type: ignore[arg-type]


def _shape(req: VmRequest, ctx: Context, cfg: SchedulerConfig) -> _ShapeKey:
    return (
        req.tdx, cfg.policy, cfg.candidate_limit, len(req.selector), req.anti_affinity_group is not None,
        req.attestation, ctx.policy.min_module_key is not None,
    )


def _shortlist_params(req: VmRequest, ctx: Context) -> dict[str, object]:
    params: dict[str, object] = {"vcpus": req.vcpus, "memory_mib": req.memory_mib, "alive_after": ctx.alive_after}
    if req.tdx:
        params["max_td_builds"] = ctx.policy.max_td_builds_per_host
        params["td_overhead"] = ctx.policy.td_memory_overhead_mib
        if ctx.policy.min_module_key is not None:
            params["min_module_key"] = ctx.policy.min_module_key
    if req.anti_affinity_group is not None:
        params["group"] = req.anti_affinity_group
    for i, (key, value) in enumerate(req.selector):
        params[f"label_key_{i}"] = key
        params[f"label_value_{i}"] = value
    return params


TemplateKey = tuple[bool, int, bool, bool, bool]


def template_key(req: VmRequest, ctx: Context) -> TemplateKey:
    """What a request's statements depend on besides its values (see :func:`template`)."""
    return (
        req.tdx, len(req.selector), req.anti_affinity_group is not None, req.attestation,
        ctx.policy.min_module_key is not None,
    )


def template(req: VmRequest, ctx: Context) -> tuple[VmRequest, Context]:
    """The request and context of ``req``'s shape with bound parameters for their values (bound by
    :func:`template_params`): filters build their SQL from it once per shape."""
    req_t = VmRequest(
        vcpus=bindparam("vcpus", type_=Integer),  # type: ignore[arg-type]
        memory_mib=bindparam("memory_mib", type_=BigInteger),  # type: ignore[arg-type]
        tdx=req.tdx,
        selector=tuple(
            (bindparam(f"label_key_{i}", type_=String), bindparam(f"label_value_{i}", type_=String))  # type: ignore[misc]
            for i in range(len(req.selector))
        ),
        anti_affinity_group=None if req.anti_affinity_group is None else bindparam("group", type_=String),  # type: ignore[arg-type]
        attestation=req.attestation,
    )
    return req_t, _template_ctx(ctx.policy.min_module_key is not None)


template_params = _shortlist_params


def _cached_shortlist(req: VmRequest, ctx: Context, cfg: SchedulerConfig) -> Prepared:
    shape = _shape(req, ctx, cfg)
    stmt = _shortlists.get(shape)
    if stmt is None:
        stmt = Prepared(_build_shortlist(*template(req, ctx), cfg))
        _shortlists[shape] = stmt
    return stmt


def _shortlist_rows(session: Session, req: VmRequest, ctx: Context, cfg: SchedulerConfig) -> list[Any]:
    """The shortlist's rows as the driver returns them (no column converted yet)."""
    if session.new or session.dirty or session.deleted:
        session.flush()  # what autoflush would do: the query sees this transaction's pending changes
    return _cached_shortlist(req, ctx, cfg).raw_rows(connection(session), _shortlist_params(req, ctx))


def shortlist(session: Session, req: VmRequest, ctx: Context, cfg: SchedulerConfig) -> list[HostView]:
    convert = _cached_shortlist(req, ctx, cfg).converter(connection(session).dialect)
    return [_view(convert(row)) for row in _shortlist_rows(session, req, ctx, cfg)]


def _view(row: Sequence[Any]) -> HostView:
    seen = row[4]
    if seen is not None and seen.tzinfo is None:
        seen = as_utc(seen)
    return HostView(row[0], row[1], row[2], row[3], seen, *row[5:])


def rank(hosts: list[HostView], req: VmRequest, cfg: SchedulerConfig, rng: random.Random) -> list[Candidate]:
    scored = [Candidate(h, score(h, req, cfg.weighers)) for h in hosts]
    noise = {c.host.id: rng.random() * cfg.jitter for c in scored}
    scored.sort(key=lambda c: (-(c.score + noise[c.host.id]), c.host.name))
    return scored


def _rank_rows(
    rows: list[Any], req: VmRequest, cfg: SchedulerConfig, rng: random.Random, busy: Collection[Any] = ()
) -> list[tuple[float, Any]]:
    """``rank`` on the shortlist's raw rows: the same scores (weighers.row_scorer, held equal to
    ``score`` by a property test), the same noise drawn in the same order, the same order; only the
    rows a claim is tried on are then converted to a HostView. Hosts in ``busy`` (a claim of this
    process in flight on them) go last, in the same order."""
    scorer = row_scorer(cfg.weighers, req)
    if scorer is None:
        raise LookupError("no row scorer for these weighers")
    scored = [(scorer(r), rng.random() * cfg.jitter, r) for r in rows]
    if busy:
        scored.sort(key=lambda t: (t[2][0] in busy, -(t[0] + t[1]), t[2][1]))
    else:
        scored.sort(key=lambda t: (-(t[0] + t[1]), t[2][1]))
    return [(sc, r) for sc, _, r in scored]


class InFlight:
    """Hosts this process has claimed in transactions not yet ended (by the driver's host id).

    On PostgreSQL concurrent placements of one replica run in threads and see the same committed
    rows: with the spread policy they rank the same few most-free hosts first, and all but one
    of those that pick the same host wait for its row lock and then lose the claim (a retry). A
    placement ranks the hosts with a claim of this process in flight last instead: a preference
    only (the conditional claim still decides), so nothing is ever refused for it. On SQLite
    (one writer, each placement sees the claims before it) it only spreads the placements of one
    group commit over more hosts.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hosts: dict[Any, int] = {}

    def snapshot(self) -> frozenset[Any]:
        with self._lock:
            return frozenset(self._hosts)

    def add(self, host: Any) -> None:
        with self._lock:
            self._hosts[host] = self._hosts.get(host, 0) + 1

    def discard(self, hosts: Collection[Any]) -> None:
        with self._lock:
            for host in hosts:
                n = self._hosts.get(host, 0) - 1
                if n > 0:
                    self._hosts[host] = n
                else:
                    self._hosts.pop(host, None)


# session.info keys: the process's InFlight set a placement consults, and the hosts it claimed
# (for the caller to discard once the transaction has ended, committed or not).
IN_FLIGHT = "tdx_in_flight"
CLAIMED = "tdx_claimed_hosts"


def place(
    session: Session, req: VmRequest, ctx: Context, cfg: SchedulerConfig, rng: random.Random
) -> Placement:
    """Claim a host for ``req`` in the caller's transaction, or return ``host=None``."""
    if row_scorer(cfg.weighers, req) is None:
        return _place_views(session, req, ctx, cfg, rng)
    conflicts = 0
    ranked: list[Candidate] = []
    convert = _cached_shortlist(req, ctx, cfg).converter(connection(session).dialect)
    in_flight: InFlight | None = session.info.get(IN_FLIGHT)
    for _ in range(cfg.rounds):
        busy = in_flight.snapshot() if in_flight is not None else frozenset()
        rows = _rank_rows(_shortlist_rows(session, req, ctx, cfg), req, cfg, rng, busy)
        if not rows:
            break
        ranked = []
        for sc, row in rows:
            cand = Candidate(_view(convert(row)), sc)
            ranked.append(cand)
            if try_claim(session, cand.host, req, ctx):
                if in_flight is not None:
                    in_flight.add(row[0])
                    session.info.setdefault(CLAIMED, []).append(row[0])
                return Placement(cand.host, conflicts, tuple(ranked))
            conflicts += 1
    return Placement(None, conflicts, tuple(ranked))


def _place_views(
    session: Session, req: VmRequest, ctx: Context, cfg: SchedulerConfig, rng: random.Random
) -> Placement:
    conflicts = 0
    ranked: list[Candidate] = []
    for _ in range(cfg.rounds):
        ranked = rank(shortlist(session, req, ctx, cfg), req, cfg, rng)
        if not ranked:
            break
        for cand in ranked:
            if try_claim(session, cand.host, req, ctx):
                return Placement(cand.host, conflicts, tuple(ranked))
            conflicts += 1
    return Placement(None, conflicts, tuple(ranked))
