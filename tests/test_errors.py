"""Errors (API.md, Errors): every refusal is a problem document with a stable code, and changes nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.app import create_app
from tests.conftest import ADMIN_TOKEN, Api, load_body, make_settings
from tests.helpers import assert_problem, live_server, snapshot

MIB = 1024 * 1024


@pytest.fixture
def seeded(api: Api) -> Api:
    """Two hosts with loads, a VM, tokens: a state that a refused request must leave alone."""
    api.ready_host("node-1", labels={"zone": "a"})
    api.ready_host("node-2", "disabled")
    assert api.create_vm(name="td-1").status_code == 201
    api.token("reader")
    return api


def _unchanged(api: Api, before: dict[str, Any]) -> None:
    assert snapshot(api) == before


# ---- request bodies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"{", b"not json", b'{"name": "x",}', b"[1, 2]", b'"a string"', b"null", b"\xff\xfe"],
    ids=["truncated", "text", "trailing-comma", "array", "string", "null", "bad-utf8"],
)
def test_malformed_json_is_422(seeded: Api, raw: bytes) -> None:
    api = seeded
    before = snapshot(api)
    r = api.client.post("/v1/hosts", content=raw, headers={**api.admin, "Content-Type": "application/json"})
    assert_problem(r, 422, "validation_error")
    _unchanged(api, before)


HOST = {"name": "node-9", "vcpus": 8, "memory_mib": 1024}


@pytest.mark.parametrize(
    "change",
    [
        {"vcpus": "8"}, {"vcpus": 8.5}, {"vcpus": True}, {"vcpus": None}, {"vcpus": 0},
        {"vcpus": -1}, {"vcpus": 2**31}, {"memory_mib": "1024"}, {"memory_mib": 0}, {"labels": ["a"]},
        {"labels": {"zone": 1}}, {"labels": {"bad key!": "v"}}, {"labels": {"k": "bad value!"}},
        {"reserved_vcpus": 9}, {"reserved_memory_mib": 4096}, {"reserved_vcpus": -1},
        {"name": "Node-9"}, {"name": "a" * 64}, {"name": ""}, {"name": "node_9"}, {"name": "-node"},
        {"name": "node-"}, {"name": 9}, {"name": None}, {"unknown": 1}, {"generation": 5},
    ],
    ids=lambda c: json.dumps(c)[:40],
)
def test_invalid_host_bodies_are_422(seeded: Api, change: dict[str, Any]) -> None:
    api = seeded
    before = snapshot(api)
    body = assert_problem(api.client.post("/v1/hosts", json={**HOST, **change}, headers=api.admin),
                          422, "validation_error")
    assert body["errors"], body
    _unchanged(api, before)


def test_missing_required_fields_are_named(seeded: Api) -> None:
    body = assert_problem(api_post(seeded, "/v1/hosts", {"name": "x"}), 422, "validation_error")
    locs = [e["loc"] for e in body["errors"]]
    assert ["body", "vcpus"] in locs and ["body", "memory_mib"] in locs


def api_post(api: Api, path: str, body: Any) -> httpx.Response:
    return api.client.post(path, json=body, headers=api.admin)


@pytest.mark.parametrize(
    "change",
    [
        {"tdx_effective": "yes"}, {"tdx_effective": 1}, {"kvm_intel_loaded": "true"}, {"tdx_platform": None},
        {"keyids_total": "15"}, {"keyids_total": -1}, {"keyids_total": 1.5}, {"load_id": "not-a-uuid"},
        {"boot_id": ""}, {"boot_id": "has space"}, {"kernel": ""}, {"errors": "one"}, {"errors": [1]},
        {"vcpus": 0}, {"surprise": True},
    ],
    ids=lambda c: json.dumps(c)[:40],
)
def test_invalid_load_reports_are_422(seeded: Api, change: dict[str, Any]) -> None:
    api = seeded
    before = snapshot(api)
    assert_problem(api_post(api, "/v1/hosts/node-1/loads", load_body(**change)), 422, "validation_error")
    _unchanged(api, before)


def test_load_report_missing_a_fact_is_422(seeded: Api) -> None:
    api = seeded
    before = snapshot(api)
    body = load_body()
    del body["tdx_effective"]
    assert_problem(api_post(api, "/v1/hosts/node-1/loads", body), 422, "validation_error")
    _unchanged(api, before)


@pytest.mark.parametrize(
    "body",
    [{"schedulable": "false"}, {"schedulable": None}, {"labels": None}, {"reserved_vcpus": "1"},
     {"name": "rename"}, {"vcpus": 4}],
    ids=lambda c: json.dumps(c)[:40],
)
def test_invalid_patches_are_422(seeded: Api, body: dict[str, Any]) -> None:
    api = seeded
    before = snapshot(api)
    r = api.client.patch("/v1/hosts/node-1", json=body, headers=api.admin)
    assert_problem(r, 422, "validation_error")
    _unchanged(api, before)


CURRENT = "<current load id>"


@pytest.mark.parametrize(
    "body",
    [{"load_id": "x"}, {"load_id": None}, {}, {"keyids_in_use": 1}, {"load_id": CURRENT, "keyids_in_use": -1},
     {"load_id": CURRENT, "keyids_in_use": "1"}, {"load_id": CURRENT, "running_vms": ["nope"]},
     {"load_id": CURRENT, "extra": 1}],
    ids=lambda c: json.dumps(c)[:40],
)
def test_invalid_heartbeats_are_422(seeded: Api, body: dict[str, Any]) -> None:
    api = seeded
    load_id = api.client.get("/v1/hosts/node-1", headers=api.admin).json()["load"]["id"]
    before = snapshot(api)
    r = api_post(api, "/v1/hosts/node-1/heartbeat", {k: load_id if v == CURRENT else v for k, v in body.items()})
    assert_problem(r, 422, "validation_error")
    _unchanged(api, before)


@pytest.mark.parametrize(
    "change",
    [{"vcpus": "2"}, {"vcpus": 2.5}, {"vcpus": True}, {"tdx": "yes"}, {"memory_mib": "2048"}, {"name": "VM"},
     {"extra": 1}],
    ids=lambda c: json.dumps(c)[:40],
)
def test_invalid_vm_bodies_are_422(seeded: Api, change: dict[str, Any]) -> None:
    api = seeded
    before = snapshot(api)
    assert_problem(api.create_vm(**change), 422, "validation_error")
    _unchanged(api, before)


@pytest.mark.parametrize(
    "path", ["/v1/hosts/UPPER", "/v1/hosts/" + "a" * 64, "/v1/hosts/under_score", "/v1/hosts/-x"]
)
def test_bad_names_in_paths_are_422(seeded: Api, path: str) -> None:
    api = seeded
    before = snapshot(api)
    for method, body in (("GET", None), ("PATCH", {"schedulable": False}), ("DELETE", None)):
        assert_problem(api.client.request(method, path, json=body, headers=api.admin), 422, "validation_error")
    assert_problem(api_post(api, path + "/loads", load_body()), 422, "validation_error")
    _unchanged(api, before)


# ---- sizes -----------------------------------------------------------------------------------


def _huge_host() -> bytes:
    return json.dumps({**HOST, "labels": {"k": "v" * (MIB + 10)}}).encode()


def test_body_over_one_mib_is_413(seeded: Api) -> None:
    api = seeded
    before = snapshot(api)
    r = api.client.post("/v1/hosts", content=_huge_host(), headers={**api.admin, "Content-Type": "application/json"})
    assert_problem(r, 413, "payload_too_large")
    _unchanged(api, before)


def test_body_just_under_one_mib_is_read(seeded: Api) -> None:
    api = seeded
    raw = json.dumps({**HOST, "pad": ""}).encode()
    raw = raw.replace(b'"pad": ""', b'"pad": "' + b"x" * (MIB - len(raw) - 10) + b'"')
    assert len(raw) < MIB
    # Read whole and judged on its content (an unknown field), not refused for its size.
    r = api.client.post("/v1/hosts", content=raw, headers={**api.admin, "Content-Type": "application/json"})
    assert_problem(r, 422, "validation_error")


def _chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_chunked_body_over_one_mib_is_413(seeded: Api) -> None:
    api = seeded
    before = snapshot(api)
    r = api.client.post(
        "/v1/hosts", content=_chunks(_huge_host()), headers={**api.admin, "Content-Type": "application/json"}
    )
    assert "content-length" not in r.request.headers
    assert_problem(r, 413, "payload_too_large")
    _unchanged(api, before)


def test_chunked_body_over_one_mib_is_413_on_a_real_server(database_url: str) -> None:
    app = create_app(make_settings(database_url))
    try:
        with live_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
            r = http.post("/v1/hosts", content=_chunks(_huge_host()), headers=admin)
            assert r.request.headers.get("transfer-encoding") == "chunked"
            assert_problem(r, 413, "payload_too_large")
            small = json.dumps(HOST).encode()
            r = http.post("/v1/hosts", content=_chunks(small, 7), headers=admin)
            assert r.status_code == 201, r.text
            assert [h["name"] for h in http.get("/v1/hosts", headers=admin).json()["items"]] == ["node-9"]
    finally:
        app.state.ctx.db.dispose()


def test_content_length_over_one_mib_is_413_before_auth(api: Api) -> None:
    r = api.client.post("/v1/hosts", content=_huge_host(), headers={"Content-Type": "application/json"})
    assert_problem(r, 413, "payload_too_large")


# ---- routing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/nope", "/v1/hosts/node-1/nope", "/nope", "/v2/hosts"])
def test_unknown_paths_are_404(seeded: Api, path: str) -> None:
    api = seeded
    before = snapshot(api)
    assert_problem(api.client.get(path, headers=api.admin), 404, "not_found")
    assert_problem(api.client.post(path, json={}, headers=api.admin), 404, "not_found")
    _unchanged(api, before)


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/v1/hosts/node-1"), ("DELETE", "/v1/hosts"), ("POST", "/v1/hosts/node-1"),
     ("PATCH", "/v1/tokens"), ("GET", "/v1/hosts/node-1/heartbeat"), ("PUT", "/v1/events")],
)
def test_wrong_methods_are_405(seeded: Api, method: str, path: str) -> None:
    api = seeded
    before = snapshot(api)
    r = api.client.request(method, path, json={}, headers=api.admin)
    assert_problem(r, 405, "method_not_allowed")
    assert r.headers.get("allow")
    _unchanged(api, before)


# ---- authorization ---------------------------------------------------------------------------


def test_wrong_role_is_403_and_changes_nothing(seeded: Api) -> None:
    api = seeded
    reader = api.token("reader")
    before = snapshot(api)
    assert_problem(api.client.post("/v1/hosts", json=HOST, headers=reader), 403, "forbidden")
    assert_problem(api.client.delete("/v1/hosts/node-2", headers=reader), 403, "forbidden")
    _unchanged(api, before)


def test_another_hosts_token_is_403_and_changes_nothing(seeded: Api) -> None:
    api = seeded
    agent_2 = api.token("agent", host="node-2")
    load_id = api.client.get("/v1/hosts/node-1", headers=api.admin).json()["load"]["id"]
    before = snapshot(api)
    assert_problem(api_post_as(api, "/v1/hosts/node-1/loads", load_body(), agent_2), 403, "forbidden")
    assert_problem(api_post_as(api, "/v1/hosts/node-1/heartbeat", {"load_id": load_id}, agent_2), 403, "forbidden")
    _unchanged(api, before)


def api_post_as(api: Api, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    return api.client.post(path, json=body, headers=headers)


def test_unauthenticated_requests_are_401_whatever_the_body(seeded: Api) -> None:
    api = seeded
    before = snapshot(api)
    bad = {"Authorization": "Bearer tdx_unknown"}
    for headers in ({}, bad):
        r = api.client.post("/v1/hosts", json=HOST, headers=headers)
        assert_problem(r, 401, "unauthorized")
        r = api.client.post("/v1/hosts", content=b"{", headers={**headers, "Content-Type": "application/json"})
        assert_problem(r, 401, "unauthorized")
        r = api.client.post("/v1/hosts", json={"vcpus": "x"}, headers=headers)
        assert_problem(r, 401, "unauthorized")
    _unchanged(api, before)


def test_404s_for_missing_resources(seeded: Api) -> None:
    api = seeded
    before = snapshot(api)
    assert_problem(api.client.get("/v1/hosts/ghost", headers=api.admin), 404, "host_not_found")
    assert_problem(api.client.delete("/v1/hosts/ghost", headers=api.admin), 404, "host_not_found")
    assert_problem(api.client.get("/v1/hosts/ghost/loads", headers=api.admin), 404, "host_not_found")
    assert_problem(api_post(api, "/v1/hosts/ghost/loads", load_body()), 404, "host_not_found")
    _unchanged(api, before)
