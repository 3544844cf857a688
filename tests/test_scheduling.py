"""Scheduling behaviour through the API: explanations, the pending queue, preview and capacity."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import Api


def _wait_event(api: Api, kind: str, subject: str, after: int = 0) -> dict[str, Any]:
    """Long-poll until an event of this kind about this subject is written (the queue runs apart)."""
    for _ in range(3):
        page = api.client.get(
            "/v1/events", params={"after": after, "kind": kind, "subject": subject, "wait": 10}, headers=api.admin
        ).json()
        if page["items"]:
            return dict(page["items"][0])
        after = page["last_id"]
    raise AssertionError(f"no {kind} event for {subject}")


def _vm(api: Api, vm_id: str) -> dict[str, Any]:
    return dict(api.client.get(f"/v1/vms/{vm_id}", headers=api.admin).json())


def test_explanation_for_a_mixed_fleet(api: Api) -> None:
    for i in range(7):
        api.ready_host(f"off-{i}", "disabled")
    for i in range(3):
        api.ready_host(f"bad-{i}", "failed")
    for i in range(2):
        api.ready_host(f"small-{i}", "ready", memory_mib=6144, reserved_memory_mib=2048)
    vm = api.create_vm(name="big", memory_mib=8192, vcpus=2).json()
    assert vm["status"] == "pending"
    assert vm["reasons"] == {"tdx_disabled": 7, "tdx_failed": 3, "insufficient_memory": 2}
    assert vm["explanation"] == (
        "0/12 hosts fit: 7 tdx_disabled (not opted in at kvm_intel load), 3 tdx_failed, "
        "2 insufficient_memory (needs 8192 MiB, most free 4096 MiB)"
    )
    events = api.client.get("/v1/events", params={"kind": "vm.unschedulable"}, headers=api.admin).json()
    assert events["items"][0]["data"]["reasons"] == vm["reasons"]


def test_reason_counts_add_up_to_the_hosts_considered(api: Api) -> None:
    api.create_host("fresh")
    api.ready_host("u", "unsupported")
    api.ready_host("k", "ready", keyids=1)
    api.create_vm(name="first")  # takes k's only KeyID
    api.ready_host("c", "ready")
    api.client.patch("/v1/hosts/c", json={"schedulable": False}, headers=api.admin)
    vm = api.create_vm(name="second").json()
    assert vm["reasons"] == {
        "tdx_state_unknown": 1, "tdx_unsupported": 1, "keyids_exhausted": 1, "host_cordoned": 1,
    }
    assert vm["explanation"].startswith("0/4 hosts fit: ")


def test_pending_vm_is_placed_when_capacity_is_freed(api: Api) -> None:
    api.ready_host("h", keyids=1)
    first = api.create_vm(name="first").json()
    waiting = api.create_vm(name="waiting").json()
    assert waiting["status"] == "pending"
    head = api.client.get("/v1/events", headers=api.admin).json()["head_id"]
    api.client.delete(f"/v1/vms/{first['id']}", headers=api.admin)
    event = _wait_event(api, "vm.scheduled", waiting["id"], head)
    assert event["data"]["host"] == "h"
    placed = _vm(api, waiting["id"])
    assert (placed["status"], placed["host"], placed["reasons"]) == ("scheduled", "h", {})
    # One placement by POST /v1/vms, one by the queue (counted just after its commit, which the
    # event already showed); the waiting VM's create counted as pending.
    for _ in range(100):
        metrics = api.client.get("/metrics").text
        if 'tdx_placements_total{result="scheduled"} 2.0' in metrics:
            break
        time.sleep(0.05)
    assert 'tdx_placements_total{result="scheduled"} 2.0' in metrics
    assert 'tdx_placements_total{result="pending"} 1.0' in metrics


def test_pending_vm_is_placed_when_a_host_becomes_ready(api: Api) -> None:
    api.ready_host("plain", "disabled")
    waiting = api.create_vm(name="td").json()
    assert waiting["status"] == "pending"
    api.ready_host("newcomer", "ready")
    assert _wait_event(api, "vm.scheduled", waiting["id"])["data"]["host"] == "newcomer"


def test_queue_serves_the_highest_priority_first(api: Api) -> None:
    api.ready_host("h", keyids=1)
    first = api.create_vm(name="first").json()
    low = api.create_vm(name="low", priority=0).json()
    high = api.create_vm(name="high", priority=10).json()
    assert low["status"] == high["status"] == "pending"
    api.client.delete(f"/v1/vms/{first['id']}", headers=api.admin)
    _wait_event(api, "vm.scheduled", high["id"])
    assert _vm(api, low["id"])["status"] == "pending"


def test_pending_vm_fails_at_its_deadline_with_its_last_explanation(api: Api) -> None:
    api.ready_host("plain", "disabled")
    vm = api.create_vm(name="td", schedule_timeout_s=1).json()
    event = _wait_event(api, "vm.failed", vm["id"])
    failed = _vm(api, vm["id"])
    assert failed["status"] == "failed"
    assert "tdx_disabled" in failed["status_detail"] and "tdx_disabled" in event["data"]["detail"]
    assert failed["explanation"] == vm["explanation"]


def test_preview_changes_nothing_and_ranks_candidates(api: Api) -> None:
    api.ready_host("big", memory_mib=262144)
    api.ready_host("small", memory_mib=16384)
    api.ready_host("off", "disabled")
    head = api.client.get("/v1/events", headers=api.admin).json()["head_id"]
    r = api.client.post("/v1/schedule/preview", json={"name": "p", "vcpus": 1, "memory_mib": 1024, "tdx": True},
                        headers=api.admin)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["host"] == "big"
    assert [c["host"] for c in body["candidates"]] == ["big", "small"]
    assert body["candidates"][0]["score"] > body["candidates"][1]["score"]
    assert body["reasons"] == {"tdx_disabled": 1}
    assert body["explanation"] == "2/3 hosts fit: 1 tdx_disabled (not opted in at kvm_intel load)"
    assert api.client.get("/v1/events", headers=api.admin).json()["head_id"] == head
    assert api.client.get("/v1/vms", headers=api.admin).json()["items"] == []
    client = api.token("client", project="p")
    assert api.client.post("/v1/schedule/preview", json={"name": "p", "vcpus": 1, "memory_mib": 1, "tdx": False},
                           headers=client).status_code == 200
    reader = api.token("reader")
    assert api.client.post("/v1/schedule/preview", json={"name": "p", "vcpus": 1, "memory_mib": 1, "tdx": False},
                           headers=reader).status_code == 403


def test_capacity_totals_stranded_keyids_and_exact_fit(api: Api) -> None:
    api.ready_host("full", vcpus=8, memory_mib=4096, keyids=4, labels={"role": "full"}, cpu_allocation_ratio=1.0)
    api.ready_host("roomy", vcpus=8, memory_mib=16384, keyids=4, cpu_allocation_ratio=1.0)
    api.ready_host("plain", "disabled", vcpus=4, memory_mib=8192, cpu_allocation_ratio=1.0)
    assert api.create_vm(name="filler", vcpus=2, memory_mib=4096, selector={"role": "full"}).json()["host"] == "full"
    r = api.client.get("/v1/capacity", headers=api.admin)
    assert r.status_code == 200, r.text
    cap = r.json()
    ready = cap["by_tdx_state"]["ready"]
    assert ready["hosts"] == 2 and ready["hosts_alive"] == 2
    assert (ready["keyids_total"], ready["keyids_used"], ready["keyids_free"]) == (8, 1, 7)
    assert ready["keyids_stranded"] == 3  # "full" has KeyIDs left but no memory
    assert ready["memory_mib_free"] == 16384 and ready["vcpus_free"] == 14
    assert cap["by_tdx_state"]["disabled"]["hosts"] == 1
    assert cap["by_tdx_state"]["failed"]["hosts"] == 0
    assert cap["totals"]["hosts"] == 3 and cap["fit"] is None
    # 2 vCPUs x 3072 MiB TDX: roomy fits min(8/2, 16384//3072, 4) = 4; full fits 0; plain is not ready.
    fit = api.client.get("/v1/capacity?vcpus=2&memory_mib=3072&tdx=true", headers=api.admin).json()["fit"]
    assert fit == {"vcpus": 2, "memory_mib": 3072, "tdx": True, "memory_mib_charged": 3072, "fits_now": 4}
    # Non-TDX: roomy 4 + plain min(4/2, 8192//3072) = 2.
    fit = api.client.get("/v1/capacity?vcpus=2&memory_mib=3072&tdx=false", headers=api.admin).json()["fit"]
    assert fit["fits_now"] == 6


@pytest.mark.parametrize("query", ["vcpus=2", "memory_mib=5", "vcpus=0&memory_mib=5", "vcpus=x&memory_mib=1"])
def test_capacity_rejects_half_a_size(api: Api, query: str) -> None:
    r = api.client.get(f"/v1/capacity?{query}", headers=api.admin)
    assert r.status_code == 422 and r.json()["code"] == "validation_error"


def test_stale_host_gets_no_vm(api: Api) -> None:
    api.ready_host("h")
    ctx = api.client.app.state.ctx  # type: ignore[attr-defined]
    from sqlalchemy import update

    from service.models import Host

    ctx.db.run_sync(lambda s: s.execute(update(Host).values(last_heartbeat_at=None)))
    vm = api.create_vm(name="x").json()
    assert vm["reasons"] == {"host_stale": 1}
