"""The event log (API.md, Events): filters, cursors, long-poll, Server-Sent Events, visibility."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from service.app import create_app
from tests.conftest import ADMIN_TOKEN, Api, load_body, make_settings
from tests.helpers import assert_problem, head_id, live_server


def _events(api: Api, headers: dict[str, str] | None = None, **params: Any) -> dict[str, Any]:
    r = api.client.get("/v1/events", params=params, headers=headers or api.admin)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_empty_log(api: Api) -> None:
    page = _events(api)
    assert page == {"items": [], "last_id": 0, "head_id": 0}


def test_host_operations_are_logged_in_order(api: Api) -> None:
    api.create_host("node-1", labels={"zone": "a"})
    first = api.report_load("node-1", "disabled")
    api.report_load("node-1", "ready", boot_id=first["boot_id"])
    api.report_load("node-1", "ready")  # a new boot
    page = _events(api)
    items = page["items"]
    assert [e["kind"] for e in items] == [
        "host.created",
        "host.load_reported", "host.tdx_state_changed",  # unknown -> disabled
        "host.load_reported", "host.tdx_state_changed",  # disabled -> ready (reload)
        "host.rebooted", "host.load_reported",  # new boot, state unchanged
    ]
    ids = [e["id"] for e in items]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(e["subject"] == "node-1" for e in items)
    for e in items:
        assert set(e) == {"id", "at", "kind", "subject", "data"}
        assert e["at"].endswith(("Z", "+00:00"))
    assert items[0]["data"]["labels"] == {"zone": "a"}
    assert items[1]["data"]["load_id"] == first["load_id"]
    assert items[1]["data"]["tdx_state"] == "disabled"
    assert items[2]["data"]["from"] == "unknown" and items[2]["data"]["to"] == "disabled"
    assert items[4]["data"]["from"] == "disabled" and items[4]["data"]["to"] == "ready"
    assert page["last_id"] == ids[-1] == page["head_id"]


def test_after_last_id_and_head_id(api: Api) -> None:
    for i in range(5):
        api.create_host(f"h{i}")
    everything = _events(api)
    ids = [e["id"] for e in everything["items"]]
    head = everything["head_id"]
    assert head == ids[-1]
    page = _events(api, after=ids[1], limit=2)
    assert [e["id"] for e in page["items"]] == ids[2:4]
    assert page["last_id"] == ids[3]
    assert page["head_id"] == head
    rest = _events(api, after=page["last_id"])
    assert [e["id"] for e in rest["items"]] == ids[4:]
    # Nothing new: last_id is what was passed as after, head_id is the newest id.
    none = _events(api, after=rest["last_id"])
    assert none["items"] == [] and none["last_id"] == rest["last_id"] and none["head_id"] == head
    beyond = _events(api, after=head + 100)
    assert beyond["items"] == [] and beyond["last_id"] == head + 100 and beyond["head_id"] == head
    # Watching "from now": start at head_id, see only what comes after.
    api.create_host("h-new")
    fresh = _events(api, after=head)
    assert [(e["kind"], e["subject"]) for e in fresh["items"]] == [("host.created", "h-new")]


def test_kind_subject_and_limit_filters(api: Api) -> None:
    api.create_host("node-1")
    api.create_host("node-2")
    api.report_load("node-1", "ready")
    api.report_load("node-2", "failed")
    api.client.post("/v1/hosts/node-2/drain", headers=api.admin)

    def kinds_subjects(**params: Any) -> list[tuple[str, str]]:
        return [(e["kind"], e["subject"]) for e in _events(api, **params)["items"]]

    assert kinds_subjects(kind="host.created") == [("host.created", "node-1"), ("host.created", "node-2")]
    assert kinds_subjects(kind="host.created,host.draining") == [
        ("host.created", "node-1"), ("host.created", "node-2"), ("host.draining", "node-2"),
    ]
    assert kinds_subjects(kind=["host.created", "host.draining"]) == kinds_subjects(
        kind="host.created,host.draining"
    )
    assert kinds_subjects(subject="node-2") == [
        ("host.created", "node-2"), ("host.load_reported", "node-2"), ("host.tdx_state_changed", "node-2"),
        ("host.draining", "node-2"),
    ]
    assert kinds_subjects(subject="node-1", kind="host.tdx_state_changed") == [
        ("host.tdx_state_changed", "node-1")
    ]
    assert kinds_subjects(kind="vm.created") == []
    assert kinds_subjects(subject="nobody") == []
    limited = _events(api, limit=2)
    assert len(limited["items"]) == 2
    assert limited["last_id"] == limited["items"][-1]["id"]
    assert limited["head_id"] > limited["last_id"]


@pytest.mark.parametrize("params", [{"after": -1}, {"limit": 0}, {"limit": 501}, {"wait": 31}, {"wait": -1},
                                    {"after": "x"}])
def test_invalid_event_queries_are_422(api: Api, params: dict[str, Any]) -> None:
    assert_problem(api.client.get("/v1/events", params=params, headers=api.admin), 422, "validation_error")


def test_vm_events(api: Api) -> None:
    api.ready_host("node-1")
    start = head_id(api)
    vm = api.create_vm(name="td-1").json()
    pending = api.create_vm(name="huge", vcpus=4096).json()
    items = _events(api, after=start)["items"]
    assert [(e["kind"], e["subject"]) for e in items] == [
        ("vm.created", vm["id"]), ("vm.scheduled", vm["id"]),
        ("vm.created", pending["id"]), ("vm.unschedulable", pending["id"]),
    ]
    assert items[1]["data"]["host"] == "node-1"


def test_long_poll_returns_as_soon_as_an_event_is_written(api: Api) -> None:
    api.create_host("node-1")
    head = head_id(api)
    result: dict[str, Any] = {}

    def wait() -> None:
        r = api.client.get("/v1/events", params={"after": head, "wait": 25}, headers=api.admin)
        result["status"] = r.status_code
        result["body"] = r.json()

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)  # let the poll start waiting (not needed for correctness)
    assert waiter.is_alive(), "the poll returned before any event was written"
    api.create_host("node-2")
    waiter.join(timeout=20)
    assert not waiter.is_alive(), "the poll did not return after an event was written"
    assert result["status"] == 200
    items = result["body"]["items"]
    assert [(e["kind"], e["subject"]) for e in items] == [("host.created", "node-2")]
    assert result["body"]["last_id"] == items[0]["id"] == head + 1


def test_long_poll_with_a_filter_ignores_other_events(api: Api) -> None:
    api.create_host("node-1")
    head = head_id(api)
    result: dict[str, Any] = {}

    def wait() -> None:
        r = api.client.get(
            "/v1/events", params={"after": head, "wait": 25, "kind": "host.draining"}, headers=api.admin
        )
        result["body"] = r.json()

    waiter = threading.Thread(target=wait)
    waiter.start()
    api.create_host("node-2")  # not what the poll waits for
    time.sleep(0.3)
    assert waiter.is_alive()
    api.client.post("/v1/hosts/node-1/drain", headers=api.admin)
    waiter.join(timeout=20)
    assert not waiter.is_alive()
    assert [(e["kind"], e["subject"]) for e in result["body"]["items"]] == [("host.draining", "node-1")]


def test_long_poll_answers_empty_when_nothing_happens(api: Api) -> None:
    head = head_id(api)
    page = _events(api, after=head, wait=0.5)
    assert page == {"items": [], "last_id": head, "head_id": head}


def test_long_poll_returns_at_once_when_events_exist(api: Api) -> None:
    api.create_host("node-1")
    page = _events(api, after=0, wait=25)
    assert [e["kind"] for e in page["items"]] == ["host.created"]


# ---- visibility ------------------------------------------------------------------------------


def test_clients_see_only_their_own_projects_vm_events(api: Api) -> None:
    api.ready_host("node-1")
    p1 = api.token("client", project="p1")
    p2 = api.token("client", project="p2")
    mine = api.create_vm(headers=p1, name="mine").json()
    theirs = api.create_vm(headers=p2, name="theirs").json()
    admin_made = api.create_vm(name="admins", project="p1").json()

    seen = _events(api, headers=p1)
    subjects = {e["subject"] for e in seen["items"]}
    assert subjects == {mine["id"], admin_made["id"]}
    assert all(e["kind"].startswith("vm.") for e in seen["items"])
    assert _events(api, headers=p1, subject=theirs["id"])["items"] == []
    assert _events(api, headers=p1, subject="node-1")["items"] == []
    assert _events(api, headers=p1, kind="host.created")["items"] == []
    assert {e["subject"] for e in _events(api, headers=p2)["items"]} == {theirs["id"]}
    # Readers see everything.
    reader = api.token("reader")
    assert {mine["id"], theirs["id"], "node-1"} <= {e["subject"] for e in _events(api, headers=reader)["items"]}


def test_agents_and_unknown_tokens_cannot_read_events(api: Api) -> None:
    api.create_host("node-1")
    agent = api.token("agent", host="node-1")
    assert_problem(api.client.get("/v1/events", headers=agent), 403, "forbidden")
    assert_problem(api.client.get("/v1/events/stream", headers=agent), 403, "forbidden")
    assert_problem(api.client.get("/v1/events"), 401, "unauthorized")
    assert_problem(api.client.get("/v1/events/stream"), 401, "unauthorized")


@pytest.mark.parametrize(
    "value",
    [b"abc", "\u0663".encode(), b"1 2", b"0x10"],
    ids=["letters", "arabic-indic-three", "two-ids", "hex"],
)
def test_stream_rejects_a_bad_last_event_id(api: Api, value: bytes) -> None:
    # Refused with a problem before the stream starts (more cases: tests/contract/test_openapi.py).
    r = api.client.get("/v1/events/stream", headers={**api.admin, "Last-Event-ID": value})
    assert_problem(r, 400, "invalid_last_event_id")


@pytest.mark.parametrize("after", ["1" * 5000, "\u00b2"])
def test_event_ids_that_are_no_64_bit_integer_are_422(api: Api, after: str) -> None:
    for path in ("/v1/events", "/v1/events/stream"):
        assert_problem(api.client.get(path, params={"after": after}, headers=api.admin), 422, "validation_error")


def test_the_largest_event_id_is_a_valid_position(api: Api) -> None:
    api.create_host("node-1")
    page = _events(api, after=2**63 - 1)
    assert page["items"] == [] and page["last_id"] == 2**63 - 1 and page["head_id"] >= 1


# ---- Server-Sent Events (a real server: the stream never ends by itself) ---------------------


def _read_frames(response: httpx.Response, count: int) -> list[dict[str, str]]:
    """The next ``count`` event frames (comments and retry hints skipped)."""
    frames: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if "id" in current:
                frames.append(current)
                if len(frames) == count:
                    return frames
            current = {}
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        current[field] = value.removeprefix(" ")
    raise AssertionError(f"stream ended after {frames}")


@pytest.fixture
def server(database_url: str) -> Any:
    app = create_app(make_settings(database_url))
    with live_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        http.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        yield http
    app.state.ctx.db.dispose()


def test_sse_frames_and_resume_with_last_event_id(server: httpx.Client) -> None:
    http = server
    for i in range(3):
        assert http.post("/v1/hosts", json={"name": f"h{i}", "vcpus": 1, "memory_mib": 1}).status_code == 201
    with http.stream("GET", "/v1/events/stream") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        frames = _read_frames(r, 2)
    assert [f["event"] for f in frames] == ["host.created", "host.created"]
    ids = [int(f["id"]) for f in frames]
    data = [json.loads(f["data"]) for f in frames]
    assert [d["id"] for d in data] == ids
    assert [d["subject"] for d in data] == ["h0", "h1"]

    # Resume after the last frame seen: the next event, not a repeat.
    with http.stream("GET", "/v1/events/stream", headers={"Last-Event-ID": str(ids[-1])}) as r:
        (frame,) = _read_frames(r, 1)
    assert int(frame["id"]) == ids[-1] + 1
    assert json.loads(frame["data"])["subject"] == "h2"

    # `after` works too, and Last-Event-ID wins over it.
    with http.stream("GET", "/v1/events/stream", params={"after": ids[0]}) as r:
        (frame,) = _read_frames(r, 1)
    assert int(frame["id"]) == ids[1]


def test_sse_delivers_events_written_while_connected(server: httpx.Client) -> None:
    http = server
    head = http.get("/v1/events").json()["head_id"]
    with http.stream("GET", "/v1/events/stream", params={"after": head}) as r:
        assert r.status_code == 200
        assert http.post("/v1/hosts", json={"name": "late", "vcpus": 1, "memory_mib": 1}).status_code == 201
        (frame,) = _read_frames(r, 1)
    assert frame["event"] == "host.created"
    assert json.loads(frame["data"])["subject"] == "late"


def test_sse_for_clients_shows_only_their_project(server: httpx.Client) -> None:
    http = server
    assert http.post("/v1/hosts", json={"name": "node-1", "vcpus": 32, "memory_mib": 65536}).status_code == 201
    assert http.post("/v1/hosts/node-1/loads", json=load_body()).status_code == 201
    tokens = {}
    for project in ("p1", "p2"):
        created = http.post("/v1/tokens", json={"role": "client", "project": project}).json()
        tokens[project] = {"Authorization": f"Bearer {created['token']}"}
    theirs = http.post("/v1/vms", json={"name": "t", "vcpus": 1, "memory_mib": 1, "tdx": True},
                       headers=tokens["p2"]).json()
    mine = http.post("/v1/vms", json={"name": "m", "vcpus": 1, "memory_mib": 1, "tdx": True},
                     headers=tokens["p1"]).json()
    with http.stream("GET", "/v1/events/stream", headers=tokens["p1"]) as r:
        frames = _read_frames(r, 2)
    assert [f["event"] for f in frames] == ["vm.created", "vm.scheduled"]
    assert {json.loads(f["data"])["subject"] for f in frames} == {mine["id"]}
    assert theirs["id"] != mine["id"]
