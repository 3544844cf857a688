"""Claims stay exact with several service processes on one PostgreSQL.

Two real ``tdx-service serve`` processes share one database; 240 concurrent creates race for 60
KeyIDs. Exactly capacity-many VMs are scheduled, no host goes over any limit, the rest wait.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import POSTGRES_URL, load_body
from tests.replicas import serve_replicas

TOKEN = "tdx_race-admin-token-of-32-characters-or-more"
HOSTS = 6
KEYIDS_PER_HOST = 10
REQUESTS = int(os.environ.get("RACE_REQUESTS", "240"))

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="needs TDX_TEST_POSTGRES_URL")


@pytest.fixture
def replicas() -> Iterator[list[str]]:
    with serve_replicas(TOKEN) as urls:
        yield urls


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
        # As many TD builds at once as KeyIDs: both limits are claimed in the same conditional UPDATE.
        assert api.put("/v1/policy", json={"max_td_builds_per_host": KEYIDS_PER_HOST}).status_code == 200

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
            assert host["tdx"]["tds_building"] == per_host[host["name"]] <= KEYIDS_PER_HOST
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


async def _creates_and_reservations(urls: list[str], creates: int, reservations: list[int]) -> tuple[
    list[httpx.Response], list[httpx.Response]
]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    limits = httpx.Limits(max_connections=creates + len(reservations))
    async with httpx.AsyncClient(headers=headers, timeout=120, limits=limits) as client:
        start = asyncio.Event()

        async def create(i: int) -> httpx.Response:
            await start.wait()
            body = {"name": f"vm-{i}", "vcpus": 1, "memory_mib": 256, "tdx": False}
            return await client.post(f"{urls[i % len(urls)]}/v1/vms", json=body)

        async def reserve(i: int, mib: int) -> httpx.Response:
            await start.wait()
            return await client.patch(f"{urls[i % len(urls)]}/v1/hosts/h", json={"reserved_memory_mib": mib})

        made = [asyncio.create_task(create(i)) for i in range(creates)]
        patched = [asyncio.create_task(reserve(i, mib)) for i, mib in enumerate(reservations)]
        await asyncio.sleep(0.1)
        start.set()
        return list(await asyncio.gather(*made)), list(await asyncio.gather(*patched))


def test_reservations_racing_placements_never_leave_vms_over_capacity(replicas: list[str]) -> None:
    """Issue 9: a reservation is checked against what is placed under the host's row lock, and a
    placement is a conditional UPDATE of that row: whatever the interleaving, no VM ends up over capacity."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    memory = 8192
    reservations = [256 * ((i * 7) % 32) for i in range(24)]  # 0 .. 7936 MiB, in a scrambled order
    with httpx.Client(base_url=replicas[0], headers=headers, timeout=30) as api:
        assert api.post("/v1/hosts", json={"name": "h", "vcpus": 64, "memory_mib": memory}).status_code == 201
        assert api.post("/v1/hosts/h/loads", json=load_body("ready", 10)).status_code == 201
        made, patched = asyncio.run(_creates_and_reservations(replicas, 48, reservations))
        assert {r.status_code for r in made} == {201}, {r.status_code: r.text for r in made}
        for r in patched:
            assert r.status_code in (200, 409), r.text
            if r.status_code == 200:  # the host as the reservation committed it
                assert r.json()["usage"]["memory_mib"] + r.json()["reserved_memory_mib"] <= memory
            if r.status_code == 409:
                problem = r.json()
                assert problem["code"] == "reservation_exceeds_free"
                assert problem["requested"] + problem["in_use"] > problem["capacity"]
        # (The pending queue goes on placing the VMs that waited, under the same rule.)
        host = api.get("/v1/hosts/h").json()
        assert host["usage"]["memory_mib"] == 256 * host["usage"]["vms"]
        assert host["usage"]["memory_mib"] + host["reserved_memory_mib"] <= memory
