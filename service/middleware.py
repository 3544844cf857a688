"""ASGI middleware: request ids and one structured log line per request; request body limit; 500s that
keep the connection."""

from __future__ import annotations

import inspect
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import problem_response
from service.metrics import Metrics

MAX_BODY_BYTES = 1024 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
access_log = logging.getLogger("tdx.access")


class _BodyTooLarge(HTTPException):
    """An HTTPException, so that FastAPI's body reader passes it on (it turns any other error into a
    400) and the problem handler answers 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request bodies are limited to {max_bytes} bytes")


class BodyLimitMiddleware:
    """413 for a body over 1 MiB, whether announced by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.max_bytes):
                await self._reject(scope, receive, send)
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            413, "payload_too_large", f"request bodies are limited to {self.max_bytes} bytes"
        )
        await response(scope, receive, send)


class UnhandledErrorMiddleware:
    """An unexpected exception answers 500 with the app's handler, and the connection stays usable.

    Starlette's outermost ServerErrorMiddleware sends the handler's 500 and then re-raises (for the
    server to log); uvicorn, seeing an exception after a complete response, closes the connection
    without ``Connection: close``, so a client's next request on that keep-alive connection failed.
    This middleware, inside it, answers and does not re-raise: the handler logged the error. Only an
    exception after the response started (a stream cut short) still propagates, and the server
    closes the connection, which is right for a truncated response.
    """

    def __init__(
        self, app: ASGIApp, handlers: Mapping[Any, Callable[[Request, Any], Response | Awaitable[Response]]]
    ) -> None:
        self.app = app
        self.handlers = handlers  # the app's exception handlers, read at each error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            handler = self.handlers.get(Exception) or self.handlers.get(500)
            if started or handler is None:
                raise
            response = handler(Request(scope), exc)
            if inspect.isawaitable(response):
                response = await response
            await response(scope, receive, send)


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, enabled: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _REQUEST_ID.fullmatch(candidate):
                    request_id = candidate
                break
        if not request_id:
            request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = time.perf_counter()
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.requests.labels(method=scope["method"], status=str(status)).inc()
            if self.enabled and scope["path"] != "/healthz":  # probes every few seconds
                record: dict[str, Any] = {
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                }
                access_log.info(json.dumps(record, separators=(",", ":")))
