"""The real app served by uvicorn on 127.0.0.1 in a background thread, for clients that speak HTTP.

``live`` is a fresh server on a fresh migrated database (SQLite, and PostgreSQL when configured);
``proxy`` is a TCP relay in front of it that can cut every open connection, as a restarting
load balancer or a flaky network would.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from service.app import create_app
from service.client import TdxClient
from tests.conftest import ADMIN_TOKEN, load_body, make_settings


@dataclass
class LiveServer:
    url: str
    admin_token: str

    def admin(self, **kwargs: Any) -> TdxClient:
        return TdxClient(self.url, self.admin_token, **kwargs)

    def ready_host(self, name: str, state: str = "ready", keyids: int = 15, **extra: Any) -> dict[str, Any]:
        """A registered host with a load report of the given TDX state; returns the load report."""
        body = load_body(state, keyids)
        with self.admin() as c:
            c.create_host(name, extra.pop("vcpus", 32), extra.pop("memory_mib", 65536), **extra)
            c.report_load(name, body)
        return body


def _listen() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@pytest.fixture
def live(database_url: str) -> Iterator[LiveServer]:
    app = create_app(make_settings(database_url))
    sock = _listen()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    # Wait for startup by asking it, not by sleeping a fixed time.
    with httpx.Client(base_url=url, timeout=5) as probe:
        for _ in range(500):
            if server.started:
                break
            if not thread.is_alive():
                pytest.fail("uvicorn did not start")
            threading.Event().wait(0.01)
        assert probe.get("/healthz").status_code == 200
    try:
        yield LiveServer(url, ADMIN_TOKEN)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
        app.state.ctx.db.dispose()


class Proxy:
    """A TCP relay to ``target``; ``cut()`` closes every connection it carries right now."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = _listen()
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self.connections += 1
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.1):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = src.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self.listener.close()
        self._thread.join(timeout=5)


@pytest.fixture
def proxy(live: LiveServer) -> Iterator[Proxy]:
    url = httpx.URL(live.url)
    p = Proxy((url.host, url.port or 80))
    yield p
    p.close()
