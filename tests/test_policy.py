"""The fleet's TDX policy through the API: the module floor, attestation, the VMM, PAMT and per-TD
memory overhead, TD build bursts; explanations name each reason with its numbers, pending VMs are
retried and re-explained when the policy or a host's observations change, placed VMs never move."""

from __future__ import annotations

from typing import Any

from tests.conftest import Api
from tests.helpers import assert_problem, event_kinds, head_id


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


def _host(api: Api, name: str) -> dict[str, Any]:
    return dict(api.client.get(f"/v1/hosts/{name}", headers=api.admin).json())


def _ready(api: Api, name: str, module_version: str | None = "1.5.06", **facts: Any) -> str:
    """A ready host; returns its load id (heartbeats name it)."""
    api.create_host(name, **{k: facts.pop(k) for k in ("vcpus", "memory_mib", "labels") if k in facts})
    body = api.report_load(name, "ready", facts.pop("keyids", 15), module_version=module_version, **facts)
    return str(body["load_id"])


def _beat(api: Api, name: str, load_id: str, **observations: Any) -> dict[str, Any]:
    r = api.client.post(f"/v1/hosts/{name}/heartbeat", json={"load_id": load_id, **observations}, headers=api.admin)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _put_policy(api: Api, **body: Any) -> dict[str, Any]:
    r = api.client.put("/v1/policy", json=body, headers=api.admin)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _status(api: Api, vm_id: str, status: str) -> None:
    r = api.client.post(f"/v1/vms/{vm_id}/status", json={"status": status}, headers=api.admin)
    assert r.status_code == 200, r.text


# --- the policy resource ------------------------------------------------------------------------


def test_policy_defaults_then_put_sets_only_the_fields_given(api: Api) -> None:
    r = api.client.get("/v1/policy", headers=api.admin)
    assert r.status_code == 200
    assert r.json() == {
        "tdx_min_module_version": None, "max_td_builds_per_host": 4, "td_memory_overhead_mib": 0,
        "defaults": {"max_td_builds_per_host": 4, "td_memory_overhead_mib": 0},
        "generation": 0, "updated_at": None,
    }
    reader = api.token("reader")
    assert api.client.get("/v1/policy", headers=reader).status_code == 200
    assert_problem(api.client.put("/v1/policy", json={"tdx_min_module_version": "1.5.10"}, headers=reader), 403,
                   "forbidden")
    after = head_id(api)
    policy = _put_policy(api, tdx_min_module_version="1.5.10", max_td_builds_per_host=2)
    assert (policy["tdx_min_module_version"], policy["max_td_builds_per_host"], policy["td_memory_overhead_mib"]) == (
        "1.5.10", 2, 0
    )
    assert policy["generation"] == 1
    policy = _put_policy(api, td_memory_overhead_mib=256)
    assert (policy["tdx_min_module_version"], policy["max_td_builds_per_host"], policy["td_memory_overhead_mib"]) == (
        "1.5.10", 2, 256
    )
    # null: no floor; the numbers back to the server's defaults.
    policy = _put_policy(api, tdx_min_module_version=None, max_td_builds_per_host=None)
    assert (policy["tdx_min_module_version"], policy["max_td_builds_per_host"]) == (None, 4)
    # The same again changes nothing and writes no event.
    _put_policy(api, tdx_min_module_version=None)
    page = api.client.get("/v1/events", params={"after": after, "kind": "policy.updated"}, headers=api.admin).json()
    assert [e["data"]["changed"] for e in page["items"]] == [
        ["max_td_builds_per_host", "tdx_min_module_version"], ["td_memory_overhead_mib"],
        ["max_td_builds_per_host", "tdx_min_module_version"],
    ]
    assert page["items"][0]["data"]["policy"]["tdx_min_module_version"] == "1.5.10"


