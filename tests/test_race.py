"""Claims stay exact with several service processes on one PostgreSQL.

Two real ``tdx-service serve`` processes share one database; 240 concurrent creates race for 60
KeyIDs. Exactly capacity-many VMs are scheduled, no host goes over any limit, the rest wait.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import POSTGRES_URL, _with_search_path, load_body

TOKEN = "tdx_race-admin"
HOSTS = 6
KEYIDS_PER_HOST = 10
REQUESTS = int(os.environ.get("RACE_REQUESTS", "240"))

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="needs TDX_TEST_POSTGRES_URL")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def replicas() -> Iterator[list[str]]:
    assert POSTGRES_URL
    schema = f"race_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    env = {
        **os.environ,
        "TDX_DATABASE_URL": _with_search_path(POSTGRES_URL, schema),
        "TDX_ADMIN_TOKEN": TOKEN,
        "TDX_HEARTBEAT_TIMEOUT_S": "3600",
        "TDX_LOG_REQUESTS": "false",
    }
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        # Both start at once: migrations must be safe against each other.
        for _ in range(2):
            port = _free_port()
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "service.main", "serve", "--port", str(port)],
                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        for url, proc in zip(urls, procs, strict=True):
            while True:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "server exited"
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


async def _fire(urls: list[str]) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    limits = httpx.Limits(max_connections=REQUESTS)
    async with httpx.AsyncClient(headers=headers, timeout=120, limits=limits) as client:
        start = asyncio.Event()

        async def one(i: int) -> httpx.Response:
            await start.wait()
            body = {"name": f"td-{i}", "vcpus": 1, "memory_mib": 256, "tdx": True}
            return await client.post(f"{urls[i % len(urls)]}/v1/vms", json=body)

        tasks = [asyncio.create_task(one(i)) for i in range(REQUESTS)]
        await asyncio.sleep(0.1)
        start.set()
        return list(await asyncio.gather(*tasks))


def test_concurrent_creates_on_two_replicas_never_overcommit(replicas: list[str]) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=replicas[0], headers=headers, timeout=30) as api:
        for i in range(HOSTS):
            assert api.post("/v1/hosts", json={"name": f"h{i}", "vcpus": 64, "memory_mib": 262144}).status_code == 201
            r = api.post(f"/v1/hosts/h{i}/loads", json=load_body("ready", KEYIDS_PER_HOST))
            assert r.status_code == 201, r.text

        responses = asyncio.run(_fire(replicas))
        assert [r.status_code for r in responses] == [201] * REQUESTS, {r.status_code: r.text for r in responses}
        statuses = Counter(r.json()["status"] for r in responses)
        capacity = HOSTS * KEYIDS_PER_HOST
        assert statuses == {"scheduled": capacity, "pending": REQUESTS - capacity}

        per_host = Counter(r.json()["host"] for r in responses if r.json()["status"] == "scheduled")
        hosts = api.get("/v1/hosts").json()["items"]
        assert len(hosts) == HOSTS
        for host in hosts:
            assert host["tdx"]["keyids_used"] == per_host[host["name"]] <= host["tdx"]["keyids_total"]
            assert host["usage"]["vms"] == per_host[host["name"]]
            assert host["usage"]["memory_mib"] == 256 * per_host[host["name"]] <= host["memory_mib"]
        # Listing agrees with the replies: nothing acknowledged was lost, nothing extra appeared.
        listed: list[dict[str, object]] = []
        url: str | None = "/v1/vms?limit=500"
        while url:
            page = api.get(url).json()
            listed += page["items"]
            url = f"/v1/vms?limit=500&cursor={page['next']}" if page["next"] else None
        assert sorted(str(v["id"]) for v in listed) == sorted(r.json()["id"] for r in responses)
        assert Counter(str(v["status"]) for v in listed) == statuses
        # The event log has every placement exactly once, ids strictly increasing.
        events = api.get("/v1/events", params={"kind": "vm.scheduled", "limit": 500}).json()["items"]
        assert len(events) == capacity
        ids = [e["id"] for e in events]
        assert ids == sorted(set(ids))
