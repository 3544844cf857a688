"""/openapi.json says what the server does: problems, auth, replays, media types, formats."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from service.openapi import PROBLEM_CODES
from tests.conftest import Api, load_body
from tests.helpers import assert_problem

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("get", "put", "post", "delete", "patch")


@pytest.fixture
def spec(api: Api) -> dict[str, Any]:
    r = api.client.get("/openapi.json")
    assert r.status_code == 200
    return dict(r.json())


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, m, op) for path, item in spec["paths"].items() for m, op in item.items() if m in METHODS]


def test_operation_ids_read_like_the_api(spec: dict[str, Any]) -> None:
    ids = [op["operationId"] for _, _, op in operations(spec)]
    assert len(ids) == len(set(ids))
    for op_id in ids:
        assert re.fullmatch(r"[a-z][A-Za-z0-9]*", op_id), op_id
    expected = {
        ("post", "/v1/hosts"): "createHost",
        ("get", "/v1/hosts"): "listHosts",
        ("get", "/v1/hosts/{name}"): "getHost",
        ("patch", "/v1/hosts/{name}"): "updateHost",
        ("post", "/v1/hosts/{name}/loads"): "reportLoad",
        ("post", "/v1/hosts/{name}/heartbeat"): "sendHeartbeat",
        ("post", "/v1/vms"): "createVm",
        ("get", "/v1/vms/{vm_id}"): "getVm",
        ("post", "/v1/tokens"): "createToken",
        ("get", "/v1/capacity"): "getCapacity",
    }
    for (method, path), op_id in expected.items():
        assert spec["paths"][path][method]["operationId"] == op_id


def test_every_v1_operation_declares_bearer_auth(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert list(schemes) == ["bearerAuth"]
    assert (schemes["bearerAuth"]["type"], schemes["bearerAuth"]["scheme"]) == ("http", "bearer")
    for path, _, op in operations(spec):
        if path.startswith("/v1/"):
            assert op["security"] == [{"bearerAuth": []}], path
            assert {"401", "403", "503"} <= set(op["responses"]), path
        else:
            assert "security" not in op, path


def test_every_error_status_is_a_problem_document(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert set(schemas["Problem"]["required"]) == {"type", "title", "status", "detail", "code"}
    assert schemas["ValidationProblem"]["properties"]["errors"]["items"] == {
        "$ref": "#/components/schemas/ValidationErrorItem"
    }
    assert schemas["ValidationErrorItem"]["required"] == ["loc", "msg"]
    for path, method, op in operations(spec):
        for status, response in op["responses"].items():
            if int(status) < 400:
                continue
            content = response["content"]
            assert list(content) == ["application/problem+json"], (path, method, status)
            ref = content["application/problem+json"]["schema"]["$ref"]
            assert ref == f"#/components/schemas/{'ValidationProblem' if status == '422' else 'Problem'}"
            assert response["x-problem-codes"], (path, method, status)
            for code in response["x-problem-codes"]:
                assert int(status) in PROBLEM_CODES[code][0], (path, method, status, code)
        if "requestBody" in op:
            assert {"400", "413", "422"} <= set(op["responses"]), (path, method)


def test_every_problem_code_the_service_raises_is_catalogued() -> None:
    raised: set[tuple[int, str]] = set()
    for source in (ROOT / "service").rglob("*.py"):
        text = source.read_text()
        found = re.findall(r'(?:ProblemError|problem_response)\(\s*(\d{3}),\s*"(\w+)"', text)
        raised |= {(int(status), code) for status, code in found}
        raised |= {(404, f"{kind}_not_found") for kind in re.findall(r'not_found\("(\w+)"', text)}
    raised.discard((404, "file_not_found"))  # the dashboard's static files, outside the API
    raised.discard((500, "internal_error"))  # never part of the contract: a bug to fix
    assert raised, "the pattern found nothing: the test would pass vacuously"
    for status, code in sorted(raised):
        assert code in PROBLEM_CODES and status in PROBLEM_CODES[code][0], (status, code)


def test_replays_are_declared_200(spec: dict[str, Any]) -> None:
    load = spec["paths"]["/v1/hosts/{name}/loads"]["post"]["responses"]
    assert load["201"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/HostOut"}
    assert load["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/HostOut"}
    vm = spec["paths"]["/v1/vms"]["post"]["responses"]
    assert vm["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/VmOut"}


def test_replayed_load_report_answers_200_as_declared(api: Api) -> None:
    api.create_host("node-1")
    body = load_body()
    first = api.client.post("/v1/hosts/node-1/loads", json=body, headers=api.admin)
    again = api.client.post("/v1/hosts/node-1/loads", json=body, headers=api.admin)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["load"]["id"] == body["load_id"]


def test_metrics_and_event_stream_media_types(spec: dict[str, Any], api: Api) -> None:
    assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert list(spec["paths"]["/v1/events/stream"]["get"]["responses"]["200"]["content"]) == ["text/event-stream"]
    r = api.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")


def test_patch_fields_that_refuse_null_are_not_nullable(spec: dict[str, Any], api: Api) -> None:
    patch = spec["components"]["schemas"]["HostPatch"]
    for name, prop in patch["properties"].items():
        assert "null" not in str(prop) and "default" not in prop, (name, prop)
    api.create_host("node-1")
    for name in patch["properties"]:
        r = api.client.patch("/v1/hosts/node-1", json={name: None}, headers=api.admin)
        assert_problem(r, 422, "validation_error")


def test_label_formats_are_in_the_schema(spec: dict[str, Any]) -> None:
    labels = spec["components"]["schemas"]["HostCreate"]["properties"]["labels"]
    assert labels["maxProperties"] == 64
    assert labels["propertyNames"]["maxLength"] == 253
    assert labels["propertyNames"]["pattern"].startswith("^") and labels["propertyNames"]["pattern"].endswith("$")
    assert labels["additionalProperties"]["maxLength"] == 63
    selector = spec["components"]["schemas"]["VmCreate"]["properties"]["selector"]
    assert selector["propertyNames"] == labels["propertyNames"]


@pytest.mark.parametrize(
    "labels",
    [{"zone": "a\n"}, {"zone\n": "a"}, {"a" * 250 + "/zone": "a"}, {f"k{i}": "v" for i in range(65)}],
    ids=["value-newline", "key-newline", "key-too-long", "too-many"],
)
def test_labels_outside_the_schema_are_refused(api: Api, labels: dict[str, str]) -> None:
    r = api.client.post("/v1/hosts", json={"name": "node-1", "vcpus": 4, "memory_mib": 1024, "labels": labels},
                        headers=api.admin)
    assert_problem(r, 422, "validation_error")


def test_an_integral_number_is_an_integer(api: Api) -> None:
    """JSON Schema's "integer" holds 2.0; the server agrees. Strings, booleans, fractions do not."""
    r = api.client.post("/v1/hosts", json={"name": "node-1", "vcpus": 8.0, "memory_mib": 1024.0}, headers=api.admin)
    assert r.status_code == 201, r.text
    assert (r.json()["vcpus"], r.json()["memory_mib"]) == (8, 1024)
    vm = api.create_vm(vcpus=2.0, memory_mib=512.0, priority=-3.0, tdx=False)
    assert vm.status_code == 201, vm.text
    assert (vm.json()["vcpus"], vm.json()["priority"]) == (2, -3)
    for bad in ("8", True, 8.5, 1e300):
        r = api.client.post("/v1/hosts", json={"name": "node-2", "vcpus": bad, "memory_mib": 1024}, headers=api.admin)
        assert_problem(r, 422, "validation_error")


