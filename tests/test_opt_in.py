"""The guided TDX opt-in of a host through the API: cordon, wait until no VM is active (naming the
blockers), wait for a new kvm_intel load, uncordon when it is ready or stop with the reason and the
remedy; cancelable; one per host; advanced by any replica's background loop, across restarts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from service.app import create_app
from service.db import make_engine
from service.models import Operation
from service.tdx_reasons import REASONS
from tests.conftest import Api, load_body, make_settings
from tests.helpers import all_pages, assert_problem, event_kinds, head_id


def _host(api: Api, name: str) -> dict[str, Any]:
    return dict(api.client.get(f"/v1/hosts/{name}", headers=api.admin).json())


def _op(api: Api, op_id: str) -> dict[str, Any]:
    r = api.client.get(f"/v1/operations/{op_id}", headers=api.admin)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _start(api: Api, name: str, **body: Any) -> dict[str, Any]:
    r = api.client.post(f"/v1/hosts/{name}/tdx-opt-in", json=body or None, headers=api.admin)
    assert r.status_code == 202, r.text
    assert r.headers["Location"] == f"/v1/operations/{r.json()['id']}"
    return dict(r.json())


def _wait_op_event(api: Api, op_id: str, kind: str, after: int) -> dict[str, Any]:
    for _ in range(3):
        page = api.client.get(
            "/v1/events", params={"after": after, "kind": kind, "subject": op_id, "wait": 10}, headers=api.admin
        ).json()
        if page["items"]:
            return dict(page["items"][0])
        after = page["last_id"]
    raise AssertionError(f"no {kind} for operation {op_id}")


def _disabled_host_running(api: Api, name: str = "node-2") -> tuple[dict[str, Any], dict[str, Any]]:
    """A host loaded without tdx=1 with one running VM; returns its load body and the VM."""
    api.create_host(name)
    load = api.report_load(name, "disabled")
    vm = api.create_vm(name="build-1", tdx=False).json()
    assert vm["host"] == name
    r = api.client.post(f"/v1/vms/{vm['id']}/status", json={"status": "running"}, headers=api.admin)
    assert r.status_code == 200
    return load, vm


def _agent_deleted(api: Api, vm_id: str) -> None:
    r = api.client.post(f"/v1/vms/{vm_id}/status", json={"status": "deleted"}, headers=api.admin)
    assert r.status_code == 200, r.text


def _reload(api: Api, name: str, boot_id: str, state: str = "ready") -> None:
    body = load_body(state, 31, boot_id=boot_id)
    r = api.client.post(f"/v1/hosts/{name}/loads", json=body, headers=api.admin)
    assert r.status_code == 201, r.text


def test_opt_in_cordons_waits_for_the_vms_and_the_new_load_then_uncordons(api: Api) -> None:
    load, vm = _disabled_host_running(api)
    start = head_id(api)
    op = _start(api, "node-2")
    assert (op["kind"], op["host"], op["status"], op["step"]) == ("tdx_opt_in", "node-2", "running", "wait_for_empty")
    assert op["blocking_vms"] == [{"id": vm["id"], "name": "build-1", "project": "default", "status": "running"}]
    assert op["blocking_vms_total"] == 1
    assert "waiting for 1 active VM(s) to end" in op["detail"] and "build-1 (running)" in op["detail"]
    assert [h["step"] for h in op["history"]] == ["cordon", "wait_for_empty"]
    assert _host(api, "node-2")["schedulable"] is False
    assert event_kinds(api, start)[:4] == ["operation.started", "host.updated", "host.cordoned", "operation.progress"]
    # New VMs go elsewhere while it waits; the load cannot be reloaded under the VM.
    assert api.create_vm(name="later", tdx=False).json()["status"] == "pending"
    r = api.client.post("/v1/hosts/node-2/loads", json=load_body("ready", 31, boot_id=load["boot_id"]),
                        headers=api.admin)
    assert_problem(r, 409, "reload_with_active_vms")

    after = head_id(api)
    assert api.client.delete(f"/v1/vms/{vm['id']}", headers=api.admin).status_code == 202
    progress = _wait_op_event(api, op["id"], "operation.progress", after)  # now deleting, still there
    assert "build-1 (deleting)" in progress["data"]["detail"]
    after = head_id(api)
    _agent_deleted(api, vm["id"])
    progress = _wait_op_event(api, op["id"], "operation.progress", after)
    assert progress["data"]["step"] == "wait_for_load"
    op = _op(api, op["id"])
    assert (op["step"], op["blocking_vms"], op["blocking_vms_total"]) == ("wait_for_load", [], 0)
    assert "modprobe -r kvm_intel && modprobe kvm_intel tdx=1" in op["detail"]

    after = head_id(api)
    _reload(api, "node-2", load["boot_id"])
    done = _wait_op_event(api, op["id"], "operation.succeeded", after)
    assert done["data"]["host"] == "node-2"
    op = _op(api, op["id"])
    assert (op["status"], op["step"], op["reason_code"]) == ("succeeded", "uncordon", None)
    assert [h["step"] for h in op["history"]] == [
        "cordon", "wait_for_empty", "wait_for_empty", "wait_for_load", "verify", "uncordon"
    ]
    assert op["finished_at"] is not None
    host = _host(api, "node-2")
    assert (host["schedulable"], host["tdx"]["state"]) == (True, "ready")
    assert "host.uncordoned" in event_kinds(api, after)


def test_a_new_load_that_is_not_ready_stops_with_the_reason_and_the_remedy(api: Api) -> None:
    api.create_host("h")
    load = api.report_load("h", "disabled")  # empty: it goes straight to waiting for the load
    op = _start(api, "h")
    assert op["step"] == "wait_for_load"
    after = head_id(api)
    _reload(api, "h", load["boot_id"], "failed")  # tdx=1 asked, tdx=N: APICv off
    failed = _wait_op_event(api, op["id"], "operation.failed", after)
    assert failed["data"]["reason_code"] == "missing_apicv"
    op = _op(api, op["id"])
    assert (op["status"], op["step"], op["reason_code"]) == ("failed", "verify", "missing_apicv")
    assert op["reason"] == "kvm_intel: APICv is required for TDX"
    assert op["remedy"] == REASONS["missing_apicv"].remedy
    assert _host(api, "h")["schedulable"] is False  # stays cordoned until the operator fixes it


def test_one_running_opt_in_per_host_and_who_may_start_it(api: Api) -> None:
    api.create_host("h")
    api.report_load("h", "disabled")
    api.ready_host("ok")
    op = _start(api, "h")
    body = assert_problem(api.client.post("/v1/hosts/h/tdx-opt-in", headers=api.admin), 409, "operation_in_progress")
    assert body["operation_id"] == op["id"]
    assert_problem(api.client.post("/v1/hosts/ok/tdx-opt-in", headers=api.admin), 409, "tdx_already_ready")
    assert_problem(api.client.post("/v1/hosts/nope/tdx-opt-in", headers=api.admin), 404, "host_not_found")
    reader = api.token("reader")
    assert_problem(api.client.post("/v1/hosts/h/tdx-opt-in", headers=reader), 403, "forbidden")
    assert api.client.get(f"/v1/operations/{op['id']}", headers=reader).status_code == 200
    assert_problem(api.client.post(f"/v1/operations/{op['id']}/cancel", headers=reader), 403, "forbidden")
    assert_problem(api.client.post("/v1/hosts/h/tdx-opt-in", json={"timeout_s": 1}, headers=api.admin), 422,
                   "validation_error")
    assert_problem(api.client.get("/v1/operations/00000000-0000-0000-0000-000000000000", headers=api.admin), 404,
                   "operation_not_found")


def test_cancel_gives_the_host_back_as_it_found_it(api: Api) -> None:
    _disabled_host_running(api, "a")
    op = _start(api, "a")
    r = api.client.post(f"/v1/operations/{op['id']}/cancel", headers=api.admin)
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["blocking_vms"]) == ("canceled", [])
    assert _host(api, "a")["schedulable"] is True
    assert_problem(api.client.post(f"/v1/operations/{op['id']}/cancel", headers=api.admin), 409, "operation_finished")
    # A host the operator had cordoned stays cordoned.
    api.create_host("b")
    api.report_load("b", "disabled")
    assert api.client.patch("/v1/hosts/b", json={"schedulable": False}, headers=api.admin).status_code == 200
    op = _start(api, "b")
    assert op["history"][0]["message"] == "b was cordoned already"
    assert api.client.post(f"/v1/operations/{op['id']}/cancel", headers=api.admin).json()["status"] == "canceled"
    assert _host(api, "b")["schedulable"] is False
    # And a new one may start.
    assert _start(api, "b")["status"] == "running"


def test_uncordoning_by_hand_cancels_the_opt_in(api: Api) -> None:
    _disabled_host_running(api, "h")
    op = _start(api, "h")
    after = head_id(api)
    assert api.client.patch("/v1/hosts/h", json={"schedulable": True}, headers=api.admin).status_code == 200
    ended = _wait_op_event(api, op["id"], "operation.canceled", after)
    assert "uncordoned outside the operation" in ended["data"]["detail"]


def test_operations_are_listed_newest_first_page_by_page(api: Api) -> None:
    ids = []
    for name in ("a", "b", "c"):
        api.create_host(name)
        api.report_load(name, "disabled")
        ids.append(_start(api, name)["id"])
    api.client.post(f"/v1/operations/{ids[0]}/cancel", headers=api.admin)
    listed = all_pages(api, "/v1/operations", limit=1)
    assert [o["id"] for o in listed] == ids[::-1]
    running = all_pages(api, "/v1/operations", status="running")
    assert [o["host"] for o in running] == ["c", "b"]
    assert [o["id"] for o in all_pages(api, "/v1/operations", host="a")] == [ids[0]]
    assert_problem(api.client.get("/v1/operations", params={"status": "done"}, headers=api.admin), 422,
                   "validation_error")


def test_an_opt_in_that_waits_past_its_deadline_fails_with_the_hosts_remedy(api: Api, database_url: str) -> None:
    api.create_host("h")
    api.report_load("h", "disabled")
    op = _start(api, "h", timeout_s=60)
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(update(Operation).values(deadline=Operation.created_at))
    finally:
        engine.dispose()
    after = head_id(api)
    assert api.client.put("/v1/policy", json={"max_td_builds_per_host": 3}, headers=api.admin).status_code == 200
    failed = _wait_op_event(api, op["id"], "operation.failed", after)
    assert failed["data"]["reason_code"] == "not_opted_in"
    op = _op(api, op["id"])
    assert op["reason"] == "timed out: no new kvm_intel load was reported by h"
    assert op["remedy"] == REASONS["not_opted_in"].remedy


@pytest.fixture
def second_replica(database_url: str) -> Iterator[Api]:
    app = create_app(make_settings(database_url))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client)
    app.state.ctx.db.dispose()


def test_two_replicas_advance_an_opt_in_once_and_a_restart_loses_nothing(
    api: Api, second_replica: Api, database_url: str
) -> None:
    load, vm = _disabled_host_running(api, "h")
    op = _start(api, "h")
    # The second replica deletes the VM and sees the load: both loops run, each step is taken once.
    after = head_id(second_replica)
    _agent_deleted(second_replica, vm["id"])
    _wait_op_event(second_replica, op["id"], "operation.progress", after)
    # A replica that starts now, on the same database, carries the stored operation on.
    app = create_app(make_settings(database_url))
    with TestClient(app, raise_server_exceptions=False) as client:
        third = Api(client)
        after = head_id(third)
        _reload(third, "h", load["boot_id"])
        _wait_op_event(third, op["id"], "operation.succeeded", after)
    app.state.ctx.db.dispose()
    final = _op(api, op["id"])
    assert [h["step"] for h in final["history"]] == ["cordon", "wait_for_empty", "wait_for_load", "verify", "uncordon"]
    assert event_kinds(api, 0, subject=op["id"]).count("operation.succeeded") == 1
