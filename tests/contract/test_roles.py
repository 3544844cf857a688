"""The roles each operation declares (``x-roles`` in /openapi.json, the role column of docs/api.md)
are the roles the server lets through: every other role gets 403. New operations are covered as
they appear in the spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from service.app import create_app
from tests.conftest import Api, make_settings

ROLES = ("reader", "agent", "client")
METHODS = ("get", "put", "post", "delete", "patch")


def _spec() -> dict[str, Any]:
    app = create_app(make_settings("sqlite://"))  # only to read its schema: no database is opened
    return app.openapi()


SPEC = _spec()
V1_OPERATIONS = [
    (method, path)
    for path, item in SPEC["paths"].items()
    for method in item
    if method in METHODS and path.startswith("/v1/")
]


@dataclass
class World:
    vm_id: str
    token_id: str
    headers: dict[str, dict[str, str]]


def _world(api: Api) -> World:
    """node-1 TDX-ready with one VM of project web on it; a token of each role bound to them."""
    api.ready_host("node-1")
    vm = api.create_vm(name="web-1", project="web")
    assert vm.status_code == 201 and vm.json()["host"] == "node-1", vm.text
    headers = {
        "reader": api.token("reader"),
        "agent": api.token("agent", host="node-1"),
        "client": api.token("client", project="web"),
    }
    tokens = api.client.get("/v1/tokens", headers=api.admin).json()["items"]
    return World(vm_id=vm.json()["id"], token_id=tokens[0]["id"], headers=headers)


def _example(schema: dict[str, Any]) -> Any:
    if "$ref" in schema:
        return _example(SPEC["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]])
    if "oneOf" in schema:
        return _example(schema["oneOf"][0])
    if "anyOf" in schema:  # an optional body: the body itself, not null
        return _example(next(s for s in schema["anyOf"] if s.get("type") != "null"))
    assert schema.get("examples"), f"request body schema without an example: {schema}"
    return schema["examples"][0]


def _call(api: Api, method: str, path: str, world: World, headers: dict[str, str]) -> httpx.Response:
    op = SPEC["paths"][path][method]
    values = {
        "name": "node-1", "vm_id": world.vm_id, "token_id": world.token_id, "project": "web",
        "op_id": "00000000-0000-4000-8000-000000000000",  # roles are checked before the lookup
    }
    url = path.format(**values)  # a new path parameter needs a value here (KeyError names it)
    body = op.get("requestBody")
    json = _example(body["content"]["application/json"]["schema"]) if body else None
    return api.client.request(method.upper(), url, json=json, headers=headers)


def _streams(method: str, path: str) -> bool:
    return "text/event-stream" in SPEC["paths"][path][method]["responses"].get("200", {}).get("content", {})


@pytest.mark.parametrize(("method", "path"), V1_OPERATIONS, ids=[f"{m.upper()} {p}" for m, p in V1_OPERATIONS])
def test_declared_roles_are_the_enforced_roles(api: Api, method: str, path: str) -> None:
    declared = SPEC["paths"][path][method].get("x-roles")
    assert declared, f"{method.upper()} {path} declares no roles (openapi_extra=roles(...))"
    allowed = {entry.split()[0] for entry in declared}
    assert allowed <= {"admin", *ROLES} and "admin" in allowed, declared
    world = _world(api)
    # Refusals first: an allowed call may change what the next one sees (a delete, a new load).
    for role in sorted(set(ROLES) - allowed):
        r = _call(api, method, path, world, world.headers[role])
        assert r.status_code == 403, (role, r.status_code, r.text)
    if _streams(method, path):
        return  # an allowed stream never ends; the refusals above come before it starts
    for role in sorted(allowed & set(ROLES)):
        r = _call(api, method, path, world, world.headers[role])
        assert r.status_code != 403, (role, r.text)
