"""Project quotas through the real app: limits, usage, refusals, and usage released when VMs end."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import Api
from tests.helpers import all_pages, assert_problem, event_kinds, head_id, snapshot

NO_LIMITS = {"vms": None, "vcpus": None, "memory_mib": None, "tdx_vms": None}
NO_USAGE = {"vms": 0, "vcpus": 0, "memory_mib": 0, "tdx_vms": 0}


def _quota(api: Api, project: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = api.client.get(f"/v1/projects/{project}/quota", headers=headers or api.admin)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _set(api: Api, project: str, headers: dict[str, str] | None = None, **limits: int | None) -> dict[str, Any]:
    r = api.client.put(f"/v1/projects/{project}/quota", json=limits, headers=headers or api.admin)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _usage(api: Api, project: str) -> dict[str, int]:
    return dict(_quota(api, project)["usage"])


def _recount(api: Api) -> dict[str, dict[str, int]]:
    """Usage per project counted from the VM list: what the kept counters must equal."""
    out: dict[str, dict[str, int]] = {}
    for vm in all_pages(api, "/v1/vms", limit=500):
        if vm["status"] in ("pending", "scheduled", "running", "deleting"):
            u = out.setdefault(vm["project"], dict(NO_USAGE))
            u["vms"] += 1
            u["vcpus"] += vm["vcpus"]
            u["memory_mib"] += vm["memory_mib"]
            u["tdx_vms"] += 1 if vm["tdx"] else 0
    return out


def _kept(api: Api) -> dict[str, dict[str, int]]:
    return {p["project"]: p["usage"] for p in all_pages(api, "/v1/projects") if p["usage"] != NO_USAGE}


# ---- reading and setting ----------------------------------------------------------------------


def test_a_project_never_seen_has_no_limits_and_no_usage(api: Api) -> None:
    r = api.client.get("/v1/projects/nobody/quota", headers=api.admin)
    assert r.status_code == 200
    assert r.json() == {"project": "nobody", "limits": NO_LIMITS, "usage": NO_USAGE, "generation": 0}
    assert r.headers["etag"] == '"0"'


def test_put_replaces_the_limits_and_records_an_event(api: Api) -> None:
    head = head_id(api)
    q = _set(api, "team-a", vms=20, tdx_vms=5)
    assert q == {
        "project": "team-a",
        "limits": {"vms": 20, "vcpus": None, "memory_mib": None, "tdx_vms": 5},
        "usage": NO_USAGE,
        "generation": 1,
    }
    assert _quota(api, "team-a") == q
    # PUT replaces: a resource left out has no limit any more.
    q2 = _set(api, "team-a", vcpus=64)
    assert q2["limits"] == {"vms": None, "vcpus": 64, "memory_mib": None, "tdx_vms": None}
    assert q2["generation"] == 2
    events = api.client.get("/v1/events", params={"after": head, "kind": "project.quota_updated"},
                            headers=api.admin).json()["items"]
    assert [e["subject"] for e in events] == ["team-a", "team-a"]
    assert events[1]["data"]["previous"] == {"vms": 20, "vcpus": None, "memory_mib": None, "tdx_vms": 5}
    assert events[1]["data"]["limits"] == q2["limits"]
    assert events[1]["data"]["usage"] == NO_USAGE


def test_if_match_guards_a_read_modify_write(api: Api) -> None:
    first = api.client.put("/v1/projects/p/quota", json={"vms": 3}, headers={**api.admin, "If-Match": '"0"'})
    assert first.status_code == 200 and first.headers["etag"] == '"1"'
    stale = api.client.put("/v1/projects/p/quota", json={"vms": 4}, headers={**api.admin, "If-Match": '"0"'})
    body = assert_problem(stale, 412, "precondition_failed")
    assert body["current_generation"] == 1
    assert _quota(api, "p")["limits"]["vms"] == 3


@pytest.mark.parametrize(
    "body",
    [{"vms": -1}, {"vcpus": "8"}, {"memory_mib": 1.5}, {"tdx_vms": True}, {"vms": 1, "cpus": 2}, {"vms": 2**60}],
)
def test_invalid_limits_are_422_and_change_nothing(api: Api, body: dict[str, Any]) -> None:
    _set(api, "p", vms=5)
    before = head_id(api)
    r = api.client.put("/v1/projects/p/quota", json=body, headers=api.admin)
    assert_problem(r, 422, "validation_error")
    assert _quota(api, "p")["limits"]["vms"] == 5
    assert head_id(api) == before


def test_project_names_follow_dns_label_rules(api: Api) -> None:
    assert_problem(api.client.get("/v1/projects/Bad_Name/quota", headers=api.admin), 422, "validation_error")
    assert_problem(api.client.put("/v1/projects/Bad_Name/quota", json={}, headers=api.admin), 422, "validation_error")


def test_who_may_read_and_set_quotas(api: Api) -> None:
    _set(api, "mine", vms=4)
    api.create_host("h1")
    reader = api.token("reader")
    client = api.token("client", project="mine")
    agent = api.token("agent", host="h1")
    assert _quota(api, "mine", reader)["limits"]["vms"] == 4
    assert _quota(api, "mine", client)["limits"]["vms"] == 4
    assert_problem(api.client.get("/v1/projects/theirs/quota", headers=client), 403, "forbidden")
    assert_problem(api.client.get("/v1/projects/mine/quota", headers=agent), 403, "forbidden")
    for headers in (reader, client, agent):
        r = api.client.put("/v1/projects/mine/quota", json={"vms": 100}, headers=headers)
        assert_problem(r, 403, "forbidden")
    for headers in (client, agent):
        assert_problem(api.client.get("/v1/projects", headers=headers), 403, "forbidden")
    assert api.client.get("/v1/projects", headers=reader).status_code == 200
    assert_problem(api.client.get("/v1/projects/mine/quota"), 401, "unauthorized")
    assert _quota(api, "mine")["limits"]["vms"] == 4


def test_projects_list_is_paginated_by_name(api: Api) -> None:
    for name in ("e", "c", "a", "d", "b"):
        _set(api, name, vms=1)
    api.ready_host("h")
    api.create_vm(name="x", project="f")  # a project appears with its first VM
    first = api.client.get("/v1/projects", params={"limit": 2}, headers=api.admin).json()
    assert [p["project"] for p in first["items"]] == ["a", "b"]
    assert first["next"]
    items = all_pages(api, "/v1/projects", limit=2)
    assert [p["project"] for p in items] == ["a", "b", "c", "d", "e", "f"]
    assert items[-1]["usage"] == {"vms": 1, "vcpus": 2, "memory_mib": 2048, "tdx_vms": 1}
    assert items[-1]["limits"] == NO_LIMITS
    assert_problem(api.client.get("/v1/projects", params={"cursor": "NQ"}, headers=api.admin), 400, "invalid_cursor")


# ---- usage ------------------------------------------------------------------------------------


def test_usage_counts_vms_not_yet_ended_pending_included(api: Api) -> None:
    api.ready_host("h", keyids=1)
    a = api.create_vm(name="a", project="p", vcpus=3, memory_mib=1000).json()
    b = api.create_vm(name="b", project="p", vcpus=1, memory_mib=500).json()  # no KeyID left: pending
    c = api.create_vm(name="c", project="p", vcpus=2, memory_mib=100, tdx=False).json()
    assert (a["status"], b["status"], c["status"]) == ("scheduled", "pending", "scheduled")
    assert _usage(api, "p") == {"vms": 3, "vcpus": 6, "memory_mib": 1600, "tdx_vms": 2}
    assert _usage(api, "default") == NO_USAGE


def test_usage_is_released_on_delete_and_agent_reports(api: Api) -> None:
    api.ready_host("h")
    agent = api.token("agent", host="h")
    pending_gone = api.create_vm(name="a", project="p", vcpus=1000).json()  # fits nowhere
    running = api.create_vm(name="b", project="p").json()
    crashed = api.create_vm(name="c", project="p").json()
    for vm in (running, crashed):
        r = api.client.post(f"/v1/vms/{vm['id']}/status", json={"status": "running"}, headers=agent)
        assert r.status_code == 200, r.text
    assert _usage(api, "p")["vms"] == 3
    assert api.client.delete(f"/v1/vms/{pending_gone['id']}", headers=api.admin).status_code == 202
    assert _usage(api, "p")["vms"] == 2
    # A running VM being deleted still counts until its agent confirms.
    assert api.client.delete(f"/v1/vms/{running['id']}", headers=api.admin).json()["status"] == "deleting"
    assert _usage(api, "p")["vms"] == 2
    api.client.post(f"/v1/vms/{running['id']}/status", json={"status": "deleted"}, headers=agent)
    api.client.post(f"/v1/vms/{crashed['id']}/status", json={"status": "failed"}, headers=agent)
    assert _usage(api, "p") == NO_USAGE
    # Deleting what already ended gives nothing back twice.
    api.client.delete(f"/v1/vms/{crashed['id']}", headers=api.admin)
    assert _usage(api, "p") == NO_USAGE
    assert _kept(api) == _recount(api) == {}


def test_a_reboot_makes_vms_lost_and_releases_their_usage(api: Api) -> None:
    api.ready_host("h")
    api.ready_host("other")
    api.client.patch("/v1/hosts/other", json={"schedulable": False}, headers=api.admin)
    for i in range(3):
        api.create_vm(name=f"a{i}", project="a")
    api.create_vm(name="b0", project="b", tdx=False)
    api.client.patch("/v1/hosts/other", json={"schedulable": True}, headers=api.admin)
    api.create_vm(name="b1", project="b", selector={}, tdx=False)
    assert _usage(api, "a")["vms"] == 3
    api.report_load("h")  # a new boot_id: the host rebooted
    lost = [v for v in all_pages(api, "/v1/vms") if v["status"] == "lost"]
    assert len(lost) >= 3
    assert _kept(api) == _recount(api)
    assert _usage(api, "a") == NO_USAGE


def test_a_failed_tdx_module_loses_the_tds_and_releases_their_usage_only(api: Api) -> None:
    api.create_host("h")
    load = api.report_load("h")
    agent = api.token("agent", host="h")
    api.create_vm(name="td", project="p", vcpus=2, memory_mib=2048, tdx=True)
    api.create_vm(name="plain", project="p", vcpus=3, memory_mib=1024, tdx=False)
    beat = {"load_id": load["load_id"], "module_version": None, "module_healthy": False}
    r = api.client.post("/v1/hosts/h/heartbeat", json=beat, headers=agent)
    assert r.status_code == 200, r.text
    assert _usage(api, "p") == {"vms": 1, "vcpus": 3, "memory_mib": 1024, "tdx_vms": 0}
    assert _kept(api) == _recount(api)


def test_a_pending_vm_past_its_deadline_fails_and_releases_its_usage(api: Api) -> None:
    vm = api.create_vm(name="late", project="p", schedule_timeout_s=1).json()
    assert vm["status"] == "pending"
    assert _usage(api, "p")["vms"] == 1
    deadline = time.monotonic() + 30
    while api.client.get(f"/v1/vms/{vm['id']}", headers=api.admin).json()["status"] != "failed":
        assert time.monotonic() < deadline, "the queue did not fail the VM at its deadline"
        time.sleep(0.1)
    assert _usage(api, "p") == NO_USAGE


# ---- refusals ---------------------------------------------------------------------------------


def test_a_create_beyond_the_limit_is_403_naming_the_resource_and_writes_nothing(api: Api) -> None:
    api.ready_host("h")
    _set(api, "p", vms=2)
    for i in range(2):
        assert api.create_vm(name=f"ok-{i}", project="p").status_code == 201
    before = snapshot(api)
    quota_before = _quota(api, "p")
    r = api.create_vm(name="one-too-many", project="p", vcpus=3)
    body = assert_problem(r, 403, "quota_exceeded")
    assert (body["resource"], body["limit"], body["usage"], body["request"]) == ("vms", 2, 2, 1)
    assert body["project"] == "p"
    assert "vms" in body["detail"]
    assert snapshot(api) == before
    assert _quota(api, "p") == quota_before


@pytest.mark.parametrize(
    ("limits", "vm", "resource", "limit", "usage", "request_"),
    [
        ({"vcpus": 5}, {"vcpus": 4}, "vcpus", 5, 4, 4),
        ({"memory_mib": 5000}, {"memory_mib": 3000}, "memory_mib", 5000, 3000, 3000),
        ({"tdx_vms": 1}, {"tdx": True}, "tdx_vms", 1, 1, 1),
    ],
)
def test_each_resource_is_limited(
    api: Api, limits: dict[str, int], vm: dict[str, Any], resource: str, limit: int, usage: int, request_: int
) -> None:
    api.ready_host("h")
    _set(api, "p", **limits)
    assert api.create_vm(name="first", project="p", **vm).status_code == 201
    body = assert_problem(api.create_vm(name="second", project="p", **vm), 403, "quota_exceeded")
    assert (body["resource"], body["limit"], body["usage"], body["request"]) == (resource, limit, usage, request_)


def test_tdx_vms_limit_leaves_plain_vms_alone(api: Api) -> None:
    api.ready_host("h")
    _set(api, "p", tdx_vms=0)
    assert_problem(api.create_vm(name="td", project="p", tdx=True), 403, "quota_exceeded")
    assert api.create_vm(name="plain", project="p", tdx=False).status_code == 201


def test_a_client_token_is_held_to_its_project_quota(api: Api) -> None:
    client = api.token("client", project="team")
    _set(api, "team", vms=1)
    assert api.create_vm(client, name="a").status_code == 201
    assert_problem(api.create_vm(client, name="b"), 403, "quota_exceeded")
    assert _quota(api, "team", client)["usage"]["vms"] == 1


def test_an_idempotent_replay_of_an_accepted_create_is_still_200(api: Api) -> None:
    api.ready_host("h")
    _set(api, "p", vms=1)
    key = {**api.admin, "Idempotency-Key": "once"}
    first = api.create_vm(key, name="a", project="p")
    assert first.status_code == 201
    replay = api.create_vm(key, name="a", project="p")
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    _set(api, "p", vms=0)  # even below the usage now
    assert api.create_vm(key, name="a", project="p").status_code == 200
    assert _usage(api, "p")["vms"] == 1
    # A refused create with a key does not burn the key: after room is made, it goes through.
    other = {**api.admin, "Idempotency-Key": "later"}
    assert_problem(api.create_vm(other, name="b", project="p"), 403, "quota_exceeded")
    _set(api, "p", vms=2)
    assert api.create_vm(other, name="b", project="p").status_code == 201


def test_lowering_a_limit_below_usage_refuses_new_vms_and_touches_none(api: Api) -> None:
    api.ready_host("h")
    _set(api, "p", vms=5)
    ids = [api.create_vm(name=f"v{i}", project="p").json()["id"] for i in range(4)]
    vms_before = {v["id"]: v for v in all_pages(api, "/v1/vms")}
    q = _set(api, "p", vms=2)
    assert q["usage"]["vms"] == 4 and q["limits"]["vms"] == 2
    assert {v["id"]: v for v in all_pages(api, "/v1/vms")} == vms_before
    body = assert_problem(api.create_vm(name="new", project="p"), 403, "quota_exceeded")
    assert (body["usage"], body["limit"]) == (4, 2)
    # Room comes back only once the usage is under the limit again.
    for vm_id in ids[:2]:
        api.client.delete(f"/v1/vms/{vm_id}", headers=api.admin)
    assert_problem(api.create_vm(name="new", project="p"), 403, "quota_exceeded")
    api.client.delete(f"/v1/vms/{ids[2]}", headers=api.admin)
    assert api.create_vm(name="new", project="p").status_code == 201


def test_limit_zero_forbids_and_other_projects_are_unaffected(api: Api) -> None:
    api.ready_host("h")
    _set(api, "frozen", vms=0)
    assert_problem(api.create_vm(name="a", project="frozen"), 403, "quota_exceeded")
    assert api.create_vm(name="a", project="free").status_code == 201
    assert "vm.created" not in event_kinds(api, subject="frozen")


def test_kept_usage_equals_a_recount_after_a_mixed_sequence(api: Api) -> None:
    api.ready_host("h1", keyids=3)
    api.ready_host("h2", keyids=2)
    agent = api.token("agent", host="h1")
    _set(api, "b", vms=4, tdx_vms=2)
    made: list[dict[str, Any]] = []
    for i in range(12):
        project = "ab"[i % 2]
        r = api.create_vm(name=f"v{i}", project=project, vcpus=1 + i % 3, tdx=i % 4 != 3,
                          schedule_timeout_s=1 if i == 5 else None)
        assert r.status_code in (201, 403), r.text
        if r.status_code == 201:
            made.append(r.json())
    for vm in made[::3]:
        api.client.delete(f"/v1/vms/{vm['id']}", headers=api.admin)
    for vm in made:
        if vm["host"] == "h1":
            api.client.post(f"/v1/vms/{vm['id']}/status", json={"status": "running"}, headers=agent)
    api.report_load("h2")  # reboot
    assert _kept(api) == _recount(api)


def test_a_put_that_changes_nothing_keeps_the_generation_and_emits_nothing(api: Api) -> None:
    """The same limits again must not break everyone else's If-Match (issue 9)."""
    first = api.client.put("/v1/projects/p/quota", json={"vms": 3, "vcpus": 8}, headers=api.admin)
    assert first.status_code == 200
    events = head_id(api)
    again = api.client.put(
        "/v1/projects/p/quota", json={"vms": 3, "vcpus": 8, "memory_mib": None},
        headers={**api.admin, "If-Match": first.headers["etag"]},
    )
    assert again.status_code == 200, again.text
    assert again.headers["etag"] == first.headers["etag"] and again.json() == first.json()
    assert head_id(api) == events
    # No limits on a project never seen: nothing is written, it does not appear in the listing.
    r = api.client.put("/v1/projects/unseen/quota", json={}, headers=api.admin)
    assert r.status_code == 200 and r.json()["generation"] == 0
    assert head_id(api) == events
    assert "unseen" not in [p["project"] for p in api.client.get("/v1/projects", headers=api.admin).json()["items"]]