def test_a_ratio_is_a_number_not_a_string(api: Api) -> None:
    body = {"name": "node-1", "vcpus": 8, "memory_mib": 1024, "cpu_allocation_ratio": "4"}
    assert_problem(api.client.post("/v1/hosts", json=body, headers=api.admin), 422, "validation_error")
    body["cpu_allocation_ratio"] = 4
    assert api.client.post("/v1/hosts", json=body, headers=api.admin).status_code == 201


def test_token_bodies_say_which_binding_each_role_takes(spec: dict[str, Any], api: Api) -> None:
    body = spec["paths"]["/v1/tokens"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["discriminator"]["propertyName"] == "role"
    assert set(body["discriminator"]["mapping"]) == {"admin", "reader", "agent", "client"}
    schemas = spec["components"]["schemas"]
    assert "host" in schemas["AgentTokenCreate"]["required"]
    assert "project" in schemas["ClientTokenCreate"]["required"]
    api.create_host("node-1")
    assert api.client.post("/v1/tokens", json={"role": "agent", "host": "node-1"}, headers=api.admin).status_code == 201
    assert api.client.post("/v1/tokens", json={"role": "reader", "host": None}, headers=api.admin).status_code == 201
    for bad in ({"role": "agent"}, {"role": "client"}, {"role": "reader", "host": "node-1"},
                {"role": "agent", "host": "node-1", "project": "p"}, {"role": "root"}):
        assert_problem(api.client.post("/v1/tokens", json=bad, headers=api.admin), 422, "validation_error")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/v1/hosts/node-1", "GET, PATCH, DELETE"),
        ("PUT", "/v1/hosts", "GET, POST"),
        ("DELETE", "/v1/vms", "GET, POST"),
        ("POST", "/metrics", "GET"),
    ],
)
def test_405_allows_every_method_of_the_path(api: Api, method: str, path: str, allow: str) -> None:
    r = api.client.request(method, path, headers=api.admin)
    assert_problem(r, 405, "method_not_allowed")
    assert r.headers["allow"] == allow


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/tokens", {"role": "reader", "description": "a\u0000b"}),
        ("/v1/tokens", {"role": "reader", "description": "bell\u0007"}),
        ("/v1/hosts/node-1/loads", {**load_body(), "kernel": "6.16\u0000"}),
        ("/v1/hosts/node-1/loads", {**load_body(), "errors": ["tdx: \u0000 failed"]}),
    ],
    ids=["nul", "bell", "kernel-nul", "log-line-nul"],
)
def test_control_characters_in_text_are_refused_on_every_database(api: Api, path: str, body: dict[str, Any]) -> None:
    api.create_host("node-1")
    assert_problem(api.client.post(path, json=body, headers=api.admin), 422, "validation_error")


