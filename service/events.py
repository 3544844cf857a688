"""The append-only event log, its long-poll and its Server-Sent Events stream.

Ordering: an event id is a promise that every smaller id is already visible, so a reader can
resume from one. SQLite has one writer at a time, so ids follow commit order by themselves. On
PostgreSQL concurrent transactions could commit out of id order; writers therefore insert their
events last, under a transaction-scoped advisory lock held through COMMIT (the lock is released
only after the commit is visible). Only that tail of a write is serialized.

Wake-ups: writers fire ``events_signal`` after commit; on PostgreSQL they also ``pg_notify`` in
the same transaction and every replica's listener thread (one LISTEN connection per replica) fires
its own signal. The signal wakes the process's one ``Broadcaster`` (fanout.py), which reads what is
new once and hands it to every SSE stream and waiting long-poll: watchers never query the log per
commit, only once when they start (or after falling behind) to read what came before.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, StringConstraints
from sqlalchemy import bindparam, func, insert, or_, select, text
from sqlalchemy.orm import Session
from starlette.types import Receive, Scope, Send

from service.auth import Principal, current_principal
from service.clock import as_utc, utcnow
from service.context import AppContext, get_context
from service.db import Database
from service.errors import ProblemError
from service.fanout import Broadcaster, Subscription
from service.metrics import Metrics
from service.models import Event
from service.openapi import problems, roles
from service.prepared import Prepared, connection
from service.schemas import TEXT_PATTERN
from service.signals import Signal

log = logging.getLogger("tdx.events")

# Both are per schema: deployments (or test runs) sharing one PostgreSQL database in different
# schemas neither wait on each other's event writes nor wake each other's listeners.
NOTIFY_CHANNEL = "tdx_events"
EVENT_ORDER_LOCK = 0x7464_7876  # "tdxv": with hashtext(current_schema()), the lock ordering event commits
_PENDING = "tdx_pending_events"
_COMMITTED_KINDS = "tdx_committed_kinds"

# Kinds after which a pending VM may fit where it did not before.
CAPACITY_KINDS = frozenset(
    {
        "host.created",
        "host.load_reported",
        "host.tdx_state_changed",
        "host.alive",
        "host.uncordoned",
        "host.undrained",
        "host.updated",
        "host.rebooted",
        "vm.deleted",
        "vm.lost",
        "vm.failed",
        # A TD turning running frees its build slot (TD build bursts).
        "vm.running",
        # Heartbeat observations that can let a host take VMs it could not (written only on change).
        "host.module_version_changed",
        "host.attestation_changed",
        "host.vmm_changed",
        "host.keyids_freed",
        # Pending VMs are retried and re-explained under the new policy.
        "policy.updated",
    }
)


@dataclass(frozen=True, slots=True)
class NewEvent:
    kind: str
    subject: str
    data: dict[str, Any]
    project: str | None


def emit(
    session: Session, kind: str, subject: str, data: dict[str, Any] | None = None,
    project: str | None = None,
) -> None:
    """Record an event; it is written at commit, with the transaction's other changes."""
    session.info.setdefault(_PENDING, []).append(NewEvent(kind, subject, data or {}, project))


_INSERT_EVENT = Prepared(
    insert(Event).values({c: bindparam(c) for c in ("at", "kind", "subject", "data", "project")})
)
_ORDER_LOCK = text("SELECT pg_advisory_xact_lock(CAST(:k AS integer), hashtext(current_schema()))")
_NOTIFY = text("SELECT pg_notify(:c || '.' || current_schema(), :p)")


def write_pending_events(session: Session) -> None:
    pending: list[NewEvent] = session.info.pop(_PENDING, [])
    if not pending:
        return
    # Everything else this transaction writes goes first, so that nothing but the event insert
    # runs under the ordering lock. The insert is a plain Core statement: the ORM's bulk path
    # costs several times more for the same rows.
    session.flush()
    conn = connection(session)
    postgres = conn.dialect.name == "postgresql"
    if postgres:
        conn.execute(_ORDER_LOCK, {"k": EVENT_ORDER_LOCK})
    now = utcnow()
    _INSERT_EVENT.run_many(
        conn,
        [
            {"at": now, "kind": e.kind, "subject": e.subject, "data": e.data, "project": e.project}
            for e in pending
        ],
    )
    kinds = sorted({e.kind for e in pending})
    session.info[_COMMITTED_KINDS] = kinds
    if postgres:
        conn.execute(_NOTIFY, {"c": NOTIFY_CHANNEL, "p": ",".join(kinds)})


