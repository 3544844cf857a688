"""Input a hostile client sends answers a clear 4xx, never a 500, and the same on SQLite and PostgreSQL:
cursors a client made up, integers beyond the columns' range, control characters (NUL above all:
PostgreSQL cannot store it in text), and values at the documented limits are stored as sent."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from tests.conftest import Api, load_body
from tests.helpers import all_pages, assert_problem, snapshot

# Each list and what its cursor holds: a name, a load's sequence number, a UUID.
LISTS = {
    "/v1/hosts": "name", "/v1/hosts/node-1/loads": "seq", "/v1/hosts/node-1/vms": "uuid", "/v1/vms": "uuid",
    "/v1/tokens": "uuid", "/v1/projects": "name", "/v1/operations": "uuid",
}
NOT_A_KEY = [
    10**20, 2**63, -(2**63) - 1, -1, 0, True, 1.5, [1], {"a": 1}, "x\u0000y", "a" * 300, "node-1\n", "",
    "{00000000-0000-0000-0000-000000000000}",
]
NOT_OF_THE_KIND = {
    "name": ["Node-1", "node_1", "-node", "a" * 64, 5],
    "seq": ["5", "node-1", 2**63, "00000000-0000-0000-0000-000000000000"],
    "uuid": ["not-a-uuid", "00000000-0000-0000-0000-00000000000g", "node-1", 5, "0" * 36],
}


def _cursor(key: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


@pytest.fixture
def seeded(api: Api) -> Api:
    api.ready_host("node-1")
    assert api.create_vm(name="td-1").status_code == 201
    assert api.client.put("/v1/projects/p/quota", json={"vms": 3}, headers=api.admin).status_code == 200
    return api


@pytest.mark.parametrize("path", LISTS)
def test_a_cursor_the_server_did_not_issue_is_400(seeded: Api, path: str) -> None:
    for key in [*NOT_A_KEY, *NOT_OF_THE_KIND[LISTS[path]]]:
        r = seeded.client.get(path, params={"cursor": _cursor(key)}, headers=seeded.admin)
        assert_problem(r, 400, "invalid_cursor")
    for cursor in ["%%%", "\u0000", "////", "e30", "a" * 512]:  # not base64 JSON at all
        r = seeded.client.get(path, params={"cursor": cursor}, headers=seeded.admin)
        assert_problem(r, 400, "invalid_cursor")
    # JSON null decodes to no cursor: the first page, as without one
    assert seeded.client.get(path, params={"cursor": _cursor(None)}, headers=seeded.admin).status_code == 200


def test_the_cursors_the_server_issues_page_through(api: Api) -> None:
    api.ready_host("node-1")
    for _ in range(3):
        api.report_load("node-1")
    for i in range(3):
        assert api.create_vm(name=f"v{i}", project=f"p{i}").json()["host"] == "node-1"
        api.ready_host(f"node-{i + 2}", "disabled")
        api.token("reader")
        assert api.client.post(f"/v1/hosts/node-{i + 2}/tdx-opt-in", json={}, headers=api.admin).status_code == 202
    for path in LISTS:
        items = all_pages(api, path, limit=1)
        assert len(items) >= 3, path
        assert len({json.dumps(i, sort_keys=True) for i in items}) == len(items), path


def test_integer_query_parameters_beyond_their_range_are_422(seeded: Api) -> None:
    for query in [
        {"memory_mib": "99999999999999999999"}, {"memory_mib": str(2**63)}, {"vcpus": "99999999999999999999"},
        {"vcpus": "-99999999999999999999", "memory_mib": "1"}, {"memory_mib": "1e400", "vcpus": "1"},
        {"memory_mib": "²", "vcpus": "1"}, {"memory_mib": "9" * 5000, "vcpus": "1"},
    ]:
        r = seeded.client.get("/v1/capacity", params=query, headers=seeded.admin)
        assert_problem(r, 422, "validation_error")


def test_a_list_limit_beyond_its_range_is_422(seeded: Api) -> None:
    for path in LISTS:
        for limit in ["99999999999999999999", str(2**63), "-1", "0", "501", "9" * 5000, "²"]:
            r = seeded.client.get(path, params={"limit": limit}, headers=seeded.admin)
            assert_problem(r, 422, "validation_error")


HUGE = [10**20, 2**63, -(2**63) - 1, 2**64]


@pytest.mark.parametrize(
    ("path", "field", "base"),
    [
        ("/v1/hosts", "vcpus", {"name": "n", "vcpus": 1, "memory_mib": 1}),
        ("/v1/hosts", "memory_mib", {"name": "n", "vcpus": 1, "memory_mib": 1}),
        ("/v1/hosts", "reserved_memory_mib", {"name": "n", "vcpus": 1, "memory_mib": 1}),
        ("/v1/vms", "memory_mib", {"name": "v", "vcpus": 1, "memory_mib": 1, "tdx": False}),
        ("/v1/vms", "priority", {"name": "v", "vcpus": 1, "memory_mib": 1, "tdx": False}),
        ("/v1/vms", "schedule_timeout_s", {"name": "v", "vcpus": 1, "memory_mib": 1, "tdx": False}),
        ("/v1/schedule/preview", "vcpus", {"name": "v", "vcpus": 1, "memory_mib": 1, "tdx": False}),
        ("/v1/hosts/node-1/loads", "keyids_total", load_body()),
        ("/v1/hosts/node-1/loads", "pamt_kb", load_body()),
        ("/v1/hosts/node-1/loads", "memory_mib", load_body()),
    ],
)
def test_integer_body_fields_beyond_their_column_are_422(
    seeded: Api, path: str, field: str, base: dict[str, Any]
) -> None:
    before = snapshot(seeded)
    for value in HUGE:
        r = seeded.client.post(path, json={**base, field: value}, headers=seeded.admin)
        body = assert_problem(r, 422, "validation_error")
        assert any(e["loc"][-1] == field for e in body["errors"]), body
    assert snapshot(seeded) == before


@pytest.mark.parametrize(
    ("method", "path", "field"),
    [
        ("PUT", "/v1/projects/p/quota", "memory_mib"), ("PUT", "/v1/policy", "td_memory_overhead_mib"),
        ("PATCH", "/v1/hosts/node-1", "reserved_memory_mib"),
    ],
)
def test_integer_fields_of_updates_beyond_their_column_are_422(seeded: Api, method: str, path: str, field: str) -> None:
    for value in HUGE:
        r = seeded.client.request(method, path, json={field: value}, headers=seeded.admin)
        assert_problem(r, 422, "validation_error")


def test_the_largest_values_the_schema_allows_are_stored(api: Api) -> None:
    """Each bound fits its column on both databases (PostgreSQL refuses what does not fit: a 500)."""
    host = {"name": "big", "vcpus": 2**31 - 1, "memory_mib": 2**50, "reserved_vcpus": 2**31 - 1,
            "reserved_memory_mib": 2**31 - 1, "cpu_allocation_ratio": 64}
    r = api.client.post("/v1/hosts", json=host, headers=api.admin)
    assert r.status_code == 201, r.text
    load = load_body(keyids=2**31 - 1, vcpus=2**31 - 1, memory_mib=2**50, present_cpus=2**31 - 1, pamt_kb=2**50)
    r = api.client.post("/v1/hosts/big/loads", json=load, headers=api.admin)
    assert r.status_code == 201, r.text
    r = api.client.post("/v1/hosts/big/heartbeat", json={"load_id": load["load_id"], "keyids_in_use": 2**31 - 1},
                        headers=api.admin)
    assert r.status_code == 200, r.text
    vm = {"name": "v", "vcpus": 4096, "memory_mib": 2**50, "tdx": False, "priority": 1_000_000,
          "schedule_timeout_s": 30 * 86400}
    assert api.create_vm(**vm).status_code == 201
    assert api.create_vm(**{**vm, "priority": -1_000_000}).status_code == 201
    quota = {"vms": 2**53, "vcpus": 2**53, "memory_mib": 2**53, "tdx_vms": 2**53}
    assert api.client.put("/v1/projects/p/quota", json=quota, headers=api.admin).status_code == 200
    policy = {"max_td_builds_per_host": 10_000, "td_memory_overhead_mib": 2**20}
    assert api.client.put("/v1/policy", json=policy, headers=api.admin).status_code == 200
    r = api.client.get("/v1/capacity", params={"vcpus": 4096, "memory_mib": 2**50}, headers=api.admin)
    assert r.status_code == 200, r.text
    got = api.client.get("/v1/hosts/big", headers=api.admin).json()
    assert (got["vcpus"], got["memory_mib"], got["tdx"]["keyids_total"]) == (2**31 - 1, 2**50, 2**31 - 1)


# ---- control characters ----------------------------------------------------------------------

NUL = "a\u0000b"
CONTROL = ["a\u0000b", "a\u0001b", "a\u001bb", "a\u007fb", "\u0000"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/tokens", {"role": "reader", "description": "{t}"}),
        ("/v1/tokens", {"role": "agent", "host": "{t}"}),
        ("/v1/tokens", {"role": "client", "project": "{t}"}),
        ("/v1/hosts", {"name": "{t}", "vcpus": 1, "memory_mib": 1}),
        ("/v1/hosts", {"name": "n", "vcpus": 1, "memory_mib": 1, "labels": {"{t}": "v"}}),
        ("/v1/hosts", {"name": "n", "vcpus": 1, "memory_mib": 1, "labels": {"k": "{t}"}}),
        ("/v1/hosts:batch", {"hosts": [{"name": "{t}", "vcpus": 1, "memory_mib": 1}]}),
        ("/v1/vms", {"name": "{t}", "vcpus": 1, "memory_mib": 1, "tdx": False}),
        ("/v1/vms", {"name": "v", "vcpus": 1, "memory_mib": 1, "tdx": False, "project": "{t}"}),
        ("/v1/vms", {"name": "v", "vcpus": 1, "memory_mib": 1, "tdx": False, "selector": {"k": "{t}"}}),
        ("/v1/vms", {"name": "v", "vcpus": 1, "memory_mib": 1, "tdx": False, "anti_affinity_group": "{t}"}),
        ("/v1/hosts/node-1/loads", {**load_body(), "kernel": "{t}"}),
        ("/v1/hosts/node-1/loads", {**load_body(), "module_version": "{t}"}),
        ("/v1/hosts/node-1/loads", {**load_body(), "boot_id": "{t}"}),
        ("/v1/hosts/node-1/loads", {**load_body(), "errors": ["{t}"]}),
        ("/v1/policy", {"tdx_min_module_version": "{t}"}),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(k for k in v if k not in ("vcpus", "memory_mib"))[:40],
)
def test_control_characters_in_text_fields_are_422(seeded: Api, path: str, body: dict[str, Any]) -> None:
    method = "PUT" if path == "/v1/policy" else "POST"
    before = snapshot(seeded)
    for text in CONTROL:
        raw = json.dumps(body).replace("{t}", json.dumps(text)[1:-1])
        headers = {**seeded.admin, "Content-Type": "application/json"}
        assert_problem(seeded.client.request(method, path, content=raw, headers=headers), 422, "validation_error")
    assert snapshot(seeded) == before


def test_one_line_texts_refuse_every_control_character(seeded: Api) -> None:
    for text in [*CONTROL, "a\nb", "a\tb", "a\rb", "ops\n"]:
        r = seeded.client.post("/v1/tokens", json={"role": "reader", "description": text}, headers=seeded.admin)
        assert_problem(r, 422, "validation_error")
        load = {**load_body(), "kernel": f"6.16{text}"}
        r = seeded.client.post("/v1/hosts/node-1/loads", json=load, headers=seeded.admin)
        assert_problem(r, 422, "validation_error")


def test_agent_observations_refuse_control_characters(seeded: Api) -> None:
    load = seeded.client.get("/v1/hosts/node-1", headers=seeded.admin).json()["load"]["id"]
    for text in [*CONTROL, "qemu\n"]:
        r = seeded.client.post("/v1/hosts/node-1/heartbeat", json={"load_id": load, "vmm_detail": text},
                               headers=seeded.admin)
        assert_problem(r, 422, "validation_error")
    vm = seeded.client.get("/v1/vms", headers=seeded.admin).json()["items"][0]
    r = seeded.client.post(f"/v1/vms/{vm['id']}/status", json={"status": "running", "detail": NUL},
                           headers=seeded.admin)
    assert_problem(r, 422, "validation_error")


def test_multi_line_texts_keep_newlines_and_tabs(seeded: Api) -> None:
    vm = seeded.client.get("/v1/vms", headers=seeded.admin).json()["items"][0]
    r = seeded.client.post(f"/v1/vms/{vm['id']}/status", json={"status": "failed", "detail": "qemu:\n\tno KVM\r\n"},
                           headers=seeded.admin)
    assert r.status_code == 200, r.text
    assert r.json()["status_detail"] == "qemu:\n\tno KVM\r\n"


def test_an_idempotency_key_with_control_characters_is_422(seeded: Api) -> None:
    before = snapshot(seeded)
    for key in [b"a\x00b", b"a\x01b", b"\x1b[31m", b"a\x7fb"]:
        r = seeded.client.post("/v1/vms", json={"name": "v", "vcpus": 1, "memory_mib": 1, "tdx": False},
                               headers={**seeded.admin, "Idempotency-Key": key})
        assert_problem(r, 422, "validation_error")
    assert snapshot(seeded) == before


def test_control_characters_in_query_parameters_are_422(seeded: Api) -> None:
    for path, params in [
        ("/v1/vms", {"host": NUL}), ("/v1/vms", {"project": NUL}), ("/v1/hosts", {"label": f"k={NUL}"}),
        ("/v1/hosts", {"label": f"{NUL}=v"}), ("/v1/hosts", {"tdx_module_below": NUL}),
        ("/v1/hosts", {"tdx_module_below": "1.5\n"}), ("/v1/operations", {"host": NUL}),
        ("/v1/hosts/node-1/vms", {"status": NUL}), ("/v1/capacity", {"vcpus": NUL, "memory_mib": "1"}),
    ]:
        assert_problem(seeded.client.get(path, params=params, headers=seeded.admin), 422, "validation_error")


def test_control_characters_in_path_parameters_are_422(seeded: Api) -> None:
    for method, path in [
        ("GET", "/v1/hosts/a%00b"), ("GET", "/v1/hosts/a%00b/loads"), ("GET", "/v1/hosts/a%00b/vms"),
        ("DELETE", "/v1/hosts/a%00b"), ("GET", "/v1/vms/a%00b"), ("DELETE", "/v1/tokens/a%00b"),
        ("GET", "/v1/operations/a%00b"), ("GET", "/v1/projects/a%00b/quota"), ("GET", "/v1/hosts/node-1%0A"),
        ("PUT", "/v1/projects/a%00b/quota"), ("POST", "/v1/hosts/a%00b/drain"),
    ]:
        r = seeded.client.request(method, path, json={} if method in ("PUT", "POST") else None, headers=seeded.admin)
        assert_problem(r, 422, "validation_error")


# ---- labels: the schema and the column agree -------------------------------------------------

@pytest.mark.parametrize(
    "labels",
    [
        {"a" * 190 + "/" + "b" * 63: "v"},  # 254 characters: one more than the column holds
        {"a" * 253 + "/" + "b" * 63: "v"},  # the pattern's longest: prefix 253 + name 63
        {"k": "v\n"}, {"k\n": "v"}, {"k": "a" * 64}, {"k": "\u00e9"},
    ],
    ids=["key-254", "key-317", "value-newline", "key-newline", "value-64", "value-non-ascii"],
)
def test_labels_the_column_cannot_hold_are_422(seeded: Api, labels: dict[str, str]) -> None:
    for method, path, body in [
        ("POST", "/v1/hosts", {"name": "n", "vcpus": 1, "memory_mib": 1, "labels": labels}),
        ("PATCH", "/v1/hosts/node-1", {"labels": labels}),
        ("POST", "/v1/vms", {"name": "v", "vcpus": 1, "memory_mib": 1, "tdx": False, "selector": labels}),
    ]:
        assert_problem(seeded.client.request(method, path, json=body, headers=seeded.admin), 422, "validation_error")
    key, value = next(iter(labels.items()))
    r = seeded.client.get("/v1/hosts", params={"label": f"{key}={value}"}, headers=seeded.admin)
    assert_problem(r, 422, "validation_error")


def test_the_longest_label_key_the_schema_allows_is_stored(seeded: Api) -> None:
    key = "a" * 189 + "/" + "b" * 63  # 253 characters
    r = seeded.client.patch("/v1/hosts/node-1", json={"labels": {key: "v" * 63}}, headers=seeded.admin)
    assert r.status_code == 200, r.text
    listed = seeded.client.get("/v1/hosts", params={"label": f"{key}={'v' * 63}"}, headers=seeded.admin).json()
    assert [h["name"] for h in listed["items"]] == ["node-1"]


# ---- cpu_allocation_ratio: a JSON number, 0.1..64 ----------------------------------------------

def test_a_cpu_allocation_ratio_that_is_not_a_sane_number_is_422(seeded: Api) -> None:
    before = snapshot(seeded)
    for ratio in ["4", "4.0", 5e-324, 0, -1, 0.05, 64.5, True, None, [4], {"ratio": 4}]:
        host = {"name": "n", "vcpus": 1, "memory_mib": 1, "cpu_allocation_ratio": ratio}
        if ratio is not None:  # null on create: the server's default
            r = seeded.client.post("/v1/hosts", json=host, headers=seeded.admin)
            assert_problem(r, 422, "validation_error")
            r = seeded.client.post("/v1/hosts:batch", json={"hosts": [host]}, headers=seeded.admin)
            assert_problem(r, 422, "validation_error")
        r = seeded.client.patch("/v1/hosts/node-1", json={"cpu_allocation_ratio": ratio}, headers=seeded.admin)
        assert_problem(r, 422, "validation_error")
    assert snapshot(seeded) == before


def test_a_cpu_allocation_ratio_in_range_is_taken_as_sent(api: Api) -> None:
    for i, ratio in enumerate([0.1, 1, 1.5, 4, 64]):
        body = {"name": f"n{i}", "vcpus": 10, "memory_mib": 1, "cpu_allocation_ratio": ratio}
        r = api.client.post("/v1/hosts", json=body, headers=api.admin)
        assert r.status_code == 201, r.text
        assert r.json()["cpu_allocation_ratio"] == ratio
        r = api.client.patch(f"/v1/hosts/n{i}", json={"cpu_allocation_ratio": 64 - ratio + 0.1}, headers=api.admin)
        assert r.status_code == 200, r.text


def test_the_ratio_range_is_declared_in_the_schema(api: Api) -> None:
    schemas = api.client.get("/openapi.json").json()["components"]["schemas"]
    for model in ("HostCreate", "HostPatch", "HostRegistration"):
        prop = schemas[model]["properties"]["cpu_allocation_ratio"]
        number = next(p for p in prop.get("anyOf", [prop]) if p.get("type") == "number")
        assert (number["minimum"], number["maximum"]) == (0.1, 64)
