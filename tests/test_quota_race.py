"""Quotas hold exactly under concurrency: one server on each database, and two real replicas on one
PostgreSQL; and the kept usage equals a recount after a storm of creates, deletes and reboots."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from service.app import create_app
from tests.conftest import ADMIN_TOKEN, POSTGRES_URL, load_body, make_settings
from tests.helpers import live_server
from tests.replicas import serve_replicas

CREATES = 60
LIMIT = 20
NOT_ENDED = ("pending", "scheduled", "running", "deleting")


async def _concurrent_creates(urls: list[str], token: str, project: str, count: int) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(headers=headers, timeout=120, limits=httpx.Limits(max_connections=count)) as c:
        start = asyncio.Event()

        async def one(i: int) -> httpx.Response:
            await start.wait()
            body = {"name": f"vm-{i}", "vcpus": 1, "memory_mib": 256, "tdx": i % 2 == 0, "project": project}
            return await c.post(f"{urls[i % len(urls)]}/v1/vms", json=body)

        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        await asyncio.sleep(0.1)
        start.set()
        return list(await asyncio.gather(*tasks))


def _pages(c: httpx.Client, path: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 500}
    while True:
        page = c.get(path, params=params).json()
        items += page["items"]
        if not page["next"]:
            return items
        params["cursor"] = page["next"]


def _recount(c: httpx.Client) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for vm in _pages(c, "/v1/vms"):
        if vm["status"] in NOT_ENDED:
            u = out.setdefault(vm["project"], {"vms": 0, "vcpus": 0, "memory_mib": 0, "tdx_vms": 0})
            u["vms"] += 1
            u["vcpus"] += vm["vcpus"]
            u["memory_mib"] += vm["memory_mib"]
            u["tdx_vms"] += 1 if vm["tdx"] else 0
    return out


def _kept(c: httpx.Client) -> dict[str, dict[str, int]]:
    return {p["project"]: p["usage"] for p in _pages(c, "/v1/projects") if p["usage"]["vms"]}


def _assert_exact(c: httpx.Client, responses: list[httpx.Response], project: str) -> None:
    codes = Counter(r.status_code for r in responses)
    assert codes == {201: LIMIT, 403: CREATES - LIMIT}, {r.status_code: r.text for r in responses}
    for r in responses:
        if r.status_code == 403:
            assert r.json()["code"] == "quota_exceeded"
            assert r.json()["limit"] == LIMIT
    q = c.get(f"/v1/projects/{project}/quota").json()
    assert q["usage"]["vms"] == LIMIT
    listed = [v for v in _pages(c, "/v1/vms") if v["project"] == project]
    assert sorted(v["id"] for v in listed) == sorted(r.json()["id"] for r in responses if r.status_code == 201)


@pytest.fixture
def one_server(database_url: str) -> Iterator[str]:
    app = create_app(make_settings(database_url))
    with live_server(app) as url:
        yield url
    app.state.ctx.db.dispose()


def test_concurrent_creates_against_a_limit_give_exactly_the_limit(one_server: str) -> None:
    with httpx.Client(base_url=one_server, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30) as c:
        c.post("/v1/hosts", json={"name": "h", "vcpus": 64, "memory_mib": 65536})
        c.post("/v1/hosts/h/loads", json=load_body("ready", 8))
        assert c.put("/v1/projects/p/quota", json={"vms": LIMIT}).status_code == 200
        responses = asyncio.run(_concurrent_creates([one_server], ADMIN_TOKEN, "p", CREATES))
        _assert_exact(c, responses, "p")


TOKEN = "tdx_quota-race-admin-token-of-32-characters"


@pytest.fixture
def replicas() -> Iterator[list[str]]:
    if not POSTGRES_URL:
        pytest.skip("needs TDX_TEST_POSTGRES_URL")
    with serve_replicas(TOKEN, TDX_QUEUE_TICK_S="0.5") as urls:
        yield urls


def test_two_replicas_give_exactly_the_limit_and_keep_usage_equal_to_a_recount(replicas: list[str]) -> None:
    admin = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=replicas[0], headers=admin, timeout=60) as c:
        for i in range(3):
            assert c.post("/v1/hosts", json={"name": f"h{i}", "vcpus": 16, "memory_mib": 16384}).status_code == 201
            assert c.post(f"/v1/hosts/h{i}/loads", json=load_body("ready", 6)).status_code == 201
        assert c.put("/v1/projects/p/quota", json={"vms": LIMIT}).status_code == 200
        responses = asyncio.run(_concurrent_creates(replicas, TOKEN, "p", CREATES))
        _assert_exact(c, responses, "p")

        asyncio.run(_storm(replicas, admin))
        _wait_for_deadlines(c)
        assert _kept(c) == _recount(c)


async def _storm(urls: list[str], admin: dict[str, str]) -> None:
    """Creates (some beyond quotas, some fitting nowhere, some with a 1 s deadline), deletes and
    agent reports from both replicas at once, and a host reboot in the middle."""
    rng = random.Random(7)
    async with httpx.AsyncClient(headers=admin, timeout=120, limits=httpx.Limits(max_connections=64)) as c:
        for project, limits in {"s1": {"vms": 12, "tdx_vms": 6}, "s2": {"vcpus": 20}, "s3": {}}.items():
            assert (await c.put(f"{urls[0]}/v1/projects/{project}/quota", json=limits)).status_code == 200
        created: list[dict[str, Any]] = []

        async def create(i: int) -> None:
            body: dict[str, Any] = {
                "name": f"s-{i}", "vcpus": rng.choice([1, 2, 4, 64]), "memory_mib": rng.choice([256, 1024]),
                "tdx": rng.random() < 0.6, "project": rng.choice(["s1", "s2", "s3"]),
            }
            if rng.random() < 0.2:
                body["schedule_timeout_s"] = 1
            r = await c.post(f"{rng.choice(urls)}/v1/vms", json=body)
            assert r.status_code in (201, 403), r.text
            if r.status_code == 201:
                created.append(r.json())

        async def delete() -> None:
            if created:
                vm = created.pop(rng.randrange(len(created)))
                r = await c.delete(f"{rng.choice(urls)}/v1/vms/{vm['id']}")
                assert r.status_code == 202, r.text

        async def report() -> None:
            placed = [v for v in created if v["host"]]
            if placed:
                vm = rng.choice(placed)
                status = rng.choice(["running", "failed", "deleted"])
                r = await c.post(f"{rng.choice(urls)}/v1/vms/{vm['id']}/status", json={"status": status})
                assert r.status_code in (200, 409), r.text

        async def reboot() -> None:
            r = await c.post(f"{urls[1]}/v1/hosts/h1/loads", json=load_body("ready", 6))
            assert r.status_code == 201, r.text

        ops = [create(i) for i in range(90)] + [delete() for _ in range(30)] + [report() for _ in range(20)]
        rng.shuffle(ops)
        ops.insert(len(ops) // 2, reboot())
        for start in range(0, len(ops), 16):
            await asyncio.gather(*ops[start:start + 16])


def _wait_for_deadlines(c: httpx.Client) -> None:
    """Until the queues have failed every pending VM past its deadline: then nothing changes the
    usage any more, and the two reads (VMs, projects) see the same state."""
    deadline = time.monotonic() + 60
    while True:
        now = datetime.now(UTC)
        pending = [v for v in _pages(c, "/v1/vms") if v["status"] == "pending"]
        if all(datetime.fromisoformat(v["deadline"]) > now + timedelta(seconds=30) for v in pending):
            return
        assert time.monotonic() < deadline, "pending VMs past their deadline were not failed"
        time.sleep(0.2)