def signal_committed_events(ctx: AppContext, session: Session) -> None:
    kinds: list[str] = session.info.pop(_COMMITTED_KINDS, [])
    if kinds:
        fire_for_kinds(ctx, kinds)


def fire_for_kinds(ctx: AppContext, kinds: Sequence[str]) -> None:
    ctx.events_signal.fire()
    if any(k in CAPACITY_KINDS for k in kinds):
        ctx.capacity_signal.fire()


class PostgresListener:
    """LISTENs on its own connection in a thread; wakes this replica for others' events."""

    def __init__(self, ctx: AppContext, conninfo: str) -> None:
        self.ctx = ctx
        self.conninfo = conninfo
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tdx-pg-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg
        from psycopg import sql

        backoff = 0.2
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True) as conn:
                    schema = conn.execute("SELECT current_schema()").fetchone()
                    channel = f"{NOTIFY_CHANNEL}.{schema[0] if schema else 'public'}"
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    backoff = 0.2
                    # Anything may have happened while we were not listening.
                    fire_for_kinds(self.ctx, sorted(CAPACITY_KINDS))
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            fire_for_kinds(self.ctx, note.payload.split(","))
            except Exception as exc:
                log.warning("event listener lost its connection (%s); reconnecting", exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)


# ---- reading -------------------------------------------------------------------------------


class EventOut(BaseModel):
    id: int
    at: datetime
    kind: str = Field(
        description="host.created, host.updated, host.load_reported, host.tdx_state_changed, host.stale, "
        "host.alive, host.rebooted, host.cordoned, host.uncordoned, host.draining, host.undrained, "
        "host.deleted, vm.created, vm.scheduled, vm.unschedulable, vm.running, vm.deleting, vm.deleted, "
        "vm.failed, vm.lost (and kinds added later: a client ignores kinds it does not know)"
    )
    subject: str
    data: dict[str, Any]


class EventPage(BaseModel):
    items: list[EventOut]
    last_id: int
    head_id: int


@dataclass(frozen=True, slots=True)
class EventFilter:
    kinds: tuple[str, ...] = ()
    subject: str | None = None
    project: str | None = None

    @classmethod
    def parse(cls, kind: list[str] | None, subject: str | None, principal: Principal) -> EventFilter:
        kinds = tuple(k.strip() for raw in kind or [] for k in raw.split(",") if k.strip())
        project = principal.project if principal.role == "client" else None
        return cls(kinds=kinds, subject=subject, project=project)

    def matches(self, item: Published) -> bool:
        """In memory, what ``read_events`` selects in SQL."""
        event = item.event
        if self.project is not None and item.project != self.project:
            return False
        if self.subject is not None and event.subject != self.subject:
            return False
        if not self.kinds:
            return True
        return any(event.kind.startswith(k[:-1]) if k.endswith("*") else event.kind == k for k in self.kinds)


@dataclass(frozen=True, slots=True)
class Published:
    """An event as the broadcaster hands it out: with its project (to filter) and its SSE frame."""

    id: int
    event: EventOut
    project: str | None
    frame: bytes


def read_events(
    session: Session, after: int, flt: EventFilter, limit: int, until: int | None = None
) -> list[EventOut]:
    query = select(Event).where(Event.id > after)
    if until is not None:
        query = query.where(Event.id <= until)
    if flt.kinds:
        exact = [k for k in flt.kinds if not k.endswith("*")]
        prefixes = [k[:-1] for k in flt.kinds if k.endswith("*")]
        query = query.where(
            or_(Event.kind.in_(exact), *[Event.kind.startswith(p, autoescape=True) for p in prefixes])
        )
    if flt.subject is not None:
        query = query.where(Event.subject == flt.subject)
    if flt.project is not None:
        query = query.where(Event.project == flt.project)
    rows = session.scalars(query.order_by(Event.id).limit(limit)).all()
    return [
        EventOut(id=r.id, at=as_utc(r.at), kind=r.kind, subject=r.subject, data=r.data) for r in rows
    ]


