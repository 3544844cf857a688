"""Fault injection around the real HTTP transports: the request goes over the network for real,
except on the attempts chosen to fail, which fail either before sending (connect error) or after
the server has handled the request (the answer is lost)."""

from __future__ import annotations

import httpx


class _Faults:
    def __init__(self, fail_times: int, lose_answer: bool, path: str | None) -> None:
        self.fail_left = fail_times
        self.lose_answer = lose_answer
        self.path = path
        self.sent: list[httpx.Request] = []

    def should_fail(self, request: httpx.Request) -> bool:
        self.sent.append(request)
        if self.fail_left > 0 and (self.path is None or request.url.path == self.path):
            self.fail_left -= 1
            return True
        return False

    def attempts(self, path: str) -> list[httpx.Request]:
        return [r for r in self.sent if r.url.path == path]


class FlakyTransport(httpx.HTTPTransport):
    def __init__(self, fail_times: int = 1, *, lose_answer: bool = False, path: str | None = None) -> None:
        super().__init__()
        self.faults = _Faults(fail_times, lose_answer, path)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not self.faults.should_fail(request):
            return super().handle_request(request)
        if not self.faults.lose_answer:
            raise httpx.ConnectError("connection refused (injected)", request=request)
        response = super().handle_request(request)
        response.read()
        response.close()
        raise httpx.ReadError("connection lost before the answer (injected)", request=request)


class AsyncFlakyTransport(httpx.AsyncHTTPTransport):
    def __init__(self, fail_times: int = 1, *, lose_answer: bool = False, path: str | None = None) -> None:
        super().__init__()
        self.faults = _Faults(fail_times, lose_answer, path)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.faults.should_fail(request):
            return await super().handle_async_request(request)
        if not self.faults.lose_answer:
            raise httpx.ConnectError("connection refused (injected)", request=request)
        response = await super().handle_async_request(request)
        await response.aread()
        await response.aclose()
        raise httpx.ReadError("connection lost before the answer (injected)", request=request)
