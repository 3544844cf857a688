"""An unexpected error answers 500 (a problem document) and leaves the keep-alive connection usable,
on a real uvicorn server: the next request on the same connection is answered."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.app import create_app
from service.hosts import service as hosts_service
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.helpers import live_server

AUTH = f"Authorization: Bearer {ADMIN_TOKEN}\r\n"


def _read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body; fails clearly when the server hung up."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        rest += chunk
    buffer[:] = rest[length:]
    return int(status_line.split()[1]), headers, rest[:length]


@pytest.fixture
def faulty_server(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A live server where reading the host named "boom" fails with an unexpected exception."""
    app = create_app(make_settings(database_url))
    with live_server(app) as base:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
            for name in ("boom", "ok"):
                assert http.post("/v1/hosts", json={"name": name, "vcpus": 1, "memory_mib": 1}).status_code == 201
        original = hosts_service.render

        def render(session: Any, host: Any, timeout_s: float) -> Any:
            if host.name == "boom":
                raise RuntimeError("injected fault")
            return original(session, host, timeout_s)

        monkeypatch.setattr(hosts_service, "render", render)
        yield base


def test_a_500_leaves_the_keep_alive_connection_usable(faulty_server: str) -> None:
    host, port = faulty_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        buffer = bytearray()
        for name, expected in [("boom", 500), ("ok", 200), ("boom", 500), ("boom", 500), ("ok", 200)]:
            sock.sendall(f"GET /v1/hosts/{name} HTTP/1.1\r\nHost: {host}\r\n{AUTH}\r\n".encode())
            status, headers, body = _read_response(sock, buffer)
            assert status == expected, body
            assert headers.get("connection", "").lower() != "close"
            if status == 500:
                assert headers["content-type"].startswith("application/problem+json")
                assert b'"internal_error"' in body
                assert headers.get("x-request-id"), headers


def test_an_http_client_sees_500s_and_answers_alike(faulty_server: str) -> None:
    with httpx.Client(base_url=faulty_server, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
        statuses = [http.get(f"/v1/hosts/{name}").status_code for name in ["boom", "ok"] * 5]
    assert statuses == [500, 200] * 5
