"""Event fan-out: one reader of the event log per process, and a cap on watchers per principal.

Every SSE stream and waiting long-poll of a process is a ``Subscription`` of the process's one
``Broadcaster``. When events commit (here, or on PostgreSQL in another replica: see
``PostgresListener``), the broadcaster reads what is new once, in id order, and offers each event
to every subscription, which keeps the ones its filter matches in a bounded queue. So a commit
costs one read per replica however many watchers there are (wake-ups that come while a read runs
share the next one, and reads start at most every ``MIN_READ_INTERVAL_S``).

A subscription holds what came after ``live_from`` (the broadcaster's position when it joined);
what came before is the subscriber's to read, once, from the database. A subscriber that does not
keep up (its queue is full) never slows the others: its queue is dropped and it is marked
``overflowed``; it then reads what it missed from the database, from the last event it sent, and
goes on live (``reset``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Generic, Protocol, TypeVar

from service.errors import ProblemError
from service.signals import Signal

log = logging.getLogger("tdx.fanout")

# Events a subscription holds for its subscriber before it is dropped as too slow.
QUEUE_EVENTS = 1000
# Events read per database query.
READ_BATCH = 1000
# Reads start at most this often: bursts of commits share one read.
MIN_READ_INTERVAL_S = 0.005
# With watchers, the log is read this often even without a wake-up (a missed notification).
IDLE_READ_S = 15.0
RETRY_AFTER_S = 5


class Item(Protocol):
    @property
    def id(self) -> int: ...


T = TypeVar("T", bound=Item)


class Subscription(Generic[T]):
    """One watcher's view of the broadcast: the matching events after ``live_from``, in order."""

    def __init__(self, matches: Callable[[T], bool], live_from: int) -> None:
        self.matches = matches
        self.live_from = live_from
        self.overflowed = False
        self._items: deque[T] = deque()
        self._ready = asyncio.Event()

    def offer(self, item: T) -> None:
        if self.overflowed or item.id <= self.live_from or not self.matches(item):
            return
        if len(self._items) >= QUEUE_EVENTS:
            self.overflowed = True
            self._items.clear()
        else:
            self._items.append(item)
        self._ready.set()

    def reset(self, live_from: int) -> None:
        """Live again from ``live_from`` (after an overflow): what came before is read elsewhere."""
        self._items.clear()
        self.overflowed = False
        self.live_from = live_from
        self._ready.clear()

    async def take(self, timeout: float) -> list[T]:
        """What has arrived (waiting up to ``timeout`` for something); [] on timeout or overflow."""
        if not self._items and not self.overflowed:
            # asyncio.wait, not wait_for: on Python 3.11 wait_for can drop a cancel (see signals.py).
            waiter = asyncio.ensure_future(self._ready.wait())
            try:
                await asyncio.wait({waiter}, timeout=timeout)
            finally:
                waiter.cancel()
        items = list(self._items)
        self._items.clear()
        self._ready.clear()
        if self.overflowed:
            self._ready.set()  # stays readable until reset
            return []
        return items


class Broadcaster(Generic[T]):
    """Reads new events once per wake-up and offers them to every subscription of this process."""

    def __init__(
        self,
        signal: Signal,
        read_after: Callable[[int, int], Awaitable[list[T]]],
        read_head: Callable[[], Awaitable[int]],
        on_read: Callable[[], None] = lambda: None,
    ) -> None:
        self.signal = signal
        self.read_after = read_after  # (after, limit) -> items with id > after, oldest first
        self.read_head = read_head
        self.position = 0  # every event up to here has been offered to every subscription
        self.on_read = on_read
        self._subs: set[Subscription[T]] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    async def subscribe(self, matches: Callable[[T], bool]) -> Subscription[T]:
        if not self._subs:
            # Nobody was watching, so nothing was read: start from the log's head.
            head = await self.read_head()
            if not self._subs:
                self.position = max(self.position, head)
            # A commit between the head's read and now woke a broadcaster that had no one to read for.
            self.signal.fire()
        self._start()
        sub: Subscription[T] = Subscription(matches, self.position)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription[T]) -> None:
        self._subs.discard(sub)

    def reset(self, sub: Subscription[T]) -> None:
        sub.reset(self.position)

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="tdx-event-fanout")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_read = -math.inf
        backoff = 0.2
        seen = -1  # read once at start
        while True:
            if self._subs and seen != self.signal.version:
                pause = last_read + MIN_READ_INTERVAL_S - loop.time()
                if pause > 0:
                    await asyncio.sleep(pause)
                seen = self.signal.version
                last_read = loop.time()
                try:
                    await self._read_new()
                    backoff = 0.2
                except Exception as exc:  # the database is away: try again, the watchers wait
                    log.warning("event fan-out could not read the log (%s); retrying", exc)
                    seen = -1
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
            if not await self.signal.wait(seen if self._subs else self.signal.version, IDLE_READ_S):
                seen = -1  # a periodic read, in case a wake-up was lost

    async def _read_new(self) -> None:
        while True:
            items = await self.read_after(self.position, READ_BATCH)
            self.on_read()
            subs = list(self._subs)
            for item in items:
                if item.id <= self.position:
                    continue
                for sub in subs:
                    sub.offer(item)
                self.position = item.id
            if len(items) < READ_BATCH:
                return


class StreamLimit:
    """At most ``per_principal`` open streams and waiting long-polls per token, in this process."""

    def __init__(self, per_principal: int) -> None:
        self.per_principal = per_principal
        self._open: dict[str, int] = {}

    def open(self, key: str) -> int:
        return self._open.get(key, 0)

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        self.acquire(key)
        try:
            yield
        finally:
            self.release(key)

    def acquire(self, key: str) -> None:
        held = self._open.get(key, 0)
        if held >= self.per_principal:
            raise ProblemError(
                429,
                "too_many_streams",
                f"this token has {held} event streams or long-polls open on this replica, the most allowed "
                f"(TDX_MAX_STREAMS_PER_PRINCIPAL={self.per_principal}); close one or retry in {RETRY_AFTER_S} s",
                headers={"Retry-After": str(RETRY_AFTER_S)},
                limit=self.per_principal,
            )
        self._open[key] = held + 1

    def release(self, key: str) -> None:
        held = self._open.get(key, 0) - 1
        if held > 0:
            self._open[key] = held
        else:
            self._open.pop(key, None)
