"""Wake-ups for waiters on the event loop, fired from any thread (or another replica, via events.py).

A waiter reads ``version`` before it looks at the database and then waits for the version to move,
so a change between the look and the wait is never missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class Signal:
    def __init__(self) -> None:
        self.version = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: set[asyncio.Future[None]] = set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def fire(self) -> None:
        with self._lock:
            self.version += 1
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait(self, seen_version: int, timeout: float) -> bool:
        """Wait until the version differs from ``seen_version``; False on timeout."""
        if self.version != seen_version:
            return True
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        if self.version != seen_version:
            self._waiters.discard(fut)
            return True
        # asyncio.wait, not wait_for: on Python 3.11 wait_for drops a cancel that arrives as the
        # future completes, and the cancelled task (the pending queue at shutdown) runs on.
        try:
            done, _ = await asyncio.wait({fut}, timeout=timeout)
            return bool(done)
        finally:
            self._waiters.discard(fut)