def test_bad_policy_is_refused_and_changes_nothing(api: Api) -> None:
    for body in (
        {"tdx_min_module_version": "1.5.x"}, {"tdx_min_module_version": ""}, {"tdx_min_module_version": 1.5},
        {"max_td_builds_per_host": 0}, {"td_memory_overhead_mib": -1}, {"max_builds": 3},
    ):
        assert_problem(api.client.put("/v1/policy", json=body, headers=api.admin), 422, "validation_error")
    assert api.client.get("/v1/policy", headers=api.admin).json()["generation"] == 0
    etag = _put_policy(api, max_td_builds_per_host=3)["generation"]
    r = api.client.put("/v1/policy", json={"max_td_builds_per_host": 5}, headers={**api.admin, "If-Match": '"99"'})
    assert_problem(r, 412, "precondition_failed")
    r = api.client.put("/v1/policy", json={"max_td_builds_per_host": 5}, headers={**api.admin, "If-Match": f'"{etag}"'})
    assert r.status_code == 200 and r.headers["ETag"] == f'"{etag + 1}"'


# --- the TDX module floor ------------------------------------------------------------------------


def test_module_floor_explains_with_the_versions_and_never_moves_placed_vms(api: Api) -> None:
    loads = {name: _ready(api, name, version) for name, version in
             (("old-1", "1.5.06"), ("old-2", "1.5.08"), ("new", "1.5.10"))}
    placed = api.create_vm(name="early", selector={}).json()
    assert placed["status"] == "scheduled"
    _put_policy(api, tdx_min_module_version="1.5.10")
    # A VM the floor allows only on "new", which is full of memory.
    big = api.create_vm(name="big", memory_mib=65537).json()
    assert big["status"] == "pending"
    assert big["reasons"] == {"tdx_module_too_old": 2, "insufficient_memory": 1}
    assert "2 tdx_module_too_old (floor 1.5.10, hosts at 1.5.06, 1.5.08)" in big["explanation"]
    assert _vm(api, placed["id"])["host"] == placed["host"] and _vm(api, placed["id"])["status"] == "scheduled"
    # Dotted numeric order: 1.5.10 >= 1.5.10, 1.10 > 1.5.10, 1.5.9 < 1.5.10; an unknown version never qualifies.
    _beat(api, "old-1", loads["old-1"], module_version="1.10")
    _beat(api, "old-2", loads["old-2"], module_version=None)
    small = api.create_vm(name="small", vcpus=1, memory_mib=1024).json()
    assert small["status"] == "scheduled"
    ok = {api.create_vm(name=f"f{i}", vcpus=1, memory_mib=1024).json()["host"] for i in range(4)}
    assert ok <= {"old-1", "new"}
    _put_policy(api, tdx_min_module_version="1.11")
    vm = api.create_vm(name="none", vcpus=1, memory_mib=1024).json()
    assert vm["reasons"] == {"tdx_module_too_old": 3}
    assert "3 tdx_module_too_old (floor 1.11, hosts at 1.5.10, 1.10, unknown)" in vm["explanation"]
    # Plain VMs ignore the floor.
    assert api.create_vm(name="plain", tdx=False, vcpus=1, memory_mib=1024).json()["status"] == "scheduled"


def test_hosts_below_a_version_are_listed_to_update(api: Api) -> None:
    for name, version in (("a", "1.5.06"), ("b", "1.5.8"), ("c", "1.5.10"), ("d", "2.0"), ("e", None)):
        _ready(api, name, version)
    api.create_host("f")
    r = api.client.get("/v1/hosts", params={"tdx_module_below": "1.5.10"}, headers=api.admin)
    assert r.status_code == 200
    assert [h["name"] for h in r.json()["items"]] == ["a", "b"]
    assert [h["name"] for h in api.client.get(
        "/v1/hosts", params={"tdx_module_below": "2.0.1"}, headers=api.admin).json()["items"]] == ["a", "b", "c", "d"]
    assert_problem(api.client.get("/v1/hosts", params={"tdx_module_below": "new"}, headers=api.admin), 422,
                   "validation_error")


def test_a_pending_vm_is_re_explained_and_placed_when_the_policy_changes(api: Api) -> None:
    _ready(api, "h", "1.5.06")
    _put_policy(api, tdx_min_module_version="1.5.10")
    vm = api.create_vm(name="waits").json()
    assert vm["reasons"] == {"tdx_module_too_old": 1}
    after = head_id(api)
    _put_policy(api, tdx_min_module_version=None)
    event = _wait_event(api, "vm.scheduled", vm["id"], after)
    assert event["data"]["host"] == "h"


