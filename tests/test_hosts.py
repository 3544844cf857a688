"""Hosts (API.md, Hosts): registration, listing, ETag/If-Match, delete, drain."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from tests.conftest import Api
from tests.helpers import all_pages, assert_problem, head_id, snapshot

HOST_FIELDS = {
    "id", "name", "labels", "vcpus", "memory_mib", "reserved_vcpus", "reserved_memory_mib", "schedulable",
    "draining", "alive", "last_heartbeat_at", "tdx", "load", "usage", "generation", "created_at", "updated_at",
}
TDX_FIELDS = {"state", "reason", "keyids_total", "keyids_used", "keyids_observed_in_use", "module_version"}


def _is_utc_time(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def _names(items: list[dict[str, Any]]) -> list[str]:
    return [h["name"] for h in items]


def test_create_host_returns_every_field_with_its_type(api: Api) -> None:
    r = api.client.post(
        "/v1/hosts",
        json={
            "name": "node-1", "vcpus": 64, "memory_mib": 262144, "labels": {"rack": "r1", "zone": "a"},
            "reserved_vcpus": 4, "reserved_memory_mib": 8192,
        },
        headers=api.admin,
    )
    assert r.status_code == 201, r.text
    host = r.json()
    assert set(host) >= HOST_FIELDS, HOST_FIELDS - set(host)
    uuid.UUID(host["id"])
    assert host["name"] == "node-1"
    assert host["labels"] == {"rack": "r1", "zone": "a"}
    assert (host["vcpus"], host["memory_mib"]) == (64, 262144)
    assert (host["reserved_vcpus"], host["reserved_memory_mib"]) == (4, 8192)
    assert host["schedulable"] is True
    assert host["draining"] is False
    assert host["alive"] is False  # no load report, no heartbeat yet
    assert host["last_heartbeat_at"] is None
    assert set(host["tdx"]) >= TDX_FIELDS
    assert host["tdx"]["state"] == "unknown"
    assert host["tdx"]["keyids_total"] == 0 and host["tdx"]["keyids_used"] == 0
    assert host["tdx"]["keyids_observed_in_use"] is None
    assert host["tdx"]["module_version"] is None
    assert host["load"] is None
    assert host["usage"] == {"vcpus": 0, "memory_mib": 0, "vms": 0}
    assert isinstance(host["generation"], int) and not isinstance(host["generation"], bool)
    assert _is_utc_time(host["created_at"]) and _is_utc_time(host["updated_at"])
    assert r.headers["etag"] == f'"{host["generation"]}"'

    got = api.client.get("/v1/hosts/node-1", headers=api.admin)
    assert got.status_code == 200
    assert got.json() == host


def test_host_after_load_has_load_and_tdx_fields(api: Api) -> None:
    api.create_host("node-1")
    body = api.report_load("node-1", "ready", keyids=31)
    host = api.client.get("/v1/hosts/node-1", headers=api.admin).json()
    assert host["alive"] is True
    assert _is_utc_time(host["last_heartbeat_at"])
    assert host["load"]["id"] == body["load_id"]
    assert host["load"]["boot_id"] == body["boot_id"]
    assert host["load"]["kernel"] == body["kernel"]
    assert _is_utc_time(host["load"]["reported_at"])
    assert host["tdx"] == {
        "state": "ready", "reason": None, "reason_code": None, "remedy": None, "keyids_total": 31,
        "keyids_used": 0, "keyids_observed_in_use": None, "keyids_free": 31, "module_version": "1.5.06",
        "module_healthy": None, "configured": None, "next_load": None, "pamt_mib": 0, "tds_building": 0,
        "attestation_ready": None, "vmm": None, "vmm_detail": None,
    }


def test_duplicate_name_is_409_and_changes_nothing(api: Api) -> None:
    api.create_host("node-1", vcpus=8)
    before = snapshot(api)
    r = api.client.post("/v1/hosts", json={"name": "node-1", "vcpus": 16, "memory_mib": 1024}, headers=api.admin)
    assert_problem(r, 409, "host_name_taken")
    assert snapshot(api) == before


def test_list_filters_by_tdx_state_schedulable_and_labels(api: Api) -> None:
    api.ready_host("a-ready", "ready", labels={"zone": "a", "gpu": "yes"})
    api.ready_host("b-disabled", "disabled", labels={"zone": "a"})
    api.ready_host("c-failed", "failed", labels={"zone": "b", "gpu": "yes"})
    api.create_host("d-unknown", labels={"zone": "b"})
    r = api.client.patch("/v1/hosts/c-failed", json={"schedulable": False}, headers=api.admin)
    assert r.status_code == 200, r.text

    def names(**params: Any) -> list[str]:
        return _names(all_pages(api, "/v1/hosts", **params))

    assert names() == ["a-ready", "b-disabled", "c-failed", "d-unknown"]
    assert names(tdx_state="ready") == ["a-ready"]
    assert names(tdx_state="disabled") == ["b-disabled"]
    assert names(tdx_state="failed") == ["c-failed"]
    assert names(tdx_state="unknown") == ["d-unknown"]
    assert names(tdx_state="unsupported") == []
    assert names(schedulable="false") == ["c-failed"]
    assert names(schedulable="true") == ["a-ready", "b-disabled", "d-unknown"]
    assert names(label="zone=a") == ["a-ready", "b-disabled"]
    assert names(label=["zone=a", "gpu=yes"]) == ["a-ready"]  # repeated: AND
    assert names(label=["zone=b", "gpu=yes"]) == ["c-failed"]
    assert names(label=["zone=a", "zone=b"]) == []
    assert names(label="gpu=no") == []
    assert names(label="zone=b", schedulable="true") == ["d-unknown"]
    assert names(label="zone=a", tdx_state="disabled") == ["b-disabled"]


def test_list_filter_values_are_validated(api: Api) -> None:
    assert_problem(api.client.get("/v1/hosts?tdx_state=maybe", headers=api.admin), 422, "validation_error")
    assert_problem(api.client.get("/v1/hosts?schedulable=perhaps", headers=api.admin), 422, "validation_error")
    assert_problem(api.client.get("/v1/hosts?label=zone", headers=api.admin), 422, "validation_error")
    assert_problem(api.client.get("/v1/hosts?limit=0", headers=api.admin), 422, "validation_error")
    assert_problem(api.client.get("/v1/hosts?limit=501", headers=api.admin), 422, "validation_error")
    assert_problem(api.client.get("/v1/hosts?cursor=%25%25%25", headers=api.admin), 400, "invalid_cursor")


def test_labels_are_replaced_by_patch_and_filtered_on_new_values(api: Api) -> None:
    api.create_host("node-1", labels={"zone": "a"})
    r = api.client.patch("/v1/hosts/node-1", json={"labels": {"zone": "b", "ssd": "true"}}, headers=api.admin)
    assert r.status_code == 200, r.text
    assert r.json()["labels"] == {"zone": "b", "ssd": "true"}
    assert _names(all_pages(api, "/v1/hosts", label="zone=a")) == []
    assert _names(all_pages(api, "/v1/hosts", label="zone=b")) == ["node-1"]


def test_cursor_pagination_limit_next_and_last_page(api: Api) -> None:
    for i in range(7):
        api.create_host(f"h-{i:02d}")
    r = api.client.get("/v1/hosts", params={"limit": 3}, headers=api.admin)
    page1 = r.json()
    assert _names(page1["items"]) == ["h-00", "h-01", "h-02"]
    assert isinstance(page1["next"], str)
    page2 = api.client.get("/v1/hosts", params={"limit": 3, "cursor": page1["next"]}, headers=api.admin).json()
    assert _names(page2["items"]) == ["h-03", "h-04", "h-05"]
    page3 = api.client.get("/v1/hosts", params={"limit": 3, "cursor": page2["next"]}, headers=api.admin).json()
    assert _names(page3["items"]) == ["h-06"]
    assert page3["next"] is None
    exact = api.client.get("/v1/hosts", params={"limit": 7}, headers=api.admin).json()
    assert len(exact["items"]) == 7 and exact["next"] is None
    default = api.client.get("/v1/hosts", headers=api.admin).json()
    assert len(default["items"]) == 7 and default["next"] is None


def test_default_limit_is_100(api: Api) -> None:
    for i in range(101):
        r = api.client.post("/v1/hosts", json={"name": f"h{i:03d}", "vcpus": 1, "memory_mib": 1}, headers=api.admin)
        assert r.status_code == 201
    page = api.client.get("/v1/hosts", headers=api.admin).json()
    assert len(page["items"]) == 100 and page["next"] is not None


def test_pages_stay_correct_while_rows_are_inserted(api: Api) -> None:
    existing = [f"h-{i:02d}" for i in range(0, 20, 2)]
    for name in existing:
        api.create_host(name)
    seen: list[str] = []
    cursor: str | None = None
    inserted = iter(["a-first", "h-03", "h-09", "h-13", "z-last", "h-00a", "h-17"])
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = api.client.get("/v1/hosts", params=params, headers=api.admin).json()
        seen.extend(_names(page["items"]))
        cursor = page["next"]
        if cursor is None:
            break
        # Between pages, other clients register hosts before, inside and after the cursor.
        for _ in range(2):
            name = next(inserted, None)
            if name:
                api.create_host(name)
    assert len(seen) == len(set(seen)), f"duplicates: {seen}"
    assert set(existing) <= set(seen), f"skipped: {set(existing) - set(seen)}"
    assert seen == sorted(seen)


def test_get_unknown_host_is_404(api: Api) -> None:
    assert_problem(api.client.get("/v1/hosts/nope", headers=api.admin), 404, "host_not_found")


def test_get_has_etag_of_generation(api: Api) -> None:
    api.create_host("node-1")
    r = api.client.get("/v1/hosts/node-1", headers=api.admin)
    assert r.headers["etag"] == f'"{r.json()["generation"]}"'


def test_patch_with_matching_if_match_bumps_generation(api: Api) -> None:
    api.create_host("node-1")
    r = api.client.get("/v1/hosts/node-1", headers=api.admin)
    etag, gen = r.headers["etag"], r.json()["generation"]
    r = api.client.patch(
        "/v1/hosts/node-1",
        json={"schedulable": False, "labels": {"a": "b"}, "reserved_vcpus": 2, "reserved_memory_mib": 512},
        headers={**api.admin, "If-Match": etag},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["generation"] == gen + 1
    assert r.headers["etag"] == f'"{gen + 1}"'
    assert body["schedulable"] is False
    assert body["labels"] == {"a": "b"}
    assert (body["reserved_vcpus"], body["reserved_memory_mib"]) == (2, 512)
    assert api.client.get("/v1/hosts/node-1", headers=api.admin).json() == body
    # Without If-Match the update is unconditional, and bumps again.
    r = api.client.patch("/v1/hosts/node-1", json={"schedulable": True}, headers=api.admin)
    assert r.status_code == 200 and r.json()["generation"] == gen + 2


def test_patch_with_stale_if_match_is_412_and_changes_nothing(api: Api) -> None:
    api.create_host("node-1")
    stale = api.client.get("/v1/hosts/node-1", headers=api.admin).headers["etag"]
    assert api.client.patch("/v1/hosts/node-1", json={"labels": {"x": "1"}}, headers=api.admin).status_code == 200
    before = snapshot(api)
    for if_match in (stale, '"999"', "garbage"):
        r = api.client.patch(
            "/v1/hosts/node-1", json={"schedulable": False}, headers={**api.admin, "If-Match": if_match}
        )
        assert_problem(r, 412, "precondition_failed")
        assert snapshot(api) == before


def test_patch_unknown_host_is_404(api: Api) -> None:
    r = api.client.patch("/v1/hosts/nope", json={"schedulable": False}, headers=api.admin)
    assert_problem(r, 404, "host_not_found")


def test_patch_reservation_beyond_capacity_is_refused(api: Api) -> None:
    api.create_host("node-1", vcpus=4)
    before = snapshot(api)
    r = api.client.patch("/v1/hosts/node-1", json={"reserved_vcpus": 5}, headers=api.admin)
    assert_problem(r, 422, "validation_error")
    assert snapshot(api) == before


def test_delete_then_404(api: Api) -> None:
    api.create_host("node-1")
    api.create_host("node-2")
    r = api.client.delete("/v1/hosts/node-1", headers=api.admin)
    assert r.status_code == 204
    assert r.content == b""
    assert_problem(api.client.get("/v1/hosts/node-1", headers=api.admin), 404, "host_not_found")
    assert_problem(api.client.delete("/v1/hosts/node-1", headers=api.admin), 404, "host_not_found")
    assert _names(all_pages(api, "/v1/hosts")) == ["node-2"]
    # The name is free again.
    api.create_host("node-1")


def test_drain_sets_draining_and_stops_new_placements(api: Api) -> None:
    api.ready_host("node-1")
    gen = api.client.get("/v1/hosts/node-1", headers=api.admin).json()["generation"]
    r = api.client.post("/v1/hosts/node-1/drain", headers=api.admin)
    assert r.status_code == 200, r.text
    assert r.json()["draining"] is True
    assert r.json()["generation"] == gen + 1
    assert api.client.get("/v1/hosts/node-1", headers=api.admin).json()["draining"] is True
    vm = api.create_vm(name="after-drain")
    assert vm.status_code == 201, vm.text
    assert vm.json()["status"] == "pending"
    assert vm.json()["host"] is None
    assert_problem(api.client.post("/v1/hosts/nope/drain", headers=api.admin), 404, "host_not_found")


def test_host_with_active_vms_cannot_be_deleted(api: Api) -> None:
    api.ready_host("node-1")
    vm = api.create_vm(name="td-1")
    assert vm.status_code == 201, vm.text
    assert vm.json()["host"] == "node-1"
    before = snapshot(api)
    assert_problem(api.client.delete("/v1/hosts/node-1", headers=api.admin), 409, "host_not_empty")
    assert snapshot(api) == before
    # Once the VM is gone (never started: deleted at once), the host may go.
    r = api.client.delete(f"/v1/vms/{vm.json()['id']}", headers=api.admin)
    assert r.status_code == 202, r.text
    assert api.client.delete("/v1/hosts/node-1", headers=api.admin).status_code == 204


def test_host_operations_write_events(api: Api) -> None:
    start = head_id(api)
    api.create_host("node-1")
    api.client.patch("/v1/hosts/node-1", json={"schedulable": False}, headers=api.admin)
    api.client.post("/v1/hosts/node-1/drain", headers=api.admin)
    api.client.delete("/v1/hosts/node-1", headers=api.admin)
    r = api.client.get("/v1/events", params={"after": start, "subject": "node-1"}, headers=api.admin)
    kinds = [e["kind"] for e in r.json()["items"]]
    assert kinds == ["host.created", "host.updated", "host.cordoned", "host.draining", "host.deleted"]


# ---- a PATCH that changes nothing, and reservations under placed VMs (issue 9) ----------------


def test_a_patch_that_changes_nothing_keeps_the_generation_and_emits_nothing(api: Api) -> None:
    api.create_host("node-1", labels={"zone": "a"}, reserved_vcpus=2)
    r = api.client.get("/v1/hosts/node-1", headers=api.admin)
    body, etag = r.json(), r.headers["etag"]
    before_events = head_id(api)
    for same in (
        {},
        {"labels": {"zone": "a"}},
        {"schedulable": True, "draining": False},
        {"reserved_vcpus": 2, "reserved_memory_mib": 0},
        {"cpu_allocation_ratio": body["cpu_allocation_ratio"]},
    ):
        r = api.client.patch("/v1/hosts/node-1", json=same, headers={**api.admin, "If-Match": etag})
        assert r.status_code == 200, r.text
        assert r.headers["etag"] == etag
        assert r.json() == body
    assert head_id(api) == before_events
    assert api.client.get("/v1/hosts/node-1", headers=api.admin).json() == body
    # A stale If-Match is still refused, even for a no-op.
    r = api.client.patch("/v1/hosts/node-1", json={}, headers={**api.admin, "If-Match": '"999"'})
    assert_problem(r, 412, "precondition_failed")
    # A real change names only what changed.
    r = api.client.patch(
        "/v1/hosts/node-1", json={"labels": {"zone": "a"}, "schedulable": False},
        headers={**api.admin, "If-Match": etag},
    )
    assert r.json()["generation"] == body["generation"] + 1
    updated = api.client.get("/v1/events", params={"kind": "host.updated"}, headers=api.admin).json()["items"]
    assert [e["data"]["changed"] for e in updated] == [["schedulable"]]


def _full_host(api: Api) -> dict[str, Any]:
    """A host with 4 GiB and 4 vCPUs (ratio 1), all taken by one placed VM."""
    api.ready_host("node-1", vcpus=4, memory_mib=4096, cpu_allocation_ratio=1.0)
    r = api.create_vm(name="big", vcpus=4, memory_mib=4096, tdx=False)
    assert r.status_code == 201 and r.json()["status"] == "scheduled", r.text
    return dict(api.client.get("/v1/hosts/node-1", headers=api.admin).json())


def test_a_reservation_that_would_leave_placed_vms_over_capacity_is_409(api: Api) -> None:
    _full_host(api)
    before = snapshot(api)
    events = head_id(api)
    r = api.client.patch("/v1/hosts/node-1", json={"reserved_memory_mib": 4096}, headers=api.admin)
    problem = assert_problem(r, 409, "reservation_exceeds_free")
    assert (problem["resource"], problem["requested"], problem["in_use"], problem["capacity"]) == (
        "memory_mib", 4096, 4096, 4096
    )
    r = api.client.patch("/v1/hosts/node-1", json={"reserved_vcpus": 1, "labels": {"a": "b"}}, headers=api.admin)
    problem = assert_problem(r, 409, "reservation_exceeds_free")
    assert (problem["resource"], problem["requested"], problem["in_use"], problem["capacity"]) == ("vcpus", 1, 4, 4)
    r = api.client.patch("/v1/hosts/node-1", json={"cpu_allocation_ratio": 0.5}, headers=api.admin)
    problem = assert_problem(r, 409, "allocation_ratio_below_usage")
    assert (problem["requested"], problem["in_use"], problem["limit"]) == (0.5, 4, 2)
    assert snapshot(api) == before and head_id(api) == events


def test_a_reservation_within_what_is_free_is_accepted(api: Api) -> None:
    api.ready_host("node-1", vcpus=4, memory_mib=4096, cpu_allocation_ratio=1.0)
    assert api.create_vm(name="half", vcpus=2, memory_mib=2048, tdx=False).json()["status"] == "scheduled"
    r = api.client.patch(
        "/v1/hosts/node-1", json={"reserved_memory_mib": 2048, "reserved_vcpus": 2}, headers=api.admin
    )
    assert r.status_code == 200, r.text
    assert (r.json()["reserved_memory_mib"], r.json()["reserved_vcpus"]) == (2048, 2)
    # Nothing is left: the next VM stays pending.
    assert api.create_vm(name="more", vcpus=1, memory_mib=1, tdx=False).json()["status"] == "pending"


def test_loosening_a_host_that_is_over_capacity_already_is_accepted(api: Api) -> None:
    """A host over capacity already (written behind the API's back here) may still be loosened."""
    from sqlalchemy import update

    from service.models import Host

    api.ready_host("node-1", vcpus=4, memory_mib=4096, cpu_allocation_ratio=1.0, reserved_memory_mib=1024)
    api.client.app.state.ctx.db.run_sync(  # type: ignore[attr-defined]
        lambda s: s.execute(update(Host).values(used_memory_mib=3584, used_vcpus=6))
    )
    for loosen in ({"reserved_memory_mib": 512}, {"cpu_allocation_ratio": 1.2}, {"labels": {"a": "b"}}):
        r = api.client.patch("/v1/hosts/node-1", json=loosen, headers=api.admin)
        assert r.status_code == 200, r.text
    r = api.client.patch("/v1/hosts/node-1", json={"reserved_memory_mib": 600}, headers=api.admin)
    assert_problem(r, 409, "reservation_exceeds_free")
