"""Event fan-out (issue 9, "nobody can starve the others"): watchers share one read of the log per
wake-up, a slow watcher loses nothing and slows no one, and a token may hold only so many streams."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from service import fanout
from service.app import create_app
from tests.conftest import ADMIN_TOKEN, POSTGRES_URL, make_settings
from tests.helpers import assert_problem, live_server
from tests.test_events import _read_frames

HOST = {"vcpus": 1, "memory_mib": 1}


@contextlib.contextmanager
def _serve(database_url: str, **settings: Any) -> Iterator[tuple[httpx.Client, Any]]:
    app = create_app(make_settings(database_url, **settings))
    try:
        with live_server(app) as base, httpx.Client(
            base_url=base, timeout=30, limits=httpx.Limits(max_connections=200)
        ) as http:
            http.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
            yield http, app
    finally:
        app.state.ctx.db.dispose()


def _token(http: httpx.Client, role: str = "client", project: str = "p1") -> dict[str, str]:
    r = http.post("/v1/tokens", json={"role": role, "project": project} if role == "client" else {"role": role})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def _watchers(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("tdx_event_watchers "):
            return float(line.split()[1])
    raise AssertionError("no tdx_event_watchers in /metrics")


def _wait_for_watchers(http: httpx.Client, count: int) -> None:
    deadline = time.monotonic() + 20
    while _watchers(http) != count:
        assert time.monotonic() < deadline, f"{_watchers(http)} watchers, expected {count}"
        time.sleep(0.05)


STREAMS = 20
POLLS = 10
WRITES = 5


def test_watchers_share_one_read_of_the_log_per_wake_up(database_url: str) -> None:
    """20 SSE streams and 10 long-polls cost the database about one read per commit, not one per
    watcher per commit (which is what cut write rates to a sixth with 500 idle streams)."""
    with _serve(database_url, max_streams_per_principal=STREAMS + POLLS) as (http, app), \
            contextlib.ExitStack() as stack:
        head = http.get("/v1/events").json()["head_id"]
        reader = _token(http, "reader")
        streams = [
            stack.enter_context(http.stream("GET", "/v1/events/stream", params={"after": head}, headers=reader))
            for _ in range(STREAMS)
        ]
        assert all(r.status_code == 200 for r in streams)
        polled: list[list[str]] = []

        def poll() -> None:
            r = http.get("/v1/events", params={"after": head, "wait": 25, "kind": "host.created"}, headers=reader)
            polled.append([e["subject"] for e in r.json()["items"]])

        pollers = [threading.Thread(target=poll) for _ in range(POLLS)]
        for t in pollers:
            t.start()
        _wait_for_watchers(http, STREAMS + POLLS)

        reads: list[str] = []

        def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            if statement.lstrip().upper().startswith("SELECT") and "FROM events" in statement:
                reads.append(statement)

        engine = app.state.ctx.db.engine
        event.listen(engine, "before_cursor_execute", count)
        try:
            for i in range(WRITES):
                assert http.post("/v1/hosts", json={"name": f"h{i}", **HOST}).status_code == 201
            for r in streams:
                frames = _read_frames(r, WRITES)
                assert [json.loads(f["data"])["subject"] for f in frames] == [f"h{i}" for i in range(WRITES)]
            for t in pollers:
                t.join(timeout=30)
            assert polled and all(p and p[0] == "h0" for p in polled) and len(polled) == POLLS
        finally:
            event.remove(engine, "before_cursor_execute", count)
    # One read per wake-up (PostgreSQL wakes a replica twice per commit: after its own commit and
    # by NOTIFY), a few more for reads that found the next commit early; never one per watcher.
    assert len(reads) <= 3 * WRITES + 3, f"{len(reads)} reads of the event log for {WRITES} commits"


def test_a_watcher_that_falls_behind_catches_up_without_gaps(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queue holds 3 events here: a batch of 12 hosts overflows it; the stream then reads what
    it missed from the database and goes on live, in order, nothing lost or repeated."""
    monkeypatch.setattr(fanout, "QUEUE_EVENTS", 3)
    with _serve(database_url) as (http, _app):
        head = http.get("/v1/events").json()["head_id"]
        with http.stream("GET", "/v1/events/stream", params={"after": head, "kind": "host.created"}) as everything, \
                http.stream("GET", "/v1/events/stream", params={"after": head, "subject": "b7"}) as one:
            hosts = [{"name": f"b{i}", **HOST} for i in range(12)]
            assert http.post("/v1/hosts:batch", json={"hosts": hosts}).status_code in (200, 201)
            assert http.post("/v1/hosts", json={"name": "after", **HOST}).status_code == 201
            frames = _read_frames(everything, 13)
            (mine,) = _read_frames(one, 1)
    subjects = [json.loads(f["data"])["subject"] for f in frames]
    assert subjects == [f"b{i}" for i in range(12)] + ["after"]
    ids = [int(f["id"]) for f in frames]
    assert ids == sorted(set(ids))
    assert json.loads(mine["data"])["subject"] == "b7"


