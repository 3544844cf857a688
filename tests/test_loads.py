"""kvm_intel load reports and heartbeats (API.md, Hosts: loads, heartbeat, state derivation)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from service.tdx_reasons import REASONS
from tests.conftest import Api, load_body
from tests.helpers import all_pages, assert_problem, event_kinds, head_id, snapshot


def _post_load(api: Api, host: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    return api.client.post(f"/v1/hosts/{host}/loads", json=body, headers=headers or api.admin)


def _host(api: Api, name: str) -> dict[str, Any]:
    r = api.client.get(f"/v1/hosts/{name}", headers=api.admin)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _heartbeat(api: Api, host: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    return api.client.post(f"/v1/hosts/{host}/heartbeat", json=body, headers=headers or api.admin)


# ---- state derivation through the API -------------------------------------------------------

STATE_ROWS = [
    pytest.param(
        {"tdx_platform": False, "tdx_requested": False, "tdx_effective": False, "keyids_total": 0},
        "unsupported", "platform_without_tdx", None, id="no-platform-unsupported",
    ),
    pytest.param(
        {"kvm_tdx": False, "tdx_effective": False, "keyids_total": 0},
        "unsupported", "kernel_without_kvm_tdx",
        "kernel has no KVM TDX support (Linux 6.16+ with KVM_INTEL_TDX needed)", id="no-kvm-tdx-unsupported",
    ),
    pytest.param(
        {"tdx_platform": False, "tdx_effective": False, "keyids_total": 0,
         "errors": ["virt/tdx: initialization failed: Hibernation support is enabled",
                    "kvm_intel: tdx: no TDX private KeyIDs available"]},
        "failed", "hibernation_enabled", "virt/tdx: initialization failed: Hibernation support is enabled",
        id="hibernation-failed-not-unsupported",
    ),
    pytest.param(
        {"kvm_intel_loaded": False, "tdx_effective": False, "keyids_total": 0, "errors": []},
        "failed", "kvm_intel_not_loaded", "kvm_intel is not loaded: no VM can run", id="kvm-intel-not-loaded-failed",
    ),
    pytest.param(
        {"kvm_intel_loaded": False, "tdx_effective": False, "errors": ["kvm_intel: tdx: oops", "second"]},
        "failed", "kvm_intel_not_loaded", "kvm_intel: tdx: oops", id="kvm-intel-not-loaded-first-error",
    ),
    pytest.param(
        {"kvm_intel_loaded": False, "tdx_effective": False, "errors": ["virt/tdx: module initialization failed (-12)"]},
        "failed", "pamt_alloc_failed", "kvm_intel did not load: virt/tdx: module initialization failed (-12)",
        id="pamt-failed",
    ),
    pytest.param({"tdx_requested": False, "tdx_effective": False}, "disabled", "not_opted_in", None,
                 id="not-requested-disabled"),
    pytest.param(
        {"tdx_effective": False, "errors": ["kvm_intel: APICv is required for TDX", "later error"]},
        "failed", "missing_apicv", "kvm_intel: APICv is required for TDX", id="requested-not-effective-kernel-words",
    ),
    pytest.param({"tdx_effective": False, "errors": []}, "failed", "tdx_refused", None,
                 id="requested-not-effective-no-error"),
    pytest.param({"keyids_total": 0, "errors": []}, "failed", "keyids_unknown", None, id="zero-keyids-failed"),
    pytest.param({}, "ready", None, None, id="ready"),
]


@pytest.mark.parametrize(("facts", "state", "code", "reason"), STATE_ROWS)
def test_state_derivation_table(
    api: Api, facts: dict[str, Any], state: str, code: str | None, reason: str | None
) -> None:
    api.create_host("node-1")
    body = load_body("ready", 15, **facts)
    r = _post_load(api, "node-1", body)
    assert r.status_code == 201, r.text
    tdx = r.json()["tdx"]
    assert tdx["state"] == state
    assert tdx["reason_code"] == code
    if state == "ready":
        assert (tdx["reason"], tdx["remedy"]) == (None, None)
    else:
        assert isinstance(tdx["reason"], str) and tdx["reason"]
        assert tdx["remedy"] == REASONS[code].remedy
    if reason is not None:
        assert tdx["reason"] == reason
    assert tdx["keyids_total"] == body["keyids_total"]
    assert _host(api, "node-1")["tdx"] == tdx
    (load,) = all_pages(api, "/v1/hosts/node-1/loads")
    assert (load["tdx_state"], load["tdx_reason_code"], load["tdx_remedy"]) == (state, code, tdx["remedy"])


def test_failed_host_without_kvm_intel_runs_no_vm_at_all(api: Api) -> None:
    api.ready_host("node-1", "no_kvm")
    assert _host(api, "node-1")["tdx"]["state"] == "failed"
    vm = api.create_vm(name="plain", tdx=False)
    assert vm.status_code == 201, vm.text
    assert vm.json()["status"] == "pending"


def test_disabled_host_runs_plain_vms_but_not_tds(api: Api) -> None:
    api.ready_host("node-1", "disabled")
    td = api.create_vm(name="td", tdx=True)
    assert td.json()["status"] == "pending"
    plain = api.create_vm(name="plain", tdx=False)
    assert plain.json()["status"] == "scheduled" and plain.json()["host"] == "node-1"


def test_load_report_for_unknown_host_is_404(api: Api) -> None:
    assert_problem(_post_load(api, "nope", load_body()), 404, "host_not_found")


def test_load_report_updates_capacity_when_given(api: Api) -> None:
    api.create_host("node-1", vcpus=8, memory_mib=1024)
    r = _post_load(api, "node-1", load_body(vcpus=96, memory_mib=524288))
    assert r.status_code == 201
    assert (r.json()["vcpus"], r.json()["memory_mib"]) == (96, 524288)


# ---- history ---------------------------------------------------------------------------------


def test_load_history_newest_first_with_pagination(api: Api) -> None:
    api.create_host("node-1")
    boot = str(uuid.uuid4())
    reported = [api.report_load("node-1", state, boot_id=boot) for state in ("disabled", "failed", "ready")]
    page1 = api.client.get("/v1/hosts/node-1/loads", params={"limit": 2}, headers=api.admin).json()
    assert [ld["id"] for ld in page1["items"]] == [reported[2]["load_id"], reported[1]["load_id"]]
    assert [ld["current"] for ld in page1["items"]] == [True, False]
    assert isinstance(page1["next"], str)
    # A new load arrives between pages: it is on top of a fresh first page, never in later pages.
    newest = api.report_load("node-1", "ready", boot_id=boot)
    page2 = api.client.get(
        "/v1/hosts/node-1/loads", params={"limit": 2, "cursor": page1["next"]}, headers=api.admin
    ).json()
    assert [ld["id"] for ld in page2["items"]] == [reported[0]["load_id"]]
    assert page2["next"] is None
    first = api.client.get("/v1/hosts/node-1/loads", params={"limit": 2}, headers=api.admin).json()
    assert first["items"][0]["id"] == newest["load_id"]
    oldest = page2["items"][0]
    assert oldest["host"] == "node-1"
    assert oldest["tdx_state"] == "disabled" and oldest["current"] is False
    for key in ("boot_id", "kernel", "kvm_intel_loaded", "tdx_platform", "tdx_requested", "tdx_effective",
                "keyids_total", "module_version", "errors"):
        assert oldest[key] == reported[0][key], key
    assert "reported_at" in oldest and "tdx_reason" in oldest


def test_load_history_of_unknown_host_is_404(api: Api) -> None:
    assert_problem(api.client.get("/v1/hosts/nope/loads", headers=api.admin), 404, "host_not_found")


def test_load_history_rejects_a_foreign_cursor(api: Api) -> None:
    api.create_host("node-1")
    hosts_cursor = "Im5vZGUtMSI"  # a hosts-list cursor (a name), not a load cursor
    r = api.client.get("/v1/hosts/node-1/loads", params={"cursor": hosts_cursor}, headers=api.admin)
    assert_problem(r, 400, "invalid_cursor")


# ---- replays and immutability ----------------------------------------------------------------


def test_identical_replay_is_200_and_records_nothing(api: Api) -> None:
    api.create_host("node-1")
    body = api.report_load("node-1")
    before = snapshot(api)
    r = _post_load(api, "node-1", body)
    assert r.status_code == 200, r.text
    assert r.json()["load"]["id"] == body["load_id"]
    assert snapshot(api) == before


@pytest.mark.parametrize(
    "change",
    [{"keyids_total": 7}, {"tdx_effective": False}, {"kernel": "6.17.0"}, {"errors": ["x"]},
     {"boot_id": "another-boot"}, {"module_version": None}, {"kvm_tdx": True}, {"kernel_log": "rotated"},
     {"present_cpus": 8}],
)
def test_same_load_id_with_other_facts_is_409(api: Api, change: dict[str, Any]) -> None:
    api.create_host("node-1")
    body = api.report_load("node-1")
    before = snapshot(api)
    r = _post_load(api, "node-1", {**body, **change})
    assert_problem(r, 409, "load_facts_immutable")
    assert snapshot(api) == before


def test_load_id_of_another_host_is_409(api: Api) -> None:
    api.create_host("node-1")
    api.create_host("node-2")
    body = api.report_load("node-1")
    before = snapshot(api)
    assert_problem(_post_load(api, "node-2", body), 409, "load_id_conflict")
    assert snapshot(api) == before


def test_replay_of_a_superseded_load_is_409(api: Api) -> None:
    api.create_host("node-1")
    old = api.report_load("node-1")
    api.report_load("node-1", boot_id=old["boot_id"])
    before = snapshot(api)
    assert_problem(_post_load(api, "node-1", old), 409, "stale_load")
    assert snapshot(api) == before


# ---- heartbeats ------------------------------------------------------------------------------


def test_heartbeat_stores_observations_without_bumping_generation(api: Api) -> None:
    api.create_host("node-1")
    body = api.report_load("node-1")
    agent = api.token("agent", host="node-1")
    before = _host(api, "node-1")
    r = _heartbeat(api, "node-1", {"load_id": body["load_id"], "keyids_in_use": 3, "running_vms": []}, agent)
    assert r.status_code == 200, r.text
    host = r.json()
    assert host["tdx"]["keyids_observed_in_use"] == 3
    assert host["alive"] is True
    assert host["last_heartbeat_at"] >= before["last_heartbeat_at"]
    assert host["generation"] == before["generation"]
    assert _host(api, "node-1")["tdx"]["keyids_observed_in_use"] == 3
    # Omitted observations keep the last value.
    r = _heartbeat(api, "node-1", {"load_id": body["load_id"]}, agent)
    assert r.json()["tdx"]["keyids_observed_in_use"] == 3


def test_a_routine_heartbeat_answers_what_get_host_answers(api: Api) -> None:
    # The routine heartbeat (alive, nothing evented changes) is answered from one row read without
    # the ORM (service/hosts/heartbeat.py): the same host, field by field, and the same ETag.
    api.create_host("node-1", labels={"zone": "a"})
    body = api.report_load("node-1")
    agent = api.token("agent", host="node-1")
    _heartbeat(api, "node-1", {"load_id": body["load_id"]}, agent)  # alive since the load report
    r = _heartbeat(
        api, "node-1", {"load_id": body["load_id"], "keyids_in_use": 0, "running_vms": [], "tdx_configured": True},
        agent,
    )
    assert r.status_code == 200, r.text
    got = api.client.get("/v1/hosts/node-1", headers=api.admin)
    assert r.json() == got.json()
    assert r.headers["etag"] == got.headers["etag"]
    assert r.headers["content-type"] == "application/json"


def test_module_version_and_opt_in_intent_are_heartbeat_observations(api: Api) -> None:
    # A TDX module version appearing or changing (a runtime update) and an edit of modprobe.d are
    # observations of the current load: no new load, no generation bump.
    api.create_host("node-1")
    body = api.report_load("node-1", "disabled", module_version=None)
    agent = api.token("agent", host="node-1")
    before = _host(api, "node-1")
    assert (before["tdx"]["module_version"], before["tdx"]["configured"], before["tdx"]["next_load"]) == (
        None, None, None
    )
    beat = {"load_id": body["load_id"], "module_version": "1.5.06", "module_healthy": True, "tdx_configured": True}
    host = _heartbeat(api, "node-1", beat, agent).json()
    assert host["tdx"]["module_version"] == "1.5.06"
    assert host["tdx"]["configured"] is True
    assert host["tdx"]["next_load"] == "opt-in configured: takes effect at the next kvm_intel load"
    assert (host["tdx"]["state"], host["generation"], host["load"]["id"]) == (
        "disabled", before["generation"], body["load_id"]
    )
    host = _heartbeat(api, "node-1", {**beat, "module_version": "1.5.16"}, agent).json()
    assert host["tdx"]["module_version"] == "1.5.16"
    assert len(all_pages(api, "/v1/hosts/node-1/loads")) == 1


def test_a_one_off_opt_in_that_is_not_persisted_is_flagged(api: Api) -> None:
    api.create_host("node-1")
    body = api.report_load("node-1", "ready")
    host = _heartbeat(api, "node-1", {"load_id": body["load_id"], "tdx_configured": False}).json()
    assert host["tdx"]["next_load"] == (
        "opt-in not configured: the next kvm_intel load (and a reboot) comes up without tdx=1"
    )
    host = _heartbeat(api, "node-1", {"load_id": body["load_id"], "tdx_configured": True}).json()
    assert host["tdx"]["next_load"] is None


def test_a_failed_tdx_module_fails_the_host_and_loses_its_tdx_vms_only(api: Api) -> None:
    api.create_host("node-1", vcpus=16, memory_mib=32768)
    body = api.report_load("node-1", "ready", module_version=None)
    td = api.create_vm(name="td", vcpus=2, memory_mib=2048).json()
    plain = api.create_vm(name="plain", vcpus=2, memory_mib=2048, tdx=False).json()
    assert td["host"] == plain["host"] == "node-1"
    agent = api.token("agent", host="node-1")
    _heartbeat(api, "node-1", {"load_id": body["load_id"], "module_version": "1.5.06", "module_healthy": True}, agent)
    start = head_id(api)
    before = _host(api, "node-1")

    # A runtime TDX module update failed: the version file cannot be read any more.
    beat = {"load_id": body["load_id"], "module_version": None, "module_healthy": False}
    host = _heartbeat(api, "node-1", beat, agent).json()

    assert (host["tdx"]["state"], host["tdx"]["reason_code"]) == ("failed", "tdx_module_update_failed")
    assert host["tdx"]["remedy"] == REASONS["tdx_module_update_failed"].remedy
    assert host["tdx"]["module_healthy"] is False
    assert host["generation"] > before["generation"]
    assert host["usage"] == {"vcpus": 2, "memory_mib": 2048, "vms": 1}
    assert host["tdx"]["keyids_used"] == 0
    got = api.client.get(f"/v1/vms/{td['id']}", headers=api.admin).json()
    assert (got["status"], got["status_detail"]) == ("lost", "the host's TDX module failed")
    assert api.client.get(f"/v1/vms/{plain['id']}", headers=api.admin).json()["status"] == "scheduled"
    assert event_kinds(api, after=start) == ["host.tdx_state_changed", "vm.lost", "host.tdx_module_failed"]
    assert api.create_vm(name="td-2").json()["reasons"] == {"tdx_failed": 1}
    assert len(all_pages(api, "/v1/hosts/node-1/loads")) == 1  # the same load, now with a dead module
    # Saying so again changes nothing more; neither does the version file going away.
    again = _heartbeat(api, "node-1", beat, agent).json()
    assert again["generation"] == host["generation"]
    gone = _heartbeat(api, "node-1", {**beat, "module_healthy": None}, agent).json()
    assert (gone["tdx"]["state"], gone["tdx"]["module_healthy"]) == ("failed", False)
    # A later update that succeeds (the version reads again) brings the host back.
    back = _heartbeat(api, "node-1", {**beat, "module_version": "1.5.16", "module_healthy": True}, agent).json()
    assert (back["tdx"]["state"], back["tdx"]["reason_code"], back["tdx"]["module_version"]) == (
        "ready", None, "1.5.16"
    )
    _heartbeat(api, "node-1", {**beat, "module_healthy": False}, agent)
    # A reboot brings a fresh module: the new load is ready again.
    r = _post_load(api, "node-1", load_body("ready"))
    assert r.json()["tdx"]["state"] == "ready" and r.json()["tdx"]["module_healthy"] is None


def test_heartbeat_for_an_old_load_is_stale_and_changes_nothing(api: Api) -> None:
    api.create_host("node-1")
    old = api.report_load("node-1")
    api.report_load("node-1", boot_id=old["boot_id"])
    agent = api.token("agent", host="node-1")
    before = snapshot(api)
    r = _heartbeat(api, "node-1", {"load_id": old["load_id"], "keyids_in_use": 9}, agent)
    assert_problem(r, 409, "stale_load")
    assert snapshot(api) == before
    r = _heartbeat(api, "node-1", {"load_id": str(uuid.uuid4())}, agent)
    assert_problem(r, 409, "stale_load")
    assert snapshot(api) == before


def test_heartbeat_before_any_load_is_stale(api: Api) -> None:
    api.create_host("node-1")
    before = snapshot(api)
    assert_problem(_heartbeat(api, "node-1", {"load_id": str(uuid.uuid4())}), 409, "stale_load")
    assert snapshot(api) == before


def test_heartbeat_for_unknown_host_is_404(api: Api) -> None:
    assert_problem(_heartbeat(api, "nope", {"load_id": str(uuid.uuid4())}), 404, "host_not_found")


class TestLiveness:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {"heartbeat_timeout_s": 1, "run_background_tasks": False}

    def test_alive_turns_false_after_the_timeout_and_back_on_heartbeat(self, api: Api) -> None:
        api.create_host("node-1")
        body = api.report_load("node-1")
        assert _host(api, "node-1")["alive"] is True
        time.sleep(1.3)
        assert _host(api, "node-1")["alive"] is False
        listed = all_pages(api, "/v1/hosts")
        assert listed[0]["alive"] is False
        start = head_id(api)
        r = _heartbeat(api, "node-1", {"load_id": body["load_id"]})
        assert r.status_code == 200
        assert r.json()["alive"] is True
        assert event_kinds(api, after=start) == ["host.alive"]

    def test_a_stale_host_gets_no_vm(self, api: Api) -> None:
        api.ready_host("node-1")
        time.sleep(1.3)
        vm = api.create_vm(name="late")
        assert vm.status_code == 201
        assert vm.json()["status"] == "pending"
        assert vm.json()["reasons"].get("host_stale") == 1


# ---- reboots and reloads ---------------------------------------------------------------------


def _ready_host_with_vm(api: Api) -> tuple[dict[str, Any], dict[str, Any]]:
    api.create_host("node-1", vcpus=16, memory_mib=32768)
    load = api.report_load("node-1")
    vm = api.create_vm(name="td-1", vcpus=4, memory_mib=4096)
    assert vm.status_code == 201, vm.text
    assert vm.json()["status"] == "scheduled" and vm.json()["host"] == "node-1"
    host = _host(api, "node-1")
    assert host["usage"] == {"vcpus": 4, "memory_mib": 4096, "vms": 1}
    assert host["tdx"]["keyids_used"] == 1
    return load, vm.json()


def test_new_boot_id_loses_active_vms_and_releases_usage(api: Api) -> None:
    load, vm = _ready_host_with_vm(api)
    start = head_id(api)
    new = load_body("ready", 15)
    assert new["boot_id"] != load["boot_id"]
    r = _post_load(api, "node-1", new)
    assert r.status_code == 201, r.text
    host = r.json()
    assert host["usage"] == {"vcpus": 0, "memory_mib": 0, "vms": 0}
    assert host["tdx"]["keyids_used"] == 0
    assert host["load"]["boot_id"] == new["boot_id"]
    got = api.client.get(f"/v1/vms/{vm['id']}", headers=api.admin).json()
    assert got["status"] == "lost"
    kinds = event_kinds(api, after=start)
    assert "host.rebooted" in kinds and "vm.lost" in kinds and "host.load_reported" in kinds
    rebooted = api.client.get(
        "/v1/events", params={"after": start, "kind": "host.rebooted"}, headers=api.admin
    ).json()["items"]
    assert rebooted[0]["subject"] == "node-1"
    assert rebooted[0]["data"]["old_boot_id"] == load["boot_id"]
    assert rebooted[0]["data"]["new_boot_id"] == new["boot_id"]
    # The freed capacity is usable at once.
    again = api.create_vm(name="td-2", vcpus=16, memory_mib=32768)
    assert again.json()["status"] == "scheduled", again.text


def test_reload_on_same_boot_with_active_vms_is_409_and_changes_nothing(api: Api) -> None:
    load, _vm = _ready_host_with_vm(api)
    before = snapshot(api)
    r = _post_load(api, "node-1", load_body("disabled", boot_id=load["boot_id"]))
    body = assert_problem(r, 409, "reload_with_active_vms")
    assert body.get("active_vms") == 1
    assert snapshot(api) == before


def test_reload_on_same_boot_without_vms_is_accepted(api: Api) -> None:
    api.create_host("node-1")
    first = api.report_load("node-1", "disabled")
    start = head_id(api)
    second = load_body("ready", boot_id=first["boot_id"])
    r = _post_load(api, "node-1", second)
    assert r.status_code == 201, r.text
    assert r.json()["tdx"]["state"] == "ready"
    assert r.json()["load"]["id"] == second["load_id"]
    kinds = event_kinds(api, after=start)
    assert "host.rebooted" not in kinds
    assert kinds == ["host.load_reported", "host.tdx_state_changed"]
    ev = api.client.get("/v1/events", params={"after": start}, headers=api.admin).json()["items"]
    assert ev[0]["data"]["kind"] == "reload"
    assert ev[1]["data"]["from"] == "disabled" and ev[1]["data"]["to"] == "ready"
    loads = all_pages(api, "/v1/hosts/node-1/loads")
    assert [ld["id"] for ld in loads] == [second["load_id"], first["load_id"]]


def test_reload_after_the_vms_are_gone_is_accepted(api: Api) -> None:
    load, vm = _ready_host_with_vm(api)
    assert api.client.delete(f"/v1/vms/{vm['id']}", headers=api.admin).status_code == 202
    r = _post_load(api, "node-1", load_body("ready", boot_id=load["boot_id"]))
    assert r.status_code == 201, r.text
