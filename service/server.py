"""How ``tdx-service serve`` runs uvicorn, with the limits uvicorn lacks (README "Limits").

uvicorn bounds only the idle time between two requests of a connection (``timeout_keep_alive``):
a client that sends part of a request's headers, or of its body, holds its connection for ever
(uvicorn issue #157), so a few thousand such clients exhaust the process's file descriptors.
:class:`BoundedHttpToolsProtocol` (or :class:`BoundedH11Protocol` without httptools) adds:

- a header deadline: a request's head must arrive within ``http_header_timeout_s`` of the
  connection opening (first request) or of its first byte (later ones on a kept-alive connection);
- a body deadline: its body within ``http_body_timeout_s`` of its head;
- a connection cap (``http_max_connections``, at most the file-descriptor limit less a reserve
  for the database): a connection beyond it evicts the oldest one that has no request in
  progress (still sending its head, or idle between requests), else it is refused. A client
  holding connections open without requests cannot lock others out: the newcomer takes its place.

A connection past a deadline is closed (the request, if any, sees a disconnect).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import weakref
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from service.config import Settings, get_settings

log = logging.getLogger("tdx.server")
# File descriptors kept for everything but client connections (database, logs, event listener).
FD_RESERVE = 128

try:  # uvicorn[standard] brings httptools; the h11 protocol is the fallback
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    HTTP_PROTOCOL = "service.server:BoundedHttpToolsProtocol"
except ImportError:  # pragma: no cover
    HttpToolsProtocol = H11Protocol  # type: ignore[assignment,misc]
    HTTP_PROTOCOL = "service.server:BoundedH11Protocol"

# Per server: connections with no request in progress, oldest first (the eviction order).
_WAITING: weakref.WeakKeyDictionary[ServerState, dict[Any, None]] = weakref.WeakKeyDictionary()


def raise_fd_limit() -> int:
    """Raise the soft file-descriptor limit to the hard one; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def max_connections(settings: Settings, fd_limit: int) -> int:
    return max(1, min(settings.http_max_connections, fd_limit - FD_RESERVE))


class _Bounded:
    """Mixed into a uvicorn HTTP protocol (which provides the attributes used here)."""

    connections: set[Any]
    server_state: ServerState
    cycle: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    def _limits_init(self) -> None:
        s = get_settings()
        self._header_timeout_s = s.http_header_timeout_s
        self._body_timeout_s = s.http_body_timeout_s
        self._max_connections = max_connections(s, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting = _WAITING.setdefault(self.server_state, {})

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire, what)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, why: str) -> None:
        self._deadline = None
        self._waiting.pop(self, None)
        if not self.transport.is_closing():
            log.debug("closing a connection: %s", why)
            self.transport.close()

    def _admit(self) -> bool:
        if len(self.connections) > self._max_connections:
            oldest = next(iter(self._waiting), None)
            if oldest is None:
                log.warning("refusing a connection: %d open, every one busy with a request", len(self.connections))
                self.transport.abort()
                return False
            oldest._expire("evicted for a new connection (connection limit reached)")
        self._waiting[self] = None
        self._arm(self._header_timeout_s, f"request head not received within {self._header_timeout_s} s")
        return True

    def _before_data(self) -> Any:
        cycle = self.cycle
        if self._deadline is None and (cycle is None or cycle.response_complete):
            # The first byte of another request on a kept-alive connection.
            self._arm(self._header_timeout_s, f"request head not received within {self._header_timeout_s} s")
        return cycle

    def _after_data(self, before: Any) -> None:
        cycle = self.cycle
        if cycle is None or self.transport.is_closing():
            return
        if cycle is not before:  # a request head arrived
            self._waiting.pop(self, None)
            if cycle.more_body:
                self._arm(self._body_timeout_s, f"request body not received within {self._body_timeout_s} s")
            else:
                self._disarm()
        elif not cycle.more_body and not cycle.response_complete:
            self._disarm()

    def _after_response(self) -> None:
        if not self.transport.is_closing() and self.cycle is not None and self.cycle.response_complete:
            self._waiting[self] = None  # idle until its next request: evictable

    def _lost(self) -> None:
        self._disarm()
        self._waiting.pop(self, None)


class BoundedHttpToolsProtocol(_Bounded, HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._limits_init()
        self._admit()

    def data_received(self, data: bytes) -> None:
        before = self._before_data()
        super().data_received(data)
        self._after_data(before)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._after_response()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()
        super().connection_lost(exc)


class BoundedH11Protocol(_Bounded, H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._limits_init()
        self._admit()

    def data_received(self, data: bytes) -> None:
        before = self._before_data()
        super().data_received(data)
        self._after_data(before)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._after_response()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()
        super().connection_lost(exc)