def test_streams_and_long_polls_per_token_are_capped(database_url: str) -> None:
    with _serve(database_url, max_streams_per_principal=2) as (http, _app), contextlib.ExitStack() as stack:
        mine = _token(http, project="p1")
        other = _token(http, project="p2")
        first = stack.enter_context(http.stream("GET", "/v1/events/stream", headers=mine))
        second = stack.enter_context(http.stream("GET", "/v1/events/stream", headers=mine))
        assert first.status_code == second.status_code == 200

        with http.stream("GET", "/v1/events/stream", headers=mine) as refused:
            assert refused.status_code == 429  # not a stream that never ends
            refused.read()
        assert_problem(refused, 429, "too_many_streams")
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["limit"] == 2
        assert_problem(http.get("/v1/events", params={"wait": 1}, headers=mine), 429, "too_many_streams")
        # A read that does not wait holds nothing; another token has slots of its own.
        assert http.get("/v1/events", headers=mine).status_code == 200
        with http.stream("GET", "/v1/events/stream", headers=other) as theirs:
            assert theirs.status_code == 200

        # Closing a stream gives its slot back.
        second.close()
        deadline = time.monotonic() + 20
        while (r := http.get("/v1/events", params={"wait": 0.1}, headers=mine)).status_code == 429:
            assert time.monotonic() < deadline, "the closed stream's slot was never given back"
            time.sleep(0.05)
        assert r.status_code == 200


@pytest.mark.skipif(not POSTGRES_URL, reason="needs TDX_TEST_POSTGRES_URL")
def test_other_replicas_watchers_share_one_read_per_commit() -> None:
    from tests.replicas import serve_replicas

    token = "tdx_fanout-test-admin-token-" + "x" * 8
    with serve_replicas(token, count=2) as (writer, watcher), httpx.Client(
        timeout=30, headers={"Authorization": f"Bearer {token}"}, limits=httpx.Limits(max_connections=100)
    ) as http, contextlib.ExitStack() as stack:
        head = http.get(f"{watcher}/v1/events").json()["head_id"]
        streams = [
            stack.enter_context(http.stream("GET", f"{watcher}/v1/events/stream", params={"after": head}))
            for _ in range(STREAMS)
        ]

        def reads() -> float:
            for line in http.get(f"{watcher}/metrics").text.splitlines():
                if line.startswith("tdx_event_fanout_reads_total "):
                    return float(line.split()[1])
            raise AssertionError("no tdx_event_fanout_reads_total in /metrics")

        before = reads()
        for i in range(WRITES):
            assert http.post(f"{writer}/v1/hosts", json={"name": f"r{i}", **HOST}).status_code == 201
        for r in streams:
            frames = _read_frames(r, WRITES)
            assert [json.loads(f["data"])["subject"] for f in frames] == [f"r{i}" for i in range(WRITES)]
        assert reads() - before <= 2 * WRITES + 2
