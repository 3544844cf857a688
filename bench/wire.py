"""A minimal HTTP/1.1 keep-alive client on raw asyncio protocols.

General clients (httpx, aiohttp) spend more CPU per request than the server under test, and on a
2-core machine the driver shares the cores with the server: this one builds requests from bytes
and parses only the status line, Content-Length and the body, so one driver process needs a small
fraction of a core for several thousand requests per second.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

_CRLF2 = b"\r\n\r\n"


class HttpError(ConnectionError):
    pass


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HttpError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._try_complete()

    def _try_complete(self) -> None:
        if self.waiter is None or self.waiter.done():
            return
        end = self.buf.find(_CRLF2)
        if end < 0:
            return
        head = bytes(self.buf[:end])
        length = 0
        lower = head.lower()
        pos = lower.find(b"\r\ncontent-length:")
        if pos >= 0:
            stop = lower.find(b"\r\n", pos + 2)
            length = int(lower[pos + 17 : stop if stop > 0 else None])
        elif b"transfer-encoding: chunked" in lower:
            self.waiter.set_exception(HttpError("chunked responses are not supported"))
            return
        total = end + 4 + length
        if len(self.buf) < total:
            return
        status = int(head[9:12])
        body = bytes(self.buf[end + 4 : total])
        del self.buf[:total]
        self.waiter.set_result((status, body))


class Connection:
    """One keep-alive connection; one request at a time."""

    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None) -> None:
        self.host = host
        self.port = port
        self._proto: _Protocol | None = None
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._extra = extra.encode()
        self._host_header = f"Host: {host}:{port}\r\n".encode()

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(_Protocol, self.host, self.port)
        return proto

    async def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        if self._proto is None or self._proto.closed:
            self._proto = await self._connect()
        proto = self._proto
        parts = [f"{method} {path} HTTP/1.1\r\n".encode(), self._host_header, self._extra]
        if headers:
            parts.append("".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode())
        if body is not None:
            parts.append(b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
            parts.append(body)
        else:
            parts.append(b"\r\n")
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        proto.waiter = fut
        assert proto.transport is not None
        proto.transport.write(b"".join(parts))
        proto._try_complete()
        try:
            return await fut
        except HttpError:
            self._proto = None
            raise

    async def json(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        body = None if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        status, raw = await self.request(method, path, body)
        return status, json.loads(raw) if raw else None

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None
