"""Assertions and tools shared by the black-box tests (not fixtures: those live in conftest.py)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from tests.conftest import Api

PROBLEM_FIELDS = ("type", "title", "status", "detail", "code")


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """An RFC 9457 problem document with the given status and stable code."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers["content-type"]
    body: dict[str, Any] = r.json()
    for field in PROBLEM_FIELDS:
        assert field in body, f"problem without {field}: {body}"
    assert body["status"] == status
    assert body["code"] == code, body
    assert isinstance(body["type"], str) and body["type"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    if code == "validation_error":
        assert isinstance(body["errors"], list)
        for err in body["errors"]:
            assert isinstance(err["loc"], list) and isinstance(err["msg"], str)
    return body


def head_id(api: Api) -> int:
    r = api.client.get("/v1/events", params={"after": 0, "limit": 1}, headers=api.admin)
    assert r.status_code == 200, r.text
    return int(r.json()["head_id"])


def all_pages(api: Api, path: str, headers: dict[str, str] | None = None, **params: Any) -> list[dict[str, Any]]:
    """Every item of a cursor-paginated list."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = dict(params)
        if cursor is not None:
            query["cursor"] = cursor
        r = api.client.get(path, params=query, headers=headers or api.admin)
        assert r.status_code == 200, r.text
        page = r.json()
        items.extend(page["items"])
        cursor = page["next"]
        if cursor is None:
            return items


def snapshot(api: Api) -> dict[str, Any]:
    """Everything the API shows about the stored state; compare before/after a refused request."""
    hosts = all_pages(api, "/v1/hosts")
    return {
        "hosts": hosts,
        "loads": {h["name"]: all_pages(api, f"/v1/hosts/{h['name']}/loads") for h in hosts},
        "vms": all_pages(api, "/v1/vms"),
        "tokens": all_pages(api, "/v1/tokens"),
        "head_id": head_id(api),
    }


def event_kinds(api: Api, after: int = 0, **params: Any) -> list[str]:
    r = api.client.get("/v1/events", params={"after": after, "limit": 500, **params}, headers=api.admin)
    assert r.status_code == 200, r.text
    return [e["kind"] for e in r.json()["items"]]


@contextlib.contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped while starting"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