def test_free_text_allows_tabs_and_newlines_one_line_text_none(api: Api) -> None:
    api.ready_host("node-1")
    vm = api.create_vm().json()
    r = api.client.post(f"/v1/vms/{vm['id']}/status", json={"status": "failed", "detail": "line 1\n\tline 2"},
                        headers=api.admin)
    assert r.status_code == 200, r.text
    # A description is one line (a list shows it in a row): no newline, no tab.
    r = api.client.post("/v1/tokens", json={"role": "reader", "description": "line 1\n\tline 2"}, headers=api.admin)
    assert_problem(r, 422, "validation_error")
    r = api.client.get("/v1/events", params={"subject": "a\u0000"}, headers=api.admin)
    assert_problem(r, 422, "validation_error")


@pytest.mark.parametrize(
    "url",
    [
        "/v1/events?after=9223372036854775808",
        "/v1/events/stream?after=9223372036854775808",
        "/v1/capacity?vcpus=1&memory_mib=99999999999999999999",
    ],
)
def test_integers_beyond_their_declared_range_are_422(api: Api, url: str) -> None:
    """Found by schemathesis: the stream was cut mid-response, the others answered 500."""
    assert_problem(api.client.get(url, headers=api.admin), 422, "validation_error")


@pytest.mark.parametrize("value", ["²", "9" * 5000, "9223372036854775808", "-1", ""])
def test_last_event_id_that_is_no_event_id_is_400(api: Api, value: str) -> None:
    r = api.client.get("/v1/events/stream", headers={**api.admin, "Last-Event-ID": value.encode()})
    assert_problem(r, 400, "invalid_last_event_id")