def test_a_pending_vm_is_re_explained_under_a_new_policy(api: Api) -> None:
    _ready(api, "h", "1.5.06", memory_mib=4096)
    vm = api.create_vm(name="big", memory_mib=8192).json()
    assert vm["reasons"] == {"insufficient_memory": 1}
    _put_policy(api, tdx_min_module_version="1.5.10")
    # The queue retries it on policy.updated and writes the new explanation (a bounded wait).
    seen = vm
    for _ in range(100):
        seen = _vm(api, vm["id"])
        if seen["reasons"] != vm["reasons"]:
            break
        api.client.get("/v1/events", params={"after": head_id(api), "wait": 0.1}, headers=api.admin)
    assert seen["reasons"] == {"tdx_module_too_old": 1}
    assert "floor 1.5.10, hosts at 1.5.06" in seen["explanation"]


def test_a_module_update_reported_by_a_heartbeat_places_the_waiting_vms(api: Api) -> None:
    load = _ready(api, "h", "1.5.06")
    _put_policy(api, tdx_min_module_version="1.5.10")
    vm = api.create_vm(name="waits").json()
    assert vm["status"] == "pending"
    after = head_id(api)
    _beat(api, "h", load, module_version="1.5.10")
    assert "host.module_version_changed" in event_kinds(api, after)
    assert _wait_event(api, "vm.scheduled", vm["id"], after)["data"]["host"] == "h"
    # A heartbeat that changes nothing writes nothing (and so wakes nothing).
    after = head_id(api)
    _beat(api, "h", load, module_version="1.5.10", attestation_ready=None)
    assert event_kinds(api, after) == []


# --- attestation ---------------------------------------------------------------------------------


def test_attestation_vms_go_only_where_the_qgs_answers_and_stay_when_it_goes(api: Api) -> None:
    loads = {name: _ready(api, name) for name in ("up", "down", "unchecked")}
    _beat(api, "up", loads["up"], attestation_ready=True)
    _beat(api, "down", loads["down"], attestation_ready=False)
    assert _host(api, "up")["tdx"]["attestation_ready"] is True
    vm = api.create_vm(name="att", attestation=True).json()
    assert (vm["status"], vm["host"], vm["attestation"]) == ("scheduled", "up", True)
    # Plain TDs go anywhere ready.
    assert api.create_vm(name="any", vcpus=1).json()["status"] == "scheduled"
    after = head_id(api)
    _beat(api, "up", loads["up"], attestation_ready=False)
    assert "host.attestation_changed" in event_kinds(api, after)
    assert _vm(api, vm["id"])["status"] == "scheduled"  # a host whose QGS goes away keeps its VMs
    waiting = api.create_vm(name="att-2", attestation=True).json()
    assert waiting["status"] == "pending"
    assert waiting["reasons"] == {"attestation_unavailable": 3}
    assert "3 attestation_unavailable (quote generation service: 2 not answering, 1 not checked)" in waiting[
        "explanation"]
    after = head_id(api)
    _beat(api, "down", loads["down"], attestation_ready=True)
    assert _wait_event(api, "vm.scheduled", waiting["id"], after)["data"]["host"] == "down"


def test_attestation_needs_a_td(api: Api) -> None:
    _ready(api, "h")
    r = api.create_vm(name="plain", tdx=False, attestation=True)
    assert_problem(r, 422, "validation_error")
    assert api.client.get("/v1/vms", headers=api.admin).json()["items"] == []
    assert_problem(api.create_vm(name="x", attestation="yes"), 422, "validation_error")


# --- the VMM ------------------------------------------------------------------------------------


