"""Tokens and roles (API.md, Auth)."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from service.models import Token
from tests.conftest import Api, load_body
from tests.helpers import all_pages, assert_problem, snapshot


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _create(api: Api, **body: Any) -> dict[str, Any]:
    r = api.client.post("/v1/tokens", json=body, headers=api.admin)
    assert r.status_code == 201, r.text
    return dict(r.json())


def _stored_tokens(api: Api) -> list[Token]:
    return list(api.client.app.state.ctx.db.run_sync(lambda s: s.scalars(select(Token)).all(), write=False))  # type: ignore[attr-defined]


# ---- lifecycle of a token --------------------------------------------------------------------


def test_secret_is_shown_once_and_stored_only_as_hash(api: Api) -> None:
    api.create_host("node-1")
    created = _create(api, role="agent", host="node-1", description="agent of node-1")
    for key in ("id", "token", "role", "host", "project"):
        assert key in created
    assert created["role"] == "agent" and created["host"] == "node-1" and created["project"] is None
    secret = created["token"]
    assert isinstance(secret, str) and len(secret) >= 32

    listed = all_pages(api, "/v1/tokens")
    mine = [t for t in listed if t["id"] == created["id"]]
    assert len(mine) == 1
    assert "token" not in mine[0]
    assert secret not in str(listed)
    assert mine[0]["description"] == "agent of node-1"

    rows = [row for row in _stored_tokens(api) if str(row.id) == created["id"]]
    assert len(rows) == 1
    row = rows[0]
    assert row.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    for column in Token.__table__.columns:
        assert secret not in str(getattr(row, column.key)), column.key


def test_every_token_works_for_its_role(api: Api) -> None:
    api.create_host("node-1")
    for body in ({"role": "admin"}, {"role": "reader"}, {"role": "agent", "host": "node-1"},
                 {"role": "client", "project": "p1"}):
        created = _create(api, **body)
        r = api.client.get("/v1/hosts/node-1", headers=_bearer(created["token"]))
        expected = 403 if body["role"] == "client" else 200
        assert r.status_code == expected, (body, r.text)


def test_revoked_token_is_401_at_once(api: Api) -> None:
    created = _create(api, role="reader")
    headers = _bearer(created["token"])
    assert api.client.get("/v1/hosts", headers=headers).status_code == 200
    r = api.client.delete(f"/v1/tokens/{created['id']}", headers=api.admin)
    assert r.status_code == 204
    assert_problem(api.client.get("/v1/hosts", headers=headers), 401, "unauthorized")
    listed = {t["id"]: t for t in all_pages(api, "/v1/tokens")}
    assert listed[created["id"]]["revoked_at"] is not None
    # Revoking again is harmless; an unknown id is 404.
    assert api.client.delete(f"/v1/tokens/{created['id']}", headers=api.admin).status_code == 204
    assert_problem(api.client.delete(f"/v1/tokens/{uuid.uuid4()}", headers=api.admin), 404, "token_not_found")


def test_revoked_admin_token_cannot_act(api: Api) -> None:
    created = _create(api, role="admin")
    headers = _bearer(created["token"])
    assert api.client.delete(f"/v1/tokens/{created['id']}", headers=api.admin).status_code == 204
    r = api.client.post("/v1/hosts", json={"name": "x", "vcpus": 1, "memory_mib": 1}, headers=headers)
    assert_problem(r, 401, "unauthorized")
    assert all_pages(api, "/v1/hosts") == []


def test_token_list_paginates(api: Api) -> None:
    ids = {_create(api, role="reader")["id"] for _ in range(5)}
    page = api.client.get("/v1/tokens", params={"limit": 2}, headers=api.admin).json()
    assert len(page["items"]) == 2 and page["next"]
    assert {t["id"] for t in all_pages(api, "/v1/tokens", limit=2)} == ids


@pytest.mark.parametrize(
    "body",
    [
        {"role": "agent"},
        {"role": "client"},
        {"role": "reader", "host": "node-1"},
        {"role": "admin", "project": "p1"},
        {"role": "agent", "host": "node-1", "project": "p1"},
        {"role": "root"},
        {"role": "client", "project": "Not_A_Name"},
        {"role": "reader", "secret": "mine"},
        {},
    ],
)
def test_invalid_token_requests_are_422_and_change_nothing(api: Api, body: dict[str, Any]) -> None:
    api.create_host("node-1")
    before = snapshot(api)
    assert_problem(api.client.post("/v1/tokens", json=body, headers=api.admin), 422, "validation_error")
    assert snapshot(api) == before


def test_agent_token_for_unknown_host_is_404(api: Api) -> None:
    before = snapshot(api)
    r = api.client.post("/v1/tokens", json={"role": "agent", "host": "ghost"}, headers=api.admin)
    assert_problem(r, 404, "host_not_found")
    assert snapshot(api) == before


# ---- authentication --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer tdx_not-a-real-token"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "tdx_test-admin-token-of-32-characters-or-more"},
    ],
)
def test_missing_or_unknown_token_is_401(api: Api, headers: dict[str, str]) -> None:
    for method, path in (("GET", "/v1/hosts"), ("GET", "/v1/events"), ("GET", "/v1/tokens"),
                         ("POST", "/v1/tokens"), ("GET", "/v1/vms"), ("GET", "/v1/capacity")):
        r = api.client.request(method, path, headers=headers, json={"role": "admin"} if method == "POST" else None)
        body = assert_problem(r, 401, "unauthorized")
        assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), body
    assert len(all_pages(api, "/v1/tokens")) == 0


# ---- roles -----------------------------------------------------------------------------------


@pytest.fixture
def roles(api: Api) -> dict[str, dict[str, str]]:
    api.create_host("node-1")
    api.create_host("node-2")
    return {
        "reader": api.token("reader"),
        "agent": api.token("agent", host="node-1"),
        "client": api.token("client", project="p1"),
    }


def test_reader_reads_everything_but_writes_nothing(api: Api, roles: dict[str, dict[str, str]]) -> None:
    reader = roles["reader"]
    api.report_load("node-1")
    for path in ("/v1/hosts", "/v1/hosts/node-1", "/v1/hosts/node-1/loads", "/v1/hosts/node-1/vms", "/v1/vms",
                 "/v1/events", "/v1/capacity"):
        assert api.client.get(path, headers=reader).status_code == 200, path
    before = snapshot(api)
    load_id = api.client.get("/v1/hosts/node-1", headers=api.admin).json()["load"]["id"]
    writes: list[tuple[str, str, Any]] = [
        ("POST", "/v1/hosts", {"name": "node-3", "vcpus": 1, "memory_mib": 1}),
        ("PATCH", "/v1/hosts/node-1", {"schedulable": False}),
        ("DELETE", "/v1/hosts/node-2", None),
        ("POST", "/v1/hosts/node-1/drain", None),
        ("POST", "/v1/hosts/node-1/loads", load_body()),
        ("POST", "/v1/hosts/node-1/heartbeat", {"load_id": load_id}),
        ("POST", "/v1/tokens", {"role": "admin"}),
        ("POST", "/v1/vms", {"name": "vm", "vcpus": 1, "memory_mib": 1, "tdx": False}),
    ]
    for method, path, body in writes:
        assert_problem(api.client.request(method, path, json=body, headers=reader), 403, "forbidden")
    assert_problem(api.client.get("/v1/tokens", headers=reader), 403, "forbidden")
    assert snapshot(api) == before


def test_agent_acts_only_for_its_own_host(api: Api, roles: dict[str, dict[str, str]]) -> None:
    agent = roles["agent"]
    own = load_body()
    r = api.client.post("/v1/hosts/node-1/loads", json=own, headers=agent)
    assert r.status_code == 201, r.text
    r = api.client.post("/v1/hosts/node-1/heartbeat", json={"load_id": own["load_id"]}, headers=agent)
    assert r.status_code == 200, r.text
    r = api.client.get("/v1/hosts/node-1", headers=agent)
    assert r.status_code == 200 and r.headers["etag"]
    assert api.client.get("/v1/hosts/node-1/vms", headers=agent).status_code == 200

    other = api.report_load("node-2")
    before = snapshot(api)
    forbidden: list[tuple[str, str, Any]] = [
        ("POST", "/v1/hosts/node-2/loads", load_body()),
        ("POST", "/v1/hosts/node-2/heartbeat", {"load_id": other["load_id"]}),
        ("GET", "/v1/hosts/node-2", None),
        ("GET", "/v1/hosts/node-2/loads", None),
        ("GET", "/v1/hosts/node-2/vms", None),
        ("GET", "/v1/hosts", None),
        ("POST", "/v1/hosts", {"name": "node-3", "vcpus": 1, "memory_mib": 1}),
        ("PATCH", "/v1/hosts/node-1", {"schedulable": False}),
        ("DELETE", "/v1/hosts/node-1", None),
        ("POST", "/v1/hosts/node-1/drain", None),
        ("POST", "/v1/tokens", {"role": "admin"}),
        ("GET", "/v1/tokens", None),
        ("POST", "/v1/vms", {"name": "vm", "vcpus": 1, "memory_mib": 1, "tdx": False}),
        ("GET", "/v1/events", None),
    ]
    for method, path, body in forbidden:
        r = api.client.request(method, path, json=body, headers=agent)
        assert_problem(r, 403, "forbidden")
    assert snapshot(api) == before


def test_client_cannot_see_hosts_or_tokens(api: Api, roles: dict[str, dict[str, str]]) -> None:
    client = roles["client"]
    api.report_load("node-1")
    before = snapshot(api)
    for method, path, body in [
        ("GET", "/v1/hosts", None),
        ("GET", "/v1/hosts/node-1", None),
        ("GET", "/v1/hosts/node-1/loads", None),
        ("GET", "/v1/hosts/node-1/vms", None),
        ("POST", "/v1/hosts", {"name": "node-3", "vcpus": 1, "memory_mib": 1}),
        ("POST", "/v1/hosts/node-1/loads", load_body()),
        ("POST", "/v1/hosts/node-1/drain", None),
        ("GET", "/v1/tokens", None),
        ("POST", "/v1/tokens", {"role": "admin"}),
    ]:
        assert_problem(api.client.request(method, path, json=body, headers=client), 403, "forbidden")
    assert snapshot(api) == before
    # What a client may do.
    assert api.client.get("/v1/capacity", headers=client).status_code == 200
    vm = api.create_vm(headers=client, name="mine")
    assert vm.status_code == 201 and vm.json()["project"] == "p1"


def test_admin_may_do_everything(api: Api) -> None:
    api.create_host("node-1")
    body = api.report_load("node-1")
    assert api.client.post("/v1/hosts/node-1/heartbeat", json={"load_id": body["load_id"]},
                           headers=api.admin).status_code == 200
    for path in ("/v1/hosts", "/v1/hosts/node-1", "/v1/hosts/node-1/loads", "/v1/tokens", "/v1/events", "/v1/vms"):
        assert api.client.get(path, headers=api.admin).status_code == 200, path


def test_whoami_tells_each_token_its_role_and_binding(api: Api, roles: dict[str, dict[str, str]]) -> None:
    expected = {
        "reader": ("reader", None, None),
        "agent": ("agent", "node-1", None),
        "client": ("client", None, "p1"),
    }
    ids = {t["id"] for t in all_pages(api, "/v1/tokens")}
    for name, headers in roles.items():
        r = api.client.get("/v1/whoami", headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["role"], body["host"], body["project"]) == expected[name]
        assert body["token_id"] in ids
    admin = api.client.get("/v1/whoami", headers=api.admin).json()
    assert admin == {"role": "admin", "token_id": "bootstrap-admin", "host": None, "project": None}
    assert_problem(api.client.get("/v1/whoami"), 401, "unauthorized")


# ---- an agent token is bound to its host, not to the host's name (issue 9) --------------------


def test_deleting_a_host_revokes_its_agent_tokens(api: Api) -> None:
    api.create_host("node-1")
    old_agent = _create(api, role="agent", host="node-1")
    agent = _bearer(old_agent["token"])
    assert api.client.get("/v1/hosts/node-1", headers=agent).status_code == 200

    r = api.client.delete("/v1/hosts/node-1", headers=api.admin)
    assert r.status_code == 204, r.text
    assert_problem(api.client.get("/v1/hosts/node-1", headers=agent), 401, "unauthorized")
    listed = {t["id"]: t for t in all_pages(api, "/v1/tokens")}
    assert listed[old_agent["id"]]["revoked_at"] is not None
    events = api.client.get("/v1/events", params={"kind": "host.deleted"}, headers=api.admin).json()["items"]
    deleted = [e for e in events if e["kind"] == "host.deleted"]
    assert deleted[-1]["data"]["agent_tokens_revoked"] == 1

    # A new host of the same name is another host: the old agent's token does not act for it.
    api.create_host("node-1")
    body = load_body()
    for method, path, payload in [
        ("GET", "/v1/hosts/node-1", None),
        ("POST", "/v1/hosts/node-1/loads", body),
        ("GET", "/v1/hosts/node-1/vms", None),
    ]:
        assert_problem(api.client.request(method, path, json=payload, headers=agent), 401, "unauthorized")
    # ... a new token does.
    new_agent = _bearer(_create(api, role="agent", host="node-1")["token"])
    r = api.client.post("/v1/hosts/node-1/loads", json=body, headers=new_agent)
    assert r.status_code == 201, r.text


def test_a_host_deletion_leaves_other_hosts_agents_alone(api: Api) -> None:
    api.create_host("node-1")
    api.create_host("node-2")
    other = _bearer(_create(api, role="agent", host="node-2")["token"])
    _create(api, role="agent", host="node-1")
    assert api.client.delete("/v1/hosts/node-1", headers=api.admin).status_code == 204
    assert api.client.get("/v1/hosts/node-2", headers=other).status_code == 200


def test_an_agent_token_whose_host_row_is_gone_is_refused(api: Api) -> None:
    """Even unrevoked (a host row deleted behind the API's back), a token of a missing host acts for
    no host: the binding is the host's id."""
    api.create_host("node-1")
    created = _create(api, role="agent", host="node-1")

    def _drop(s: Any) -> None:
        from service.models import Host

        s.delete(s.scalars(select(Host).where(Host.name == "node-1")).one())

    api.client.app.state.ctx.db.run_sync(_drop)  # type: ignore[attr-defined]
    api.create_host("node-1")
    assert_problem(api.client.get("/v1/hosts/node-1", headers=_bearer(created["token"])), 401, "unauthorized")
