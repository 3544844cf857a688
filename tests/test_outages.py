"""Outages are bounded 503s, never 500s or hangs (issue 9): a database that is down, one that
stalls (a loopback proxy that stops forwarding), SQLite locked by another process, a second
``serve`` on the same SQLite file, and clients that send their requests slowly or not at all.

No timing assertions: a hang shows as a client timeout far beyond the configured limits."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import make_url

from service.app import create_app
from tests.conftest import ADMIN_TOKEN, _truncate_postgres, load_body, make_settings
from tests.helpers import assert_problem, live_server
from tests.proxy import TcpProxy
from tests.replicas import _free_port

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# Far beyond every limit these tests configure: reaching it means the server hung.
HANG = 30.0


def _db_unavailable(r: httpx.Response, *, write: bool) -> None:
    body = assert_problem(r, 503, "database_unavailable")
    assert int(r.headers["retry-after"]) >= 1
    assert ("Idempotency-Key" in body["detail"]) is write, body["detail"]


def _ready_host(client: httpx.Client, name: str) -> None:
    r = client.post("/v1/hosts", json={"name": name, "vcpus": 32, "memory_mib": 65536}, headers=ADMIN)
    assert r.status_code == 201, r.text
    r = client.post(f"/v1/hosts/{name}/loads", json=load_body(), headers=ADMIN)
    assert r.status_code == 201, r.text


def _create_vm(client: httpx.Client, key: str) -> httpx.Response:
    body = {"name": "vm", "vcpus": 2, "memory_mib": 2048, "tdx": True}
    return client.post("/v1/vms", json=body, headers={**ADMIN, "Idempotency-Key": key})


@contextlib.contextmanager
def _postgres_behind_proxy(postgres_schema: str, **overrides: Any) -> Iterator[tuple[TcpProxy, httpx.Client]]:
    _truncate_postgres(postgres_schema)
    url = make_url(postgres_schema)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    settings = {
        "db_connect_timeout_s": 2,
        "db_pool_timeout_s": 1,
        "db_statement_timeout_s": 1,
        "readyz_timeout_s": 1,
        **overrides,
    }
    app = create_app(make_settings(proxied, **settings))
    try:
        with live_server(app) as base, httpx.Client(base_url=base, timeout=HANG) as client:
            yield proxy, client
            proxy.set_mode("forward")
    finally:
        proxy.close()
        app.state.ctx.db.dispose()


def _outage_answers(client: httpx.Client, key: str) -> None:
    """During an outage: every database-backed request a 503 (a create's says to retry with its
    Idempotency-Key), /readyz 503, /healthz 200; answered, none hanging."""
    with ThreadPoolExecutor(4) as pool:
        reads = pool.submit(client.get, "/v1/hosts", headers=ADMIN)
        create = pool.submit(_create_vm, client, key)
        ready = pool.submit(client.get, "/readyz")
        health = pool.submit(client.get, "/healthz", timeout=5)
        assert health.result().status_code == 200
        _db_unavailable(reads.result(), write=False)
        _db_unavailable(create.result(), write=True)
        _db_unavailable(ready.result(), write=False)


def _recovers(client: httpx.Client, key: str) -> None:
    deadline = time.monotonic() + HANG
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the service did not recover"
        time.sleep(0.2)
    assert client.get("/v1/hosts", headers=ADMIN).status_code == 200
    first = _create_vm(client, key)
    assert first.status_code in (201, 202), first.text
    again = _create_vm(client, key)
    assert again.json()["id"] == first.json()["id"]
    vms = client.get("/v1/vms", headers=ADMIN).json()["items"]
    assert len(vms) == 1  # retried with the same key: one VM, whatever the outage did


def test_postgres_down_answers_503_and_recovers(postgres_schema: str) -> None:
    with _postgres_behind_proxy(postgres_schema) as (proxy, client):
        _ready_host(client, "h1")
        assert client.get("/readyz").status_code == 200
        proxy.set_mode("down")
        key = str(uuid.uuid4())
        _outage_answers(client, key)
        proxy.set_mode("forward")
        _recovers(client, key)


def test_postgres_stall_is_bounded_and_recovers(postgres_schema: str) -> None:
    with _postgres_behind_proxy(postgres_schema) as (proxy, client):
        _ready_host(client, "h1")
        assert client.get("/readyz").status_code == 200
        proxy.set_mode("stall")
        key = str(uuid.uuid4())
        _outage_answers(client, key)
        # A stall that outlives the pool: every pooled connection is stuck or cut; still bounded.
        _outage_answers(client, str(uuid.uuid4()))
        proxy.set_mode("forward")
        _recovers(client, key)


def test_sqlite_that_cannot_be_opened_answers_503(tmp_path: Path) -> None:
    app = create_app(make_settings(f"sqlite:///{tmp_path}/missing-dir/tdx.db", run_background_tasks=False))
    try:
        with live_server(app) as base, httpx.Client(base_url=base, timeout=HANG) as client:
            _outage_answers(client, str(uuid.uuid4()))
    finally:
        app.state.ctx.db.dispose()


@contextlib.contextmanager
def _sqlite_write_lock(path: Path) -> Iterator[None]:
    """Another process holding SQLite's write lock on ``path`` until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sqlite3, sys\n"
            f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE')\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n"
        )],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)