def read_published(session: Session, after: int, limit: int) -> list[Published]:
    """Every event after ``after``, oldest first: the broadcaster's one read per wake-up."""
    rows = session.execute(
        select(Event.id, Event.at, Event.kind, Event.subject, Event.data, Event.project)
        .where(Event.id > after)
        .order_by(Event.id)
        .limit(limit)
    ).all()
    out = []
    for r in rows:
        event = EventOut(id=r.id, at=as_utc(r.at), kind=r.kind, subject=r.subject, data=r.data)
        out.append(Published(r.id, event, r.project, _sse_frame(event)))
    return out


def head_id(session: Session) -> int:
    return int(session.scalar(select(func.coalesce(func.max(Event.id), 0))) or 0)


# kind=: an event kind, a prefix ending in * ("vm.*", or "*" for all), or a comma list of them.
_KIND = r"\s*([a-z][a-z0-9_.-]*\*?|\*)\s*"
KindFilter = Annotated[str, StringConstraints(pattern=f"^{_KIND}(,{_KIND})*$", max_length=1000)]

router = APIRouter(prefix="/v1/events", tags=["events"])

MAX_WAIT_S = 30.0
MAX_EVENT_ID = 2**63 - 1  # the id column is a signed 64-bit integer
_EVENT_ID = re.compile(r"\s*([0-9]{1,19})\s*")
SSE_KEEPALIVE_S = 15.0
CATCH_UP_BATCH = 500


def _parse_last_event_id(value: str) -> int:
    match = _EVENT_ID.fullmatch(value)  # ASCII digits only: "²".isdigit() is true, int("²") fails
    if match is None or int(match.group(1)) > MAX_EVENT_ID:
        raise ProblemError(400, "invalid_last_event_id", "Last-Event-ID must be an event id")
    return int(match.group(1))


def _authorize(principal: Principal) -> None:
    principal.require("admin", "reader", "client")


def make_broadcaster(db: Database, signal: Signal, metrics: Metrics) -> Broadcaster[Published]:
    """The process's one reader of new events (fanout.py), woken by ``signal``."""

    async def read_after(after: int, limit: int) -> list[Published]:
        return await db.run(functools.partial(read_published, after=after, limit=limit), write=False)

    async def read_head() -> int:
        return await db.run(head_id, write=False)

    broadcaster: Broadcaster[Published] = Broadcaster(signal, read_after, read_head, metrics.event_reads.inc)
    metrics.event_watchers.set_function(lambda: broadcaster.subscribers)
    return broadcaster


@router.get(
    "",
    response_model=EventPage,
    responses=problems("too_many_streams"),
    summary="Read events after an id (long-polls with wait)",
    openapi_extra=roles("admin", "reader", "client (its project's VM events)"),
)
async def list_events(
    request: Request,
    after: int = Query(0, ge=0, le=MAX_EVENT_ID),
    kind: list[KindFilter] | None = Query(None, max_length=50),
    subject: str | None = Query(None, max_length=128, pattern=TEXT_PATTERN),
    limit: int = Query(100, ge=1, le=500),
    wait: float = Query(0, ge=0, le=MAX_WAIT_S),
    principal: Principal = Depends(current_principal),
) -> EventPage:
    _authorize(principal)
    ctx = get_context(request)
    flt = EventFilter.parse(kind, subject, principal)

    def _read(s: Session) -> tuple[list[EventOut], int]:
        return read_events(s, after, flt, limit), head_id(s)

    if wait <= 0:
        items, head = await ctx.db.run(_read, write=False)
        return EventPage(items=items, last_id=items[-1].id if items else after, head_id=head)
    # A long-poll waits on the process's broadcaster (one read per commit for every waiter): it
    # joins first, then reads what came before it joined, so nothing falls between the two.
    with ctx.stream_limit.hold(principal.key):
        sub = await ctx.fanout.subscribe(flt.matches)
        try:
            items, head = await ctx.db.run(_read, write=False)
            if items:
                return EventPage(items=items, last_id=items[-1].id, head_id=head)
            deadline = asyncio.get_running_loop().time() + wait
            while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
                new = [p.event for p in await sub.take(remaining) if p.id > after][:limit]
                if new:
                    return EventPage(items=new, last_id=new[-1].id, head_id=max(ctx.fanout.position, new[-1].id))
                if sub.overflowed:  # more came than a queue holds, none of it ours: read it
                    ctx.fanout.reset(sub)
                    items, head = await ctx.db.run(_read, write=False)
                    if items:
                        return EventPage(items=items, last_id=items[-1].id, head_id=head)
            return EventPage(items=[], last_id=after, head_id=max(head, ctx.fanout.position))
        finally:
            ctx.fanout.unsubscribe(sub)


