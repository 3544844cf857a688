"""VM requests through the real app: creation, visibility, deletion, agent reports, idempotency."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.conftest import Api
from tests.helpers import assert_problem


def _host(api: Api, name: str) -> dict[str, Any]:
    r = api.client.get(f"/v1/hosts/{name}", headers=api.admin)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _vm(api: Api, vm_id: str, headers: dict[str, str] | None = None) -> Any:
    return api.client.get(f"/v1/vms/{vm_id}", headers=headers or api.admin)


def test_created_vm_has_every_contract_field(api: Api) -> None:
    api.ready_host("h1")
    r = api.create_vm(name="web-1", vcpus=4, memory_mib=4096, selector={}, priority=5)
    assert r.status_code == 201, r.text
    vm = r.json()
    for key in (
        "id", "name", "project", "vcpus", "memory_mib", "tdx", "selector", "anti_affinity_group", "priority",
        "status", "host", "explanation", "reasons", "deadline", "generation", "created_at", "updated_at",
    ):
        assert key in vm
    assert uuid.UUID(vm["id"])
    assert (vm["status"], vm["host"], vm["project"], vm["priority"]) == ("scheduled", "h1", "default", 5)
    assert r.headers["location"] == f"/v1/vms/{vm['id']}"
    assert _vm(api, vm["id"]).json() == vm


def test_placement_claims_usage_and_a_keyid(api: Api) -> None:
    api.ready_host("h1", keyids=4)
    api.create_vm(name="a", vcpus=3, memory_mib=1000, tdx=True)
    api.create_vm(name="b", vcpus=2, memory_mib=500, tdx=False)
    host = _host(api, "h1")
    assert host["usage"] == {"vcpus": 5, "memory_mib": 1500, "vms": 2}
    assert host["tdx"]["keyids_used"] == 1


def test_nothing_fits_gives_pending_with_reasons(api: Api) -> None:
    api.ready_host("plain", "disabled")
    r = api.create_vm(name="td")
    assert r.status_code == 201
    vm = r.json()
    assert vm["status"] == "pending" and vm["host"] is None
    assert vm["reasons"] == {"tdx_disabled": 1}
    assert vm["explanation"] == "0/1 hosts fit: 1 tdx_disabled (not opted in at kvm_intel load)"


def test_tdx_vm_never_lands_on_a_host_that_did_not_opt_in(api: Api) -> None:
    for name, state in [("u", "unsupported"), ("d", "disabled"), ("f", "failed"), ("n", "no_kvm")]:
        api.ready_host(name, state)
    api.create_host("fresh")  # no load report at all
    assert api.create_vm(name="td").json()["status"] == "pending"
    # A non-TDX VM can run on any host whose kvm_intel is loaded.
    plain = api.create_vm(name="plain", tdx=False).json()
    assert plain["status"] == "scheduled" and plain["host"] in {"u", "d", "f"}


def test_memory_is_never_overcommitted_and_vcpus_follow_the_allocation_ratio(api: Api) -> None:
    api.ready_host("h", vcpus=4, memory_mib=4096, cpu_allocation_ratio=2.0, keyids=100)
    assert api.create_vm(name="a", vcpus=6, memory_mib=1024, tdx=False).json()["status"] == "scheduled"
    second = api.create_vm(name="b", vcpus=3, memory_mib=1024).json()
    assert second["reasons"] == {"insufficient_vcpus": 1}
    assert api.create_vm(name="c", vcpus=2, memory_mib=3072).json()["status"] == "scheduled"
    third = api.create_vm(name="d", vcpus=1, memory_mib=1).json()
    assert third["status"] == "pending"
    assert third["explanation"] == "0/1 hosts fit: 1 insufficient_vcpus (needs 1 vCPUs, most free 0)"


def test_a_td_never_gets_more_vcpus_than_the_host_has_cpus(api: Api) -> None:
    # KVM caps a TD at the present CPUs whatever the allocation ratio; an ordinary VM may over-commit.
    api.create_host("h", vcpus=8, memory_mib=65536, cpu_allocation_ratio=4.0)
    api.report_load("h", "ready", 15, present_cpus=8)
    td = api.create_vm(name="big-td", vcpus=9, memory_mib=1024).json()
    assert td["status"] == "pending"
    assert td["reasons"] == {"td_vcpus_exceed_host": 1}
    assert td["explanation"] == (
        "0/1 hosts fit: 1 td_vcpus_exceed_host (a TD gets at most the host's CPUs: needs 9 vCPUs, largest host has 8)"
    )
    assert api.create_vm(name="td", vcpus=8, memory_mib=1024).json()["status"] == "scheduled"
    assert api.create_vm(name="vm", vcpus=9, memory_mib=1024, tdx=False).json()["status"] == "scheduled"


def test_the_td_cap_falls_back_to_the_registered_cpus(api: Api) -> None:
    api.ready_host("h", vcpus=4, memory_mib=65536, cpu_allocation_ratio=8.0)  # no present_cpus reported
    assert api.create_vm(name="td", vcpus=5, memory_mib=64).json()["reasons"] == {"td_vcpus_exceed_host": 1}


def test_keyids_observed_in_use_count_against_placement(api: Api) -> None:
    # TDs started outside the control plane (or leaked KeyIDs) hold KeyIDs too: free = total -
    # max(claimed, observed in use).
    load = api.ready_host("h", keyids=3)
    assert api.create_vm(name="t0", vcpus=1, memory_mib=64).json()["status"] == "scheduled"
    r = api.client.post("/v1/hosts/h/heartbeat", json={"load_id": load["load_id"], "keyids_in_use": 3},
                        headers=api.admin)
    assert r.json()["tdx"]["keyids_free"] == 0
    vm = api.create_vm(name="t1", vcpus=1, memory_mib=64).json()
    assert vm["reasons"] == {"keyids_exhausted": 1}
    assert vm["explanation"] == (
        "0/1 hosts fit: 1 keyids_exhausted (KeyIDs free = total - max(claimed, observed in use), "
        "at best 3 - max(1, 3) = 0)"
    )
    capacity = api.client.get("/v1/capacity", params={"vcpus": 1, "memory_mib": 64, "tdx": "true"},
                              headers=api.admin).json()
    assert (capacity["by_tdx_state"]["ready"]["keyids_free"], capacity["fit"]["fits_now"]) == (0, 0)
    # The agent sees the outside TD gone: the KeyID is free again.
    api.client.post("/v1/hosts/h/heartbeat", json={"load_id": load["load_id"], "keyids_in_use": 1}, headers=api.admin)
    assert api.create_vm(name="t2", vcpus=1, memory_mib=64).json()["status"] == "scheduled"


def test_one_keyid_per_tdx_vm_bounded_by_the_load(api: Api) -> None:
    api.ready_host("h", keyids=2)
    statuses = [api.create_vm(name=f"t{i}", vcpus=1, memory_mib=64).json()["status"] for i in range(3)]
    assert statuses == ["scheduled", "scheduled", "pending"]
    assert api.create_vm(name="plain", tdx=False, vcpus=1, memory_mib=64).json()["status"] == "scheduled"
    assert _host(api, "h")["tdx"]["keyids_used"] == 2


def test_cordoned_and_draining_hosts_get_no_new_vm(api: Api) -> None:
    api.ready_host("c")
    api.ready_host("d")
    r = api.client.patch("/v1/hosts/c", json={"schedulable": False}, headers=api.admin)
    assert r.status_code == 200
    assert api.client.post("/v1/hosts/d/drain", headers=api.admin).status_code == 200
    vm = api.create_vm(name="x").json()
    assert vm["status"] == "pending"
    assert vm["reasons"] == {"host_cordoned": 1, "host_draining": 1}


def test_selector_and_anti_affinity(api: Api) -> None:
    api.ready_host("a", labels={"zone": "z1"})
    api.ready_host("b", labels={"zone": "z2"})
    first = api.create_vm(name="s1", selector={"zone": "z2"}, anti_affinity_group="db").json()
    assert first["host"] == "b"
    second = api.create_vm(name="s2", anti_affinity_group="db").json()
    assert second["host"] == "a"
    third = api.create_vm(name="s3", anti_affinity_group="db").json()
    assert third["status"] == "pending"
    assert third["reasons"] == {"anti_affinity": 2}
    fourth = api.create_vm(name="s4", selector={"zone": "z9"}).json()
    assert fourth["reasons"] == {"selector_mismatch": 2}
    assert "selector zone=z9" in fourth["explanation"]


def test_non_tdx_vm_prefers_a_host_that_is_not_tdx_ready(api: Api) -> None:
    api.ready_host("tdx", "ready", vcpus=64, memory_mib=512 * 1024)
    api.ready_host("plain", "disabled", vcpus=8, memory_mib=16 * 1024)
    for i in range(5):
        assert api.create_vm(name=f"p{i}", tdx=False, vcpus=1, memory_mib=1024).json()["host"] == "plain"
    assert api.create_vm(name="big", tdx=False, vcpus=1, memory_mib=64 * 1024).json()["host"] == "tdx"


def test_spread_prefers_the_emptier_host(api: Api) -> None:
    api.ready_host("small", memory_mib=16384)
    api.ready_host("large", memory_mib=262144)
    assert api.create_vm(name="a", memory_mib=1024).json()["host"] == "large"


def test_client_sees_only_its_own_project(api: Api) -> None:
    api.ready_host("h")
    alice = api.token("client", project="alice")
    bob = api.token("client", project="bob")
    a_vm = api.create_vm(headers=alice, name="a1").json()
    assert a_vm["project"] == "alice"
    b_vm = api.create_vm(headers=bob, name="b1").json()
    assert _vm(api, a_vm["id"], bob).status_code == 404
    assert _vm(api, a_vm["id"], bob).json()["code"] == "vm_not_found"
    assert api.client.delete(f"/v1/vms/{a_vm['id']}", headers=bob).status_code == 404
    listed = api.client.get("/v1/vms", headers=bob).json()["items"]
    assert [v["id"] for v in listed] == [b_vm["id"]]
    assert api.client.get("/v1/vms?project=alice", headers=bob).json()["items"] == []
    other = api.create_vm(headers=alice, name="x", project="bob")
    assert other.status_code == 403
    assert api.client.get("/v1/vms", headers=api.admin).json()["items"].__len__() == 2


def test_list_filters_and_cursor_pagination(api: Api) -> None:
    api.ready_host("h", keyids=100)
    ids = [api.create_vm(name=f"v{i}", tdx=i % 2 == 0, vcpus=1, memory_mib=64).json()["id"] for i in range(7)]
    seen: list[str] = []
    url = "/v1/vms?limit=3"
    while url:
        page = api.client.get(url, headers=api.admin).json()
        seen += [v["id"] for v in page["items"]]
        if page["next"]:
            api.create_vm(name="late", vcpus=1, memory_mib=64)  # inserted between pages
        url = f"/v1/vms?limit=3&cursor={page['next']}" if page["next"] else ""
    assert seen[:7] == ids and len(seen) == len(set(seen))
    tdx_only = api.client.get("/v1/vms?tdx=true&limit=500", headers=api.admin).json()["items"]
    assert {v["id"] for v in tdx_only} >= {ids[0], ids[2], ids[4], ids[6]}
    assert all(v["tdx"] for v in tdx_only)
    on_h = api.client.get("/v1/vms?host=h&status=scheduled", headers=api.admin).json()["items"]
    assert all(v["host"] == "h" and v["status"] == "scheduled" for v in on_h)


def test_status_filter_repeats_for_any_of_several(api: Api) -> None:
    api.ready_host("h", keyids=1)
    placed = api.create_vm(name="p").json()
    waiting = api.create_vm(name="w").json()
    gone = api.create_vm(name="g", tdx=False).json()
    assert api.client.delete(f"/v1/vms/{gone['id']}", headers=api.admin).json()["status"] == "deleted"

    def listed(query: str) -> set[str]:
        r = api.client.get(f"/v1/vms?{query}", headers=api.admin)
        assert r.status_code == 200, r.text
        return {v["id"] for v in r.json()["items"]}

    assert listed("status=pending&status=scheduled") == {placed["id"], waiting["id"]}
    assert listed("status=deleted") == {gone["id"]}
    assert listed("status=deleted&status=deleted&status=pending") == {gone["id"], waiting["id"]}
    assert listed("") == {placed["id"], waiting["id"], gone["id"]}
    assert_problem(api.client.get("/v1/vms?status=pending&status=gone", headers=api.admin), 422, "validation_error")


def test_delete_pending_and_scheduled_vms_at_once(api: Api) -> None:
    api.ready_host("h", keyids=1)
    placed = api.create_vm(name="p").json()
    waiting = api.create_vm(name="w").json()
    assert waiting["status"] == "pending"
    r = api.client.delete(f"/v1/vms/{waiting['id']}", headers=api.admin)
    assert r.status_code == 202 and r.json()["status"] == "deleted"
    r = api.client.delete(f"/v1/vms/{placed['id']}", headers=api.admin)
    assert r.status_code == 202 and r.json()["status"] == "deleted"
    host = _host(api, "h")
    assert host["usage"] == {"vcpus": 0, "memory_mib": 0, "vms": 0}
    assert host["tdx"]["keyids_used"] == 0


def test_running_vm_is_deleting_until_its_agent_confirms(api: Api) -> None:
    api.ready_host("h")
    agent = api.token("agent", host="h")
    vm = api.create_vm(name="r").json()
    r = api.client.post(f"/v1/vms/{vm['id']}/status", json={"status": "running"}, headers=agent)
    assert r.status_code == 200 and r.json()["status"] == "running"
    r = api.client.delete(f"/v1/vms/{vm['id']}", headers=api.admin)
    assert r.status_code == 202 and r.json()["status"] == "deleting"
    assert _host(api, "h")["usage"]["vms"] == 1
    listed = api.client.get("/v1/hosts/h/vms", headers=agent).json()["items"]
    assert [(v["id"], v["status"]) for v in listed] == [(vm["id"], "deleting")]
    r = api.client.post(f"/v1/vms/{vm['id']}/status", json={"status": "deleted"}, headers=agent)
    assert r.status_code == 200 and r.json()["status"] == "deleted"
    assert _host(api, "h")["usage"] == {"vcpus": 0, "memory_mib": 0, "vms": 0}
    assert api.client.get("/v1/hosts/h/vms", headers=agent).json()["items"] == []


def test_agent_reports_follow_the_state_machine(api: Api) -> None:
    api.ready_host("h")
    agent = api.token("agent", host="h")
    vm = api.create_vm(name="r").json()
    failed = api.client.post(
        f"/v1/vms/{vm['id']}/status", json={"status": "failed", "detail": "qemu died"}, headers=agent
    )
    assert failed.status_code == 200
    assert (failed.json()["status"], failed.json()["status_detail"]) == ("failed", "qemu died")
    assert _host(api, "h")["usage"]["vms"] == 0
    again = api.client.post(f"/v1/vms/{vm['id']}/status", json={"status": "running"}, headers=agent)
    assert again.status_code == 409 and again.json()["code"] == "invalid_transition"
    assert _vm(api, vm["id"]).json()["status"] == "failed"
    bad = api.client.post(f"/v1/vms/{vm['id']}/status", json={"status": "exploded"}, headers=agent)
    assert bad.status_code == 422


def test_only_the_agent_of_the_vms_host_reports_its_status(api: Api) -> None:
    api.ready_host("h1")
    api.ready_host("h2")
    vm = api.create_vm(name="x", selector={}).json()
    other = "h2" if vm["host"] == "h1" else "h1"
    stranger = api.token("agent", host=other)
    r = api.client.post(f"/v1/vms/{vm['id']}/status", json={"status": "running"}, headers=stranger)
    assert r.status_code == 404
    assert api.client.get(f"/v1/hosts/{vm['host']}/vms", headers=stranger).status_code == 403
    client = api.token("client", project="default")
    r = api.client.post(f"/v1/vms/{vm['id']}/status", json={"status": "running"}, headers=client)
    assert r.status_code == 403
    assert _vm(api, vm["id"]).json()["status"] == "scheduled"


def test_idempotency_key_replays_and_refuses_another_body(api: Api) -> None:
    api.ready_host("h")
    key = {"Idempotency-Key": "create-web-1"}
    first = api.client.post("/v1/vms", json={"name": "w", "vcpus": 1, "memory_mib": 64, "tdx": True},
                            headers=api.admin | key)
    again = api.client.post("/v1/vms", json={"name": "w", "vcpus": 1, "memory_mib": 64, "tdx": True},
                            headers=api.admin | key)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = api.client.post("/v1/vms", json={"name": "w", "vcpus": 2, "memory_mib": 64, "tdx": True},
                            headers=api.admin | key)
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    assert len(api.client.get("/v1/vms", headers=api.admin).json()["items"]) == 1
    assert _host(api, "h")["usage"]["vms"] == 1
    # Keys are scoped per principal: another token may use the same key for its own VM.
    client = api.token("client", project="p")
    mine = api.client.post("/v1/vms", json={"name": "w", "vcpus": 1, "memory_mib": 64, "tdx": True},
                           headers=client | key)
    assert mine.status_code == 201 and mine.json()["id"] != first.json()["id"]


def test_agent_lists_the_vms_of_its_host(api: Api) -> None:
    api.ready_host("h")
    agent = api.token("agent", host="h")
    vm = api.create_vm(name="a").json()
    page = api.client.get("/v1/hosts/h/vms", headers=agent).json()
    assert [v["id"] for v in page["items"]] == [vm["id"]] and page["next"] is None
    assert _vm(api, vm["id"], agent).status_code == 200
    assert api.client.get("/v1/hosts/nope/vms", headers=api.admin).status_code == 404


def test_host_with_active_vms_cannot_be_deleted(api: Api) -> None:
    api.ready_host("h")
    vm = api.create_vm(name="a").json()
    r = api.client.delete("/v1/hosts/h", headers=api.admin)
    assert r.status_code == 409 and r.json()["code"] == "host_not_empty"
    api.client.delete(f"/v1/vms/{vm['id']}", headers=api.admin)
    assert api.client.delete("/v1/hosts/h", headers=api.admin).status_code == 204
    assert _vm(api, vm["id"]).json()["host"] == "h"  # history keeps the host's name


def test_reboot_loses_active_vms_and_frees_the_host(api: Api) -> None:
    api.ready_host("h")
    agent = api.token("agent", host="h")
    running = api.create_vm(name="r").json()
    api.client.post(f"/v1/vms/{running['id']}/status", json={"status": "running"}, headers=agent)
    scheduled = api.create_vm(name="s").json()
    api.report_load("h", "ready")  # a new boot_id
    assert _vm(api, running["id"]).json()["status"] == "lost"
    assert _vm(api, scheduled["id"]).json()["status"] == "lost"
    host = _host(api, "h")
    assert host["usage"] == {"vcpus": 0, "memory_mib": 0, "vms": 0} and host["tdx"]["keyids_used"] == 0
    kinds = [e["kind"] for e in api.client.get("/v1/events?limit=500", headers=api.admin).json()["items"]]
    assert kinds.count("vm.lost") == 2 and "host.rebooted" in kinds


def test_reload_on_the_same_boot_is_refused_while_vms_are_active(api: Api) -> None:
    load = api.ready_host("h")
    vm = api.create_vm(name="a").json()
    body = {**load, "load_id": str(uuid.uuid4()), "tdx_requested": False, "tdx_effective": False}
    r = api.client.post("/v1/hosts/h/loads", json=body, headers=api.admin)
    assert r.status_code == 409 and r.json()["code"] == "reload_with_active_vms"
    assert _host(api, "h")["tdx"]["state"] == "ready"
    api.client.delete(f"/v1/vms/{vm['id']}", headers=api.admin)
    r = api.client.post("/v1/hosts/h/loads", json=body, headers=api.admin)
    assert r.status_code == 201 and r.json()["tdx"]["state"] == "disabled"


@pytest.mark.parametrize(
    "body",
    [
        {"name": "Bad", "vcpus": 1, "memory_mib": 64, "tdx": True},
        {"name": "a", "vcpus": "1", "memory_mib": 64, "tdx": True},
        {"name": "a", "vcpus": 0, "memory_mib": 64, "tdx": True},
        {"name": "a", "vcpus": 1, "memory_mib": 64},
        {"name": "a", "vcpus": 1, "memory_mib": 64, "tdx": "yes"},
        {"name": "a", "vcpus": 1, "memory_mib": 64, "tdx": True, "gpu": 1},
        {"name": "a", "vcpus": 1, "memory_mib": 64, "tdx": True, "selector": {"bad key!": "x"}},
    ],
)
def test_bad_vm_bodies_are_refused_and_change_nothing(api: Api, body: dict[str, Any]) -> None:
    api.ready_host("h")
    head = api.client.get("/v1/events", headers=api.admin).json()["head_id"]
    r = api.client.post("/v1/vms", json=body, headers=api.admin)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "validation_error" and r.json()["errors"]
    assert api.client.get("/v1/vms", headers=api.admin).json()["items"] == []
    assert api.client.get("/v1/events", headers=api.admin).json()["head_id"] == head


def test_roles_that_may_not_create_vms(api: Api) -> None:
    api.ready_host("h")
    reader = api.token("reader")
    agent = api.token("agent", host="h")
    for headers in (reader, agent):
        assert api.create_vm(headers=headers, name="x").status_code == 403
    assert api.create_vm(headers={"Authorization": "Bearer nope"}, name="x").status_code == 401
    assert api.client.get("/v1/vms", headers=api.admin).json()["items"] == []


def test_a_selector_is_the_requests_scope_in_its_explanation(api: Api) -> None:
    """Hosts the selector excludes are selector_mismatch before any other reason (issue 9): the rest
    of the explanation speaks only of the hosts asked for."""
    api.ready_host("a-ready", labels={"zone": "a"})
    api.ready_host("a-disabled", state="disabled", labels={"zone": "a"})
    api.ready_host("b-disabled", state="disabled", labels={"zone": "b"})
    vm = api.create_vm(name="in-b", selector={"zone": "b"}).json()
    assert vm["status"] == "pending"
    assert vm["reasons"] == {"selector_mismatch": 2, "tdx_disabled": 1}
    assert vm["explanation"] == (
        "0/3 hosts fit: 2 selector_mismatch (selector zone=b), 1 tdx_disabled (not opted in at kvm_intel load)"
    )
    preview = api.client.post(
        "/v1/schedule/preview", json={"name": "p", "vcpus": 2, "memory_mib": 2048, "tdx": True,
                                      "selector": {"zone": "b"}}, headers=api.admin,
    ).json()
    assert preview["reasons"] == vm["reasons"]
