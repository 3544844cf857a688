"""The real app served by uvicorn on 127.0.0.1 for the agent, and helpers to drive it over HTTP.

``live_server`` yields ``(base_url, admin_token)`` of a fresh server on a fresh migrated database
(SQLite, and PostgreSQL when TDX_TEST_POSTGRES_URL is set).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from service.app import create_app
from tests.conftest import ADMIN_TOKEN, make_settings

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "hosts"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def expected_of(case: str) -> dict[str, Any]:
    """What the server must derive from a fixture host tree (its ``expected.json``)."""
    data: dict[str, Any] = json.loads((FIXTURES / case / "expected.json").read_text())
    return data


def loopback_socket() -> socket.socket:
    """A socket bound to a free loopback port, not yet listening: connections to it are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def url_of(sock: socket.socket) -> str:
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextlib.contextmanager
def serve(app: FastAPI, sock: socket.socket) -> Iterator[str]:
    """Serve ``app`` on ``sock`` in a background thread until the block ends; yields the base URL."""
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        started = threading.Event()
        while not server.started:
            if not thread.is_alive():
                pytest.fail("uvicorn stopped while starting")
            started.wait(0.01)
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def app(database_url: str) -> Iterator[FastAPI]:
    application = create_app(make_settings(database_url))
    yield application
    application.state.ctx.db.dispose()


@pytest.fixture
def live_server(app: FastAPI) -> Iterator[tuple[str, str]]:
    sock = loopback_socket()
    try:
        with serve(app, sock) as url:
            yield url, ADMIN_TOKEN
    finally:
        sock.close()


class Admin:
    """Admin calls over plain HTTP, to set up and inspect what the agent did."""

    def __init__(self, base_url: str, token: str) -> None:
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        r = self.http.request(method, path, **kwargs)
        assert r.status_code == status, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None

    def host_with_agent(self, name: str, vcpus: int = 8, memory_mib: int = 16384) -> str:
        """Register a host; return a new agent token bound to it."""
        self.ok("POST", "/v1/hosts", 201, json={"name": name, "vcpus": vcpus, "memory_mib": memory_mib})
        token: str = self.ok("POST", "/v1/tokens", 201, json={"role": "agent", "host": name})["token"]
        return token

    def host(self, name: str) -> dict[str, Any]:
        body: dict[str, Any] = self.ok("GET", f"/v1/hosts/{name}")
        return body

    def loads(self, name: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.ok("GET", f"/v1/hosts/{name}/loads")["items"]
        return items

    def vm(self, vm_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.ok("GET", f"/v1/vms/{vm_id}")
        return body

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def admin(live_server: tuple[str, str]) -> Iterator[Admin]:
    client = Admin(*live_server)
    yield client
    client.close()


@pytest.fixture
def host_copy(tmp_path: Path) -> Any:
    """``host_copy(case)``: a writable copy of a fixture host tree, to change under the agent."""

    def copy(case: str) -> Path:
        root = tmp_path / "hosts" / case
        shutil.copytree(FIXTURES / case, root)
        return root

    return copy


def reload_kvm_intel(root: Path, tdx: str | None = "Y", **params: str) -> None:
    """``modprobe -r kvm_intel && modprobe kvm_intel tdx=...`` on a fixture tree: a new module instance.
    The old directory is moved away before the new one is made, so the new one cannot reuse its inode."""
    module = root / "sys/module/kvm_intel"
    gone = root / "sys/module/.kvm_intel-unloaded"
    if module.exists():
        if gone.exists():
            shutil.rmtree(gone)
        module.rename(gone)
    (module / "parameters").mkdir(parents=True)
    (module / "initstate").write_text("live\n")
    for name, value in {"tdx": tdx, **params}.items():
        if value is not None:
            (module / "parameters" / name).write_text(value + "\n")


def unload_kvm_intel(root: Path) -> None:
    module = root / "sys/module/kvm_intel"
    gone = root / "sys/module/.kvm_intel-unloaded"
    if gone.exists():
        shutil.rmtree(gone)
    module.rename(gone)


def append_kmsg(root: Path, *records: str, level: int = 3) -> None:
    """New kernel-log records after the last one of ``<root>/kmsg.log`` (kmsg format)."""
    log = root / "kmsg.log"
    lines = log.read_text().splitlines()
    seq, usec = (int(x) for x in lines[-1].split(";", 1)[0].split(",")[1:3])
    with log.open("a") as f:
        for i, text in enumerate(records, start=1):
            f.write(f"{level},{seq + i},{usec + i * 1_000_000},-;{text}\n")

