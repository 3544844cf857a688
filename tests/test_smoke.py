from __future__ import annotations

from tests.conftest import Api


def test_host_becomes_ready_after_load_report(api: Api) -> None:
    api.create_host("h1")
    api.report_load("h1", "ready", keyids=15)
    r = api.client.get("/v1/hosts/h1", headers=api.admin)
    assert r.status_code == 200
    body = r.json()
    assert body["tdx"]["state"] == "ready"
    assert body["tdx"]["keyids_total"] == 15
    assert body["alive"] is True
    assert r.headers["etag"] == f'"{body["generation"]}"'


def test_tdx_vm_scheduled_on_ready_host_only(api: Api) -> None:
    api.ready_host("off", "disabled")
    api.ready_host("on", "ready", keyids=2)
    r = api.create_vm(name="td1")
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "scheduled"
    assert r.json()["host"] == "on"
