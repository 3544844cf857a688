"""AsyncTdxClient against the real service over HTTP: every endpoint, typed errors, retries, the event stream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable

import pytest

from service.client import (
    AsyncTdxClient,
    Conflict,
    ConnectionFailed,
    Forbidden,
    NotFound,
    PreconditionFailed,
    Unauthorized,
    ValidationFailed,
)
from tests.client.conftest import LiveServer, Proxy
from tests.client.faults import AsyncFlakyTransport
from tests.conftest import load_body


def run(coro: Awaitable[None]) -> None:
    async def main() -> None:
        await coro

    asyncio.run(main())


def test_every_endpoint(live: LiveServer) -> None:
    async def scenario() -> None:
        async with AsyncTdxClient(live.url, live.admin_token) as c:
            assert (await c.healthz())["status"] == "ok"
            await c.create_host("h1", 32, 65536, labels={"zone": "a"})
            await c.create_host("h2", 32, 65536)
            load = load_body("ready", keyids=3)
            assert (await c.report_load("h1", load))["tdx"]["state"] == "ready"
            assert (await c.heartbeat("h1", load["load_id"], keyids_in_use=0))["alive"] is True

            host, etag = await c.get_host("h1")
            patched = await c.patch_host("h1", if_match=etag, labels={"zone": "b"})
            assert patched["generation"] > host["generation"]
            with pytest.raises(PreconditionFailed):
                await c.patch_host("h1", if_match=etag, labels={"zone": "c"})
            assert (await c.list_hosts(tdx_state="ready"))["items"][0]["name"] == "h1"
            assert [h["name"] async for h in c.iter_hosts(limit=1)] == ["h1", "h2"]
            assert [h["name"] async for h in c.iter_hosts(label={"zone": "b"})] == ["h1"]
            assert (await c.list_loads("h1"))["items"][0]["id"] == load["load_id"]
            assert [x["id"] async for x in c.iter_loads("h1")] == [load["load_id"]]

            preview = await c.preview("vm1", 2, 2048, True)
            assert preview["host"] == "h1"
            assert (await c.capacity(vcpus=2, memory_mib=2048, tdx=True))["fit"] is not None

            vm = await c.create_vm("vm1", 2, 2048, True, project="p1", selector={"zone": "b"})
            assert vm["host"] == "h1" and vm["status"] == "scheduled"
            assert (await c.get_vm(vm["id"]))["id"] == vm["id"]
            assert [v["id"] for v in (await c.list_vms(project="p1"))["items"]] == [vm["id"]]
            assert [v["id"] async for v in c.iter_vms(status="scheduled")] == [vm["id"]]
            assert [v["id"] for v in await c.host_vms("h1")] == [vm["id"]]

            agent = await c.create_token("agent", host="h1")
            async with AsyncTdxClient(live.url, agent["token"]) as a:
                assert (await a.report_vm_status(vm["id"], "running", "booted"))["status"] == "running"
                with pytest.raises(Forbidden):
                    await a.heartbeat("h2", uuid.uuid4())
            assert (await c.delete_vm(vm["id"]))["status"] == "deleting"

            assert (await c.drain_host("h2"))["draining"] is True
            await c.delete_host("h2")
            with pytest.raises(NotFound) as missing:
                await c.get_host("h2")
            assert missing.value.code == "host_not_found"

            events = await c.list_events(kind="vm.*")
            assert "vm.scheduled" in [e["kind"] for e in events["items"]]

            assert agent["id"] in [t["id"] async for t in c.iter_tokens()]
            assert (await c.list_tokens())["items"]
            await c.revoke_token(agent["id"])
            async with AsyncTdxClient(live.url, agent["token"]) as a:
                with pytest.raises(Unauthorized) as revoked:
                    await a.host_vms("h1")
                assert revoked.value.code == "unauthorized"

    run(scenario())


def test_typed_errors_and_idempotency(live: LiveServer) -> None:
    live.ready_host("h1")

    async def scenario() -> None:
        async with AsyncTdxClient(live.url, live.admin_token) as c:
            with pytest.raises(Conflict) as taken:
                await c.create_host("h1", 4, 4096)
            assert taken.value.code == "host_name_taken"
            with pytest.raises(ValidationFailed) as invalid:
                await c.create_vm("vm", 0, 1024, True)
            assert invalid.value.code == "validation_error"

            key = str(uuid.uuid4())
            first = await c.create_vm("vm", 1, 1024, True, idempotency_key=key)
            assert (await c.create_vm("vm", 1, 1024, True, idempotency_key=key))["id"] == first["id"]
            with pytest.raises(ValidationFailed) as reused:
                await c.create_vm("other", 1, 1024, True, idempotency_key=key)
            assert reused.value.code == "idempotency_key_reused"

    run(scenario())


def test_retries(live: LiveServer) -> None:
    live.ready_host("h1")

    async def scenario() -> None:
        refused = AsyncFlakyTransport(1)
        async with AsyncTdxClient(live.url, live.admin_token, transport=refused) as c:
            assert (await c.get_host("h1")).host["name"] == "h1"
            assert len(refused.faults.attempts("/v1/hosts/h1")) == 2

        lost = AsyncFlakyTransport(1, lose_answer=True, path="/v1/vms")
        async with AsyncTdxClient(live.url, live.admin_token, transport=lost) as c:
            vm = await c.create_vm("vm", 1, 1024, True)
            attempts = lost.faults.attempts("/v1/vms")
            assert len(attempts) == 2
            assert attempts[0].headers["Idempotency-Key"] == attempts[1].headers["Idempotency-Key"]
            assert [v["id"] async for v in c.iter_vms()] == [vm["id"]]

        lost_token = AsyncFlakyTransport(1, lose_answer=True, path="/v1/tokens")
        async with AsyncTdxClient(live.url, live.admin_token, transport=lost_token) as c:
            with pytest.raises(ConnectionFailed):
                await c.create_token("reader")
            assert len(lost_token.faults.attempts("/v1/tokens")) == 1

        always = AsyncFlakyTransport(10)
        async with AsyncTdxClient(live.url, live.admin_token, transport=always, retries=2, backoff=0.01) as c:
            with pytest.raises(ConnectionFailed):
                await c.list_hosts()
            assert len(always.faults.sent) == 3

    run(scenario())


def test_watch_events_resumes_after_the_server_side_closes(live: LiveServer, proxy: Proxy) -> None:
    live.ready_host("h1")

    async def scenario() -> None:
        async with AsyncTdxClient(live.url, live.admin_token) as direct:
            before = (await direct.list_events())["items"]
            recorder = AsyncFlakyTransport(0)
            async with AsyncTdxClient(proxy.url, live.admin_token, transport=recorder) as c:
                stream = c.watch_events()
                seen = [await anext(stream) for _ in before]
                assert [e["id"] for e in seen] == [e["id"] for e in before]

                proxy.cut()
                vm = await direct.create_vm("vm", 1, 1024, True)
                resumed = [await anext(stream) for _ in range(2)]
                assert [e["kind"] for e in resumed] == ["vm.created", "vm.scheduled"]
                assert {e["subject"] for e in resumed} == {vm["id"]}
                assert resumed[0]["id"] > seen[-1]["id"]
                assert proxy.connections >= 2
                last = recorder.faults.attempts("/v1/events/stream")[-1]
                assert last.headers["Last-Event-ID"] == str(seen[-1]["id"])
                await stream.aclose()

    run(scenario())
