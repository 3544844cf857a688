"""Quotas through the sync and async clients and tdxctl, against the real service over HTTP."""

from __future__ import annotations

import asyncio

import pytest

from service.client import AsyncTdxClient, Forbidden, PreconditionFailed, QuotaExceeded, RateLimited, TdxClient
from tests.client.conftest import LiveServer
from tests.client.test_cli import Ctl

NO_LIMITS = {"vms": None, "vcpus": None, "memory_mib": None, "tdx_vms": None}


def test_sync_client_quota_methods_and_typed_errors(live: LiveServer) -> None:
    live.ready_host("h")
    with live.admin() as c:
        q = c.get_quota("team")
        assert q == {"project": "team", "limits": NO_LIMITS, "usage": {"vms": 0, "vcpus": 0, "memory_mib": 0,
                     "tdx_vms": 0}, "generation": 0}
        q = c.set_quota("team", vms=1, tdx_vms=1, if_match=q["generation"])
        assert q["limits"] == {"vms": 1, "vcpus": None, "memory_mib": None, "tdx_vms": 1}
        with pytest.raises(PreconditionFailed):
            c.set_quota("team", vms=5, if_match=0)
        c.create_vm("a", 2, 2048, True, project="team")
        with pytest.raises(QuotaExceeded) as refused:
            c.create_vm("b", 2, 2048, True, project="team")
        e = refused.value
        assert isinstance(e, Forbidden) and e.code == "quota_exceeded"
        assert (e.resource, e.limit, e.usage, e.request) == ("vms", 1, 1, 1)
        c.set_quota("other", vcpus=8)
        assert [p["project"] for p in c.iter_projects(limit=1)] == ["other", "team"]
        page = c.list_projects(limit=1)
        assert page["next"] and page["items"][0]["project"] == "other"
        assert c.get_quota("team")["usage"]["vms"] == 1


def test_async_client_quota_methods(live: LiveServer) -> None:
    async def main() -> None:
        async with AsyncTdxClient(live.url, live.admin_token) as c:
            q = await c.set_quota("p", memory_mib=1024)
            assert q["limits"]["memory_mib"] == 1024 and q["generation"] == 1
            assert (await c.get_quota("p"))["generation"] == 1
            with pytest.raises(QuotaExceeded) as refused:
                await c.create_vm("big", 1, 2048, False, project="p")
            assert refused.value.resource == "memory_mib"
            assert [p["project"] async for p in c.iter_projects()] == ["p"]
            assert (await c.list_projects())["items"][0]["limits"]["memory_mib"] == 1024

    asyncio.run(main())


def test_rate_limited_carries_retry_after(live: LiveServer) -> None:
    with live.admin() as admin:
        token = admin.create_token("client", project="p")["token"]
    with TdxClient(live.url, token, retries=0) as c:
        with pytest.raises(RateLimited) as limited:
            for i in range(1000):  # the default bucket holds 100 creates
                c.create_vm(f"vm-{i}", 1, 1, False)
        assert limited.value.status == 429 and limited.value.code == "rate_limited"
        assert limited.value.retry_after is not None and limited.value.retry_after >= 1


def test_tdxctl_quota_show_set_list(live: LiveServer) -> None:
    ctl = Ctl(live)
    empty = ctl("quota", "list")
    assert empty.exit_code == 0 and "PROJECT" in empty.stdout and "no projects" in empty.stderr
    out = ctl.ok("quota", "show", "team")
    assert "vms" in out and "tdx_vms" in out
    unknown = ctl("quota", "show", "Not_A_Name")
    assert unknown.exit_code == 1 and "no project Not_A_Name" in unknown.stderr
    q = ctl.json("quota", "set", "team", "--vms", "10", "--tdx-vms", "4")
    assert q["limits"] == {"vms": 10, "vcpus": None, "memory_mib": None, "tdx_vms": 4}
    # Only the given limits change; 'none' removes one.
    q = ctl.json("quota", "set", "team", "--vms", "none", "--vcpus", "64")
    assert q["limits"] == {"vms": None, "vcpus": 64, "memory_mib": None, "tdx_vms": 4}
    assert ctl.json("quota", "show", "team") == q
    listed = ctl.ok("quota", "list")
    assert "team" in listed and "0/64" in listed and "0/4" in listed and "0/-" in listed
    assert [p["project"] for p in ctl.json("quota", "list")] == ["team"]
    assert "GENERATION" in ctl.ok("quota", "list", "-o", "wide")
    assert "generation 2" in ctl.ok("quota", "show", "team", "-o", "wide")
    bad = ctl("quota", "set", "team", "--vms", "-3")
    assert bad.exit_code == 2
    nothing = ctl("quota", "set", "team")
    assert nothing.exit_code == 2 and "nothing to set" in nothing.stderr


def test_tdxctl_quota_refusal_is_one_line(live: LiveServer) -> None:
    live.ready_host("h")
    ctl = Ctl(live)
    ctl.ok("quota", "set", "p", "--vms", "0")
    result = ctl("vms", "create", "--name", "x", "--project", "p", "--vcpus", "1", "--memory-mib", "512")
    assert result.exit_code == 1
    assert "quota_exceeded" in result.stderr and "HTTP 403" in result.stderr