def test_tdx_vms_avoid_a_host_whose_vmm_cannot_build_tds(api: Api) -> None:
    loads = {name: _ready(api, name) for name in ("old-qemu", "new-qemu")}
    _beat(api, "old-qemu", loads["old-qemu"], vmm_tdx="unsupported", vmm_detail="QEMU 9.2.0 (TDX needs 10.1+)")
    _beat(api, "new-qemu", loads["new-qemu"], vmm_tdx="unknown")
    host = _host(api, "old-qemu")["tdx"]
    assert (host["vmm"], host["vmm_detail"]) == ("unsupported", "QEMU 9.2.0 (TDX needs 10.1+)")
    placed = {api.create_vm(name=f"td{i}", vcpus=1).json()["host"] for i in range(3)}
    assert placed == {"new-qemu"}  # unknown is given the benefit of the doubt
    assert api.create_vm(name="plain", tdx=False, vcpus=1, memory_mib=62000).json()["host"] == "old-qemu"
    _beat(api, "new-qemu", loads["new-qemu"], vmm_tdx="unsupported", vmm_detail="libvirt without tdx")
    vm = api.create_vm(name="td-x", vcpus=1).json()
    assert vm["reasons"] == {"vmm_tdx_unsupported": 2}
    assert "2 vmm_tdx_unsupported (QEMU/libvirt without TDX, e.g. " in vm["explanation"]
    assert_problem(
        api.client.post("/v1/hosts/new-qemu/heartbeat", json={"load_id": loads["new-qemu"], "vmm_tdx": "maybe"},
                        headers=api.admin),
        422, "validation_error",
    )


# --- PAMT and the per-TD memory overhead ---------------------------------------------------------


def test_pamt_is_never_schedulable_and_each_td_is_charged_the_overhead(api: Api) -> None:
    _ready(api, "h", memory_mib=16384, pamt_kb=1050644)  # 1027 MiB, as a 256 GiB host logs it
    host = _host(api, "h")
    assert host["tdx"]["pamt_mib"] == 1027
    (load,) = api.client.get("/v1/hosts/h/loads", headers=api.admin).json()["items"]
    assert load["pamt_kb"] == 1050644
    cap = api.client.get("/v1/capacity", params={"vcpus": 1, "memory_mib": 4096, "tdx": True}, headers=api.admin)
    ready = cap.json()["by_tdx_state"]["ready"]
    assert (ready["pamt_mib"], ready["memory_mib_free"]) == (1027, 16384 - 1027)
    assert cap.json()["fit"]["fits_now"] == 3
    too_big = api.create_vm(name="too-big", memory_mib=16384).json()
    assert too_big["explanation"] == (
        "0/1 hosts fit: 1 insufficient_memory (needs 16384 MiB, most free 15357 MiB after 1027 MiB PAMT)"
    )
    _put_policy(api, td_memory_overhead_mib=256)
    cap = api.client.get("/v1/capacity", params={"vcpus": 1, "memory_mib": 4096, "tdx": True}, headers=api.admin)
    assert cap.json()["fit"]["memory_mib_charged"] == 4352 and cap.json()["td_memory_overhead_mib"] == 256
    td = api.create_vm(name="td", memory_mib=4096).json()
    assert (td["status"], td["memory_overhead_mib"]) == ("scheduled", 256)
    plain = api.create_vm(name="plain", tdx=False, memory_mib=1024).json()
    assert plain["memory_overhead_mib"] == 0
    assert _host(api, "h")["usage"]["memory_mib"] == 4096 + 256 + 1024
    big = api.create_vm(name="big", memory_mib=10240).json()
    assert big["explanation"] == (
        "0/1 hosts fit: 1 insufficient_memory (needs 10240 MiB + 256 MiB TD overhead = 10496 MiB, "
        "most free 9981 MiB after 1027 MiB PAMT)"
    )
    # The charge stays what it was at placement, whatever the policy says later.
    for vm in (too_big, big):
        assert api.client.delete(f"/v1/vms/{vm['id']}", headers=api.admin).status_code == 202
    _put_policy(api, td_memory_overhead_mib=1024)
    for vm in (td, plain):
        assert api.client.delete(f"/v1/vms/{vm['id']}", headers=api.admin).status_code == 202
    assert _host(api, "h")["usage"]["memory_mib"] == 0


# --- TD build bursts -----------------------------------------------------------------------------


