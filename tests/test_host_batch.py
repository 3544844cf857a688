"""Bulk registration (POST /v1/hosts:batch): the same hosts, loads and events as one request at a
time, all or nothing."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from service.app import create_app
from service.db import make_engine
from service.hosts import service as hosts_service
from service.hosts.schemas import HostCreate, LoadReport
from tests.conftest import ADMIN_TOKEN, Api, load_body, make_settings
from tests.helpers import live_server

VOLATILE = {"id", "created_at", "updated_at", "last_heartbeat_at"}


def _host(api: Api, name: str) -> dict[str, Any]:
    body = api.client.get(f"/v1/hosts/{name}", headers=api.admin).json()
    body["load"] = {k: v for k, v in (body["load"] or {}).items() if k not in ("id", "reported_at")} or None
    return {k: v for k, v in body.items() if k not in VOLATILE | {"name"}}


def _events(api: Api, name: str) -> list[tuple[str, dict[str, Any]]]:
    items = api.client.get("/v1/events", params={"subject": name, "limit": 500}, headers=api.admin).json()["items"]
    strip = {"id", "load_id"}
    return [(e["kind"], {k: v for k, v in e["data"].items() if k not in strip}) for e in items]


@pytest.mark.parametrize("state", ["ready", "disabled", "failed", "unsupported", "no_kvm", None])
def test_a_batch_host_equals_one_registered_request_by_request(api: Api, state: str | None) -> None:
    spec = {"vcpus": 48, "memory_mib": 196608, "labels": {"zone": "z1"}, "reserved_memory_mib": 1024}
    boot = "b00710ad-0000-4000-8000-000000000001"
    api.create_host("single", **spec)
    if state is not None:
        api.client.post("/v1/hosts/single/loads", json=load_body(state, 7, boot_id=boot), headers=api.admin)
    entry: dict[str, Any] = {"name": "batched", **spec}
    if state is not None:
        entry["load"] = load_body(state, 7, boot_id=boot)
    r = api.client.post("/v1/hosts:batch", json={"hosts": [entry]}, headers=api.admin)
    assert r.status_code == 201, r.text
    assert r.json()["created"] == 1
    assert r.json()["hosts"][0]["tdx_state"] == _host(api, "single")["tdx"]["state"]
    assert _host(api, "batched") == _host(api, "single")
    assert _events(api, "batched") == _events(api, "single")
    loads = api.client.get("/v1/hosts/batched/loads", headers=api.admin).json()["items"]
    assert len(loads) == (0 if state is None else 1)


def test_batch_hosts_are_scheduled_onto_and_filtered_by_label(api: Api) -> None:
    hosts = [{"name": f"b{i}", "vcpus": 8, "memory_mib": 16384, "labels": {"rack": f"r{i % 2}"},
              "load": load_body("ready" if i % 2 else "disabled")} for i in range(10)]
    assert api.client.post("/v1/hosts:batch", json={"hosts": hosts}, headers=api.admin).status_code == 201
    listed = api.client.get("/v1/hosts?label=rack=r1&tdx_state=ready", headers=api.admin).json()["items"]
    assert sorted(h["name"] for h in listed) == ["b1", "b3", "b5", "b7", "b9"]
    vm = api.create_vm(name="td", selector={"rack": "r1"}).json()
    assert vm["status"] == "scheduled" and vm["host"] in {"b1", "b3", "b5", "b7", "b9"}


@pytest.mark.parametrize(
    ("hosts", "status", "code"),
    [
        ([{"name": "dup", "vcpus": 1, "memory_mib": 1}, {"name": "dup", "vcpus": 1, "memory_mib": 1}],
         409, "host_name_taken"),
        ([{"name": "fine", "vcpus": 1, "memory_mib": 1}, {"name": "taken", "vcpus": 1, "memory_mib": 1}],
         409, "host_name_taken"),
        ([{"name": "fine", "vcpus": 1, "memory_mib": 1}, {"name": "Bad", "vcpus": 1, "memory_mib": 1}],
         422, "validation_error"),
        ([{"name": "fine", "vcpus": 1, "memory_mib": 1, "load": {"load_id": "x"}}], 422, "validation_error"),
        ([], 422, "validation_error"),
    ],
)
def test_a_refused_batch_writes_nothing(api: Api, hosts: list[dict[str, Any]], status: int, code: str) -> None:
    api.create_host("taken")
    head = api.client.get("/v1/events", headers=api.admin).json()["head_id"]
    r = api.client.post("/v1/hosts:batch", json={"hosts": hosts}, headers=api.admin)
    assert (r.status_code, r.json()["code"]) == (status, code)
    assert [h["name"] for h in api.client.get("/v1/hosts", headers=api.admin).json()["items"]] == ["taken"]
    assert api.client.get("/v1/events", headers=api.admin).json()["head_id"] == head


def test_a_reused_load_id_refuses_the_batch(api: Api) -> None:
    load = api.ready_host("old")
    entry = {"name": "new", "vcpus": 1, "memory_mib": 1, "load": load_body("ready", load_id=load["load_id"])}
    r = api.client.post("/v1/hosts:batch", json={"hosts": [entry]}, headers=api.admin)
    assert (r.status_code, r.json()["code"]) == (409, "load_id_conflict")
    assert api.client.get("/v1/hosts/new", headers=api.admin).status_code == 404


def test_only_admins_register_in_bulk(api: Api) -> None:
    reader = api.token("reader")
    r = api.client.post("/v1/hosts:batch", json={"hosts": [{"name": "x", "vcpus": 1, "memory_mib": 1}]},
                        headers=reader)
    assert r.status_code == 403


# ---- concurrent batches ------------------------------------------------------------------------

def _pg_backends_waiting_on_a_lock(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )).scalar_one())


@pytest.mark.parametrize("conflict", ["name", "load_id"])
def test_a_batch_that_loses_a_race_for_a_name_or_load_id_is_409(database_url: str, conflict: str) -> None:
    """Another transaction registers a name (or a load id) of the batch between the batch's check and
    its insert; the unique index refuses the insert: 409 with what was taken, never a 500. On
    PostgreSQL the interleaving is forced: the batch's insert waits on the other's uncommitted row."""
    app = create_app(make_settings(database_url))
    engine = make_engine(database_url)
    rival = load_body()
    batch = [
        {"name": "fresh", "vcpus": 1, "memory_mib": 1},
        {"name": "contested" if conflict == "name" else "other", "vcpus": 1, "memory_mib": 1, "load": rival},
    ]
    try:
        with live_server(app) as base, httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                                                    timeout=60) as http, ThreadPoolExecutor(1) as pool:
            with Session(engine) as session:
                host = hosts_service.create_host(session, HostCreate(name="contested", vcpus=1, memory_mib=1), 4.0)
                if conflict == "load_id":
                    session.flush()
                    hosts_service.report_load(session, host.name, LoadReport.model_validate(rival))
                session.flush()  # uncommitted: the batch's check does not see it
                reply = pool.submit(http.post, "/v1/hosts:batch", json={"hosts": batch})
                if engine.dialect.name == "postgresql":
                    deadline = time.monotonic() + 30
                    while _pg_backends_waiting_on_a_lock(engine) == 0:
                        assert not reply.done(), reply.result().text
                        assert time.monotonic() < deadline, "the batch never waited on the rival's row"
                        time.sleep(0.01)
                session.commit()
            r = reply.result()
            expected = ("host_name_taken", ["contested"]) if conflict == "name" else ("load_id_conflict", None)
            assert (r.status_code, r.json()["code"], r.json().get("names")) == (409, *expected), r.text
            names = [h["name"] for h in http.get("/v1/hosts").json()["items"]]
            assert names == ["contested"]
    finally:
        engine.dispose()


def test_concurrent_batches_with_overlapping_names_are_201_or_409(database_url: str) -> None:
    """Batches of overlapping names from several clients at once: each is registered whole or
    refused whole (409), never a 500, and every name is registered once."""
    app = create_app(make_settings(database_url))
    batches = [[f"h{(start + i) % 12}" for i in range(4)] for start in range(0, 12, 2)] * 2

    def post(names: list[str]) -> tuple[int, list[str]]:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60) as http:
            r = http.post("/v1/hosts:batch", json={"hosts": [{"name": n, "vcpus": 1, "memory_mib": 1} for n in names]})
            return r.status_code, names

    with live_server(app) as base:
        with ThreadPoolExecutor(len(batches)) as pool:
            results = list(pool.map(post, batches))
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
            registered = [h["name"] for h in http.get("/v1/hosts", params={"limit": 500}).json()["items"]]
    assert {status for status, _ in results} <= {201, 409}, results
    won = [names for status, names in results if status == 201]
    assert sorted(n for names in won for n in names) == sorted(registered)