def test_sqlite_locked_by_another_process_never_freezes_the_server(sqlite_template: Path, tmp_path: Path) -> None:
    path = tmp_path / "tdx.db"
    path.write_bytes(sqlite_template.read_bytes())
    app = create_app(make_settings(f"sqlite:///{path}", sqlite_busy_timeout_s=4))
    try:
        with live_server(app) as base, httpx.Client(base_url=base, timeout=HANG) as client:
            _ready_host(client, "h1")
            with _sqlite_write_lock(path), ThreadPoolExecutor(2) as pool:
                write = pool.submit(
                    client.post, "/v1/hosts", json={"name": "h2", "vcpus": 8, "memory_mib": 8192}, headers=ADMIN
                )
                time.sleep(0.5)  # the write now waits for the lock
                # Meanwhile the event loop serves everyone else, reads included (WAL).
                assert client.get("/healthz", timeout=2).status_code == 200
                hosts = client.get("/v1/hosts", headers=ADMIN, timeout=2)
                assert [h["name"] for h in hosts.json()["items"]] == ["h1"]
                # The lock outlives the busy timeout: 503, not 500, not a hang.
                _db_unavailable(write.result(), write=True)
            r = client.post("/v1/hosts", json={"name": "h2", "vcpus": 8, "memory_mib": 8192}, headers=ADMIN)
            assert r.status_code == 201, r.text
    finally:
        app.state.ctx.db.dispose()


# ---- a real `tdx-service serve` -----------------------------------------------------------


@contextlib.contextmanager
def _serve(db: Path, port: int, **env: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.main", "serve", "--port", str(port)],
        env={
            **os.environ,
            "TDX_DATABASE_URL": f"sqlite:///{db}",
            "TDX_ADMIN_TOKEN": ADMIN_TOKEN,
            "TDX_LOG_REQUESTS": "false",
            **env,
        },
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "server exited"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)


def test_second_serve_on_the_same_sqlite_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "tdx.db"
    first_port, second_port = _free_port(), _free_port()
    with _serve(db, first_port) as first:
        url = f"http://127.0.0.1:{first_port}"
        _wait_ready(url, first)
        with _serve(db, second_port) as second:
            assert second.wait(timeout=60) != 0
            assert second.stderr is not None
            assert "already serves" in second.stderr.read()
        r = httpx.post(f"{url}/v1/hosts", json={"name": "h1", "vcpus": 8, "memory_mib": 8192}, headers=ADMIN)
        assert r.status_code == 201, r.text


def _all_closed_by_server(socks: list[socket.socket], within: float) -> bool:
    sel = selectors.DefaultSelector()
    for sock in socks:
        sel.register(sock, selectors.EVENT_READ)
    open_left = len(socks)
    deadline = time.monotonic() + within
    while open_left and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(4096)
            except ConnectionError:
                data = b""
            if not data:
                sel.unregister(sock)
                open_left -= 1
    sel.close()
    return open_left == 0


def test_slow_clients_are_cut_off_and_cannot_lock_others_out(tmp_path: Path) -> None:
    port = _free_port()
    limits = {"TDX_HTTP_HEADER_TIMEOUT_S": "2", "TDX_HTTP_BODY_TIMEOUT_S": "2", "TDX_HTTP_MAX_CONNECTIONS": "500"}
    with _serve(tmp_path / "tdx.db", port, **limits) as proc:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc)
        socks: list[socket.socket] = []
        body: socket.socket | None = None
        try:
            # One that sends a whole request, then part of a second one on the kept-alive connection.
            kept = socket.create_connection(("127.0.0.1", port))
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b'{"status":"ok"}'):
                chunk = kept.recv(4096)
                assert chunk, answer
                answer += chunk
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            assert _all_closed_by_server([kept], within=HANG)
            kept.close()
            # 2,000 clients that send part of a request head and nothing more, 4 times the cap.
            for _ in range(2000):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(b"GET /v1/hosts HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                socks.append(sock)
            # One that sends its head and part of its body.
            body = socket.create_connection(("127.0.0.1", port))
            body.sendall(
                b"POST /v1/hosts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{\"name\""
            )
            # A normal client is served meanwhile: its connections take the place of idle ones.
            for _ in range(5):
                assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
            r = httpx.get(f"{url}/v1/hosts", headers=ADMIN, timeout=10)
            assert r.status_code == 200, r.text
            # Every slow connection is closed by the server (no answer owed), none held for ever.
            assert _all_closed_by_server([*socks, body], within=HANG)
        finally:
            for sock in [*socks, *([body] if body else [])]:
                sock.close()
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