SSE_DESCRIPTION = (
    "Server-Sent Events: each event's `id` is the event id, `event` its kind, `data` the event as JSON "
    "(as in `GET /v1/events`); a comment line every 15 s keeps the connection open"
)
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "event": {"type": "string"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/EventOut"},
        },
    },
    "required": ["id", "event", "data"],
}


def _sse_frame(event: EventOut) -> bytes:
    payload = event.model_dump_json()
    return f"id: {event.id}\nevent: {event.kind}\ndata: {payload}\n\n".encode()


class _EventStream(StreamingResponse):
    """Gives back the stream's subscription and its slot however the response ends (the client may
    go away before the body starts, when the generator's own cleanup would never run)."""

    def __init__(self, frames: AsyncIterator[bytes], release: Callable[[], None]) -> None:
        super().__init__(
            frames, media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        self._release = release
        self._frames = frames

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The stream ends as soon as the client goes away (not at the next keepalive, up to 15 s
        # later), so a closed stream gives its slot back at once.
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self._release()
            aclose = getattr(self._frames, "aclose", None)
            if aclose is not None:
                await aclose()


@router.get(
    "/stream",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}}, "description": SSE_DESCRIPTION},
        **problems("invalid_last_event_id", "too_many_streams"),
    },
    summary="Server-Sent Events, resumable with Last-Event-ID",
    openapi_extra=roles("admin", "reader", "client (its project's VM events)"),
)
async def stream_events(
    request: Request,
    after: int = Query(0, ge=0, le=MAX_EVENT_ID),
    kind: list[KindFilter] | None = Query(None, max_length=50),
    subject: str | None = Query(None, max_length=128, pattern=TEXT_PATTERN),
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
    principal: Principal = Depends(current_principal),
) -> StreamingResponse:
    _authorize(principal)
    if last_event_id is not None:
        after = _parse_last_event_id(last_event_id)
    ctx = get_context(request)
    flt = EventFilter.parse(kind, subject, principal)
    key = principal.key
    # Everything that can refuse the stream happens before its first byte.
    ctx.stream_limit.acquire(key)
    try:
        sub = await ctx.fanout.subscribe(flt.matches)
    except BaseException:
        ctx.stream_limit.release(key)
        raise

    def release() -> None:
        ctx.fanout.unsubscribe(sub)
        ctx.stream_limit.release(key)

    return _EventStream(_frames(ctx, flt, sub, after), release)


async def _frames(
    ctx: AppContext, flt: EventFilter, sub: Subscription[Published], after: int
) -> AsyncIterator[bytes]:
    position = after
    yield b"retry: 1000\n\n"
    while True:
        # What came before the subscription went live is read from the database, once.
        while position < sub.live_from:
            items = await ctx.db.run(
                functools.partial(read_events, after=position, flt=flt, limit=CATCH_UP_BATCH, until=sub.live_from),
                write=False,
            )
            for item in items:
                yield _sse_frame(item)
                position = item.id
            if len(items) < CATCH_UP_BATCH:
                break
        # Then what the broadcaster hands over, until this stream falls too far behind.
        while not sub.overflowed:
            batch = await sub.take(SSE_KEEPALIVE_S)
            if batch:
                for published in batch:
                    if published.id > position:
                        yield published.frame
                        position = published.id
            elif not sub.overflowed:
                yield b": keepalive\n\n"
        ctx.fanout.reset(sub)