def test_td_build_bursts_are_capped_per_host_and_a_running_td_frees_a_slot(api: Api) -> None:
    _ready(api, "h")
    _put_policy(api, max_td_builds_per_host=2)
    first, second = (api.create_vm(name=f"td{i}", vcpus=1, memory_mib=1024).json() for i in range(2))
    assert first["status"] == second["status"] == "scheduled"
    assert _host(api, "h")["tdx"]["tds_building"] == 2
    third = api.create_vm(name="td2", vcpus=1, memory_mib=1024).json()
    assert third["status"] == "pending"
    assert third["explanation"] == "0/1 hosts fit: 1 td_build_burst (2/2 TDs building)"
    # Plain VMs are not TD builds.
    assert api.create_vm(name="plain", tdx=False, vcpus=1, memory_mib=1024).json()["status"] == "scheduled"
    after = head_id(api)
    _status(api, first["id"], "running")
    assert _wait_event(api, "vm.scheduled", third["id"], after)["data"]["host"] == "h"
    assert _host(api, "h")["tdx"]["tds_building"] == 2
    # Ending a TD that never ran frees its slot too; a running one had freed it already.
    assert api.client.delete(f"/v1/vms/{second['id']}", headers=api.admin).status_code == 202
    assert api.client.delete(f"/v1/vms/{first['id']}", headers=api.admin).status_code == 202
    assert _host(api, "h")["tdx"]["tds_building"] == 1
    _status(api, third["id"], "failed")
    assert _host(api, "h")["tdx"]["tds_building"] == 0
    cap = api.client.get("/v1/capacity", params={"vcpus": 1, "memory_mib": 1024, "tdx": True}, headers=api.admin)
    assert cap.json()["fit"]["fits_now"] == 2 and cap.json()["max_td_builds_per_host"] == 2


def test_a_reboot_frees_the_build_slots_of_the_lost_tds(api: Api) -> None:
    _ready(api, "h")
    vm = api.create_vm(name="td", vcpus=1, memory_mib=1024).json()
    assert _host(api, "h")["tdx"]["tds_building"] == 1
    api.report_load("h", "ready", 15)  # a new boot id: a reboot
    assert _vm(api, vm["id"])["status"] == "lost"
    assert _host(api, "h")["tdx"]["tds_building"] == 0


# --- observed KeyIDs ----------------------------------------------------------------------------


def test_keyids_freed_outside_the_control_plane_place_the_waiting_tds(api: Api) -> None:
    load = _ready(api, "h", keyids=2)
    _beat(api, "h", load, keyids_in_use=2)
    vm = api.create_vm(name="td", vcpus=1).json()
    assert vm["reasons"] == {"keyids_exhausted": 1}
    after = head_id(api)
    _beat(api, "h", load, keyids_in_use=0)
    assert "host.keyids_freed" in event_kinds(api, after)
    assert _wait_event(api, "vm.scheduled", vm["id"], after)["data"]["host"] == "h"


def test_a_re_explained_pending_vm_emits_its_new_explanation_and_an_unchanged_one_nothing(api: Api) -> None:
    """Issue 9: a pending VM's explanation changed (generation bumped) with no event; and a retry
    that finds the same reasons must change nothing (no generation bump, no event)."""
    _ready(api, "old", "1.5.06", labels={"pool": "old"})
    _ready(api, "small", "1.5.10", memory_mib=4096, labels={"pool": "small"})
    _put_policy(api, tdx_min_module_version="1.5.10")
    same = api.create_vm(name="same", memory_mib=1024, selector={"pool": "old"}, priority=10).json()
    moves = api.create_vm(name="moves", memory_mib=8192, selector={"pool": "small"}).json()
    assert same["status"] == moves["status"] == "pending"
    created = _wait_event(api, "vm.unschedulable", moves["id"])
    assert created["data"]["generation"] == moves["generation"]
    assert created["data"]["explanation"] == moves["explanation"]
    after = head_id(api)
    # The TD overhead shows in the memory shortfall of one VM, not in the module floor of the other.
    _put_policy(api, td_memory_overhead_mib=512)
    event = _wait_event(api, "vm.unschedulable", moves["id"], after)
    now = _vm(api, moves["id"])
    assert now["generation"] == moves["generation"] + 1 == event["data"]["generation"]
    assert now["explanation"] == event["data"]["explanation"] != moves["explanation"]
    assert "8192 MiB + 512 MiB TD overhead" in now["explanation"]
    assert now["reasons"] == event["data"]["reasons"]
    # The other was retried first in the same pass (higher priority) and found the same reasons.
    assert _vm(api, same["id"]) == same
    events = api.client.get(
        "/v1/events", params={"after": after, "subject": same["id"]}, headers=api.admin
    ).json()["items"]
    assert events == []
