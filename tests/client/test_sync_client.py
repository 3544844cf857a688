"""TdxClient against the real service over HTTP: every endpoint, typed errors, retries, the event stream."""

from __future__ import annotations

import socket
import uuid

import pytest

from service.client import (
    ApiError,
    Conflict,
    ConnectionFailed,
    Forbidden,
    NotFound,
    PreconditionFailed,
    TdxClient,
    Unauthorized,
    ValidationFailed,
)
from tests.client.conftest import LiveServer, Proxy
from tests.client.faults import FlakyTransport
from tests.conftest import load_body


def test_host_endpoints(live: LiveServer) -> None:
    with live.admin() as c:
        created = c.create_host("h1", 16, 32768, labels={"zone": "a"}, reserved_vcpus=2)
        assert created["tdx"]["state"] == "unknown"
        assert created["reserved_vcpus"] == 2

        load = load_body("ready", keyids=7)
        after_load = c.report_load("h1", load)
        assert after_load["tdx"]["state"] == "ready"
        assert after_load["load"] is not None and after_load["load"]["id"] == load["load_id"]
        assert c.report_load("h1", load)["load"] == after_load["load"]  # a repeated report is a no-op

        host, etag = c.get_host("h1")
        assert etag == f'"{host["generation"]}"'
        assert host["tdx"]["keyids_total"] == 7

        beat = c.heartbeat("h1", load["load_id"], keyids_in_use=0, running_vms=[])
        assert beat["alive"] is True

        patched = c.patch_host("h1", if_match=etag, labels={"zone": "b"}, schedulable=False)
        assert patched["labels"] == {"zone": "b"} and patched["schedulable"] is False
        with pytest.raises(PreconditionFailed) as stale:
            c.patch_host("h1", if_match=etag, schedulable=True)
        assert stale.value.status == 412 and stale.value.code == "precondition_failed"

        assert c.drain_host("h1")["draining"] is True

        loads = c.list_loads("h1")
        assert [x["id"] for x in loads["items"]] == [load["load_id"]]
        assert loads["items"][0]["current"] is True
        assert [x["id"] for x in c.iter_loads("h1", limit=1)] == [load["load_id"]]
        assert c.host_vms("h1") == []

        c.delete_host("h1")
        with pytest.raises(NotFound) as gone:
            c.get_host("h1")
        assert gone.value.code == "host_not_found"


def test_host_list_filters_and_pagination(live: LiveServer) -> None:
    for name in ("a1", "a2", "a3"):
        live.ready_host(name, labels={"rack": "r1"})
    live.ready_host("d1", "disabled", labels={"rack": "r2"})
    with live.admin() as c:
        c.create_host("u1", 8, 8192)
        c.patch_host("a3", schedulable=False)

        page = c.list_hosts(limit=2)
        assert len(page["items"]) == 2 and page["next"]
        rest = c.list_hosts(limit=2, cursor=page["next"])
        assert {h["name"] for h in page["items"] + rest["items"]} < {"a1", "a2", "a3", "d1", "u1"}

        assert sorted(h["name"] for h in c.iter_hosts(limit=2)) == ["a1", "a2", "a3", "d1", "u1"]
        assert sorted(h["name"] for h in c.iter_hosts(tdx_state="ready")) == ["a1", "a2", "a3"]
        assert sorted(h["name"] for h in c.iter_hosts(tdx_state="ready", schedulable=True)) == ["a1", "a2"]
        assert [h["name"] for h in c.iter_hosts(label={"rack": "r2"})] == ["d1"]
        assert [h["name"] for h in c.iter_hosts(label=["rack=r2"], tdx_state="disabled")] == ["d1"]


def test_typed_errors_carry_the_problem_code(live: LiveServer) -> None:
    live.ready_host("h1")
    with live.admin() as c:
        with pytest.raises(Conflict) as taken:
            c.create_host("h1", 4, 4096)
        assert taken.value.code == "host_name_taken" and taken.value.status == 409
        with pytest.raises(ValidationFailed) as invalid:
            c.create_host("Not_A_Name", 4, 4096)
        assert invalid.value.code == "validation_error"
        assert any("name" in e["loc"] for e in invalid.value.errors)
        with pytest.raises(Conflict) as stale:
            c.heartbeat("h1", uuid.uuid4())
        assert stale.value.code == "stale_load"
        reader = c.create_token("reader")
    with TdxClient(live.url, reader["token"]) as r:
        assert r.get_host("h1").host["name"] == "h1"
        with pytest.raises(Forbidden) as forbidden:
            r.create_host("h2", 4, 4096)
        assert forbidden.value.code == "forbidden"
        assert isinstance(forbidden.value, ApiError)
    with TdxClient(live.url, "tdx_nope") as anon, pytest.raises(Unauthorized) as unauthorized:
        anon.list_hosts()
    assert unauthorized.value.status == 401 and unauthorized.value.problem["code"] == unauthorized.value.code


def test_vm_endpoints(live: LiveServer) -> None:
    live.ready_host("h1", keyids=2)
    with live.admin() as c:
        vm = c.create_vm("td1", 2, 2048, True, project="p1", selector={}, priority=5)
        assert vm["status"] == "scheduled" and vm["host"] == "h1" and vm["project"] == "p1"
        plain = c.create_vm("plain", 1, 1024, False, project="p2")
        assert c.get_vm(vm["id"])["name"] == "td1"

        assert [v["id"] for v in c.iter_vms(project="p1")] == [vm["id"]]
        assert {v["id"] for v in c.iter_vms(limit=1)} == {vm["id"], plain["id"]}
        assert [v["id"] for v in c.list_vms(tdx=True, status="scheduled", host="h1")["items"]] == [vm["id"]]
        assert {v["id"] for v in c.host_vms("h1")} == {vm["id"], plain["id"]}
        assert c.host_vms("h1", status="running") == []

        with pytest.raises(Conflict) as busy:
            c.delete_host("h1")
        assert busy.value.code == "host_not_empty"

        agent_token = c.create_token("agent", host="h1")["token"]
        with TdxClient(live.url, agent_token) as agent:
            assert agent.report_vm_status(vm["id"], "running")["status"] == "running"
            assert agent.report_vm_status(vm["id"], "running")["status"] == "running"  # a retried report
            assert [v["id"] for v in agent.host_vms("h1", status=["running"])] == [vm["id"]]
        assert c.delete_vm(vm["id"])["status"] == "deleting"
        assert c.delete_vm(plain["id"])["status"] == "deleted"
        with TdxClient(live.url, agent_token) as agent, pytest.raises(Conflict) as illegal:
            agent.report_vm_status(vm["id"], "running")
        assert illegal.value.code == "invalid_transition"

        with pytest.raises(NotFound) as missing:
            c.get_vm(uuid.uuid4())
        assert missing.value.code == "vm_not_found"

        current = [v["id"] for v in c.iter_vms(status=["pending", "scheduled", "running", "deleting"])]
        assert current == [vm["id"]]
        assert [v["id"] for v in c.iter_vms(status=("deleted",))] == [plain["id"]]


def test_names_and_ids_stay_one_path_segment(live: LiveServer) -> None:
    live.ready_host("x")
    with live.admin() as c:
        # "/" cannot be one: the server routes on the decoded path (tdxctl refuses such names itself).
        for name in ("x?y", "x#y", "..", ".", "x/../x"):
            with pytest.raises((NotFound, ValidationFailed)):
                c.get_host(name)
        for vm_id in ("../hosts", "x?y"):
            with pytest.raises((NotFound, ValidationFailed)):
                c.get_vm(vm_id)


def test_client_token_sees_its_project_only(live: LiveServer) -> None:
    live.ready_host("h1")
    with live.admin() as c:
        other = c.create_vm("theirs", 1, 1024, False, project="other")
        token = c.create_token("client", project="mine")["token"]
    with TdxClient(live.url, token) as me:
        mine = me.create_vm("vm1", 1, 1024, True)
        assert mine["project"] == "mine"
        assert [v["id"] for v in me.iter_vms()] == [mine["id"]]
        with pytest.raises(NotFound):
            me.get_vm(other["id"])


def test_idempotency_key_replays_the_same_vm(live: LiveServer) -> None:
    live.ready_host("h1")
    with live.admin() as c:
        key = str(uuid.uuid4())
        first = c.create_vm("vm1", 2, 2048, True, idempotency_key=key)
        again = c.create_vm("vm1", 2, 2048, True, idempotency_key=key)
        assert again["id"] == first["id"]
        with pytest.raises(ValidationFailed) as reused:
            c.create_vm("vm1", 4, 2048, True, idempotency_key=key)
        assert reused.value.code == "idempotency_key_reused"
        assert len(list(c.iter_vms())) == 1


def test_vm_creation_retried_after_a_lost_answer_makes_one_vm(live: LiveServer) -> None:
    live.ready_host("h1")
    transport = FlakyTransport(1, lose_answer=True, path="/v1/vms")
    with live.admin(transport=transport) as c:
        vm = c.create_vm("vm1", 2, 2048, True)
        attempts = transport.faults.attempts("/v1/vms")
        assert len(attempts) == 2
        keys = {r.headers["Idempotency-Key"] for r in attempts}
        assert len(keys) == 1
        assert [v["id"] for v in c.iter_vms()] == [vm["id"]]
        # A new logical call gets a new key.
        c.create_vm("vm2", 2, 2048, True)
        assert transport.faults.attempts("/v1/vms")[-1].headers["Idempotency-Key"] not in keys


def test_retry_after_a_connection_error(live: LiveServer) -> None:
    live.ready_host("h1")
    transport = FlakyTransport(2)
    with live.admin(transport=transport) as c:
        assert c.get_host("h1").host["name"] == "h1"
        assert len(transport.faults.attempts("/v1/hosts/h1")) == 3


def test_a_create_whose_answer_was_lost_is_not_retried(live: LiveServer) -> None:
    transport = FlakyTransport(1, lose_answer=True, path="/v1/hosts")
    with live.admin(transport=transport) as c:
        with pytest.raises(ConnectionFailed):
            c.create_host("h1", 4, 4096)
        assert len(transport.faults.attempts("/v1/hosts")) == 1
        assert c.get_host("h1").host["name"] == "h1"  # the server did create it


def test_connection_failed_after_the_retries() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the with-block ends: nothing listens there
    with TdxClient(f"http://127.0.0.1:{port}", "t", retries=2, backoff=0.01) as c, pytest.raises(ConnectionFailed):
        c.list_hosts()


def test_tokens(live: LiveServer) -> None:
    with live.admin() as c:
        created = c.create_token("reader", description="ops dashboard")
        assert created["token"] and created["role"] == "reader"
        listed = {t["id"]: t for t in c.iter_tokens(limit=1)}
        assert created["id"] in listed and "token" not in listed[created["id"]]
        assert listed[created["id"]]["description"] == "ops dashboard"
        assert c.list_tokens(limit=500)["next"] is None
        with TdxClient(live.url, created["token"]) as r:
            r.list_hosts()
            c.revoke_token(created["id"])
            with pytest.raises(Unauthorized):
                r.list_hosts()
        with pytest.raises(ValidationFailed):
            c.create_token("agent")  # an agent token needs its host
        assert c.whoami() == {"role": "admin", "token_id": "bootstrap-admin", "host": None, "project": None}
        client = c.create_token("client", project="p1")
        with TdxClient(live.url, client["token"]) as r:
            assert r.whoami() == {"role": "client", "token_id": client["id"], "host": None, "project": "p1"}


def test_preview_and_capacity(live: LiveServer) -> None:
    live.ready_host("good", keyids=4)
    live.ready_host("off", "disabled")
    with live.admin() as c:
        preview = c.preview("x", 2, 2048, True)
        assert preview["host"] == "good"
        assert preview["reasons"] == {"tdx_disabled": 1}
        assert [x["host"] for x in preview["candidates"]] == ["good"]
        assert list(c.iter_vms()) == []  # a preview changes nothing

        cap = c.capacity()
        assert cap["by_tdx_state"]["ready"]["keyids_total"] == 4
        assert cap["totals"]["hosts"] == 2 and cap["fit"] is None
        fit = c.capacity(vcpus=2, memory_mib=2048, tdx=True)["fit"]
        assert fit is not None and fit["fits_now"] > 0
        with pytest.raises(ValidationFailed):
            c.capacity(vcpus=2)


def test_events_list_filters_and_long_poll(live: LiveServer) -> None:
    live.ready_host("h1")
    live.ready_host("h2")
    with live.admin() as c:
        everything = c.list_events()
        kinds = [e["kind"] for e in everything["items"]]
        assert kinds.count("host.created") == 2
        created = c.list_events(kind="host.created")
        assert [e["subject"] for e in created["items"]] == ["h1", "h2"]
        only_h2 = c.list_events(kind=["host.created", "host.load_reported"], subject="h2")
        assert {e["subject"] for e in only_h2["items"]} == {"h2"}
        first = c.list_events(limit=1)
        assert len(first["items"]) == 1 and first["last_id"] == first["items"][0]["id"]
        nxt = c.list_events(after=first["last_id"], limit=1)
        assert nxt["items"][0]["id"] > first["last_id"]
        head = everything["head_id"]
        empty = c.list_events(after=head, wait=0.2)
        assert empty["items"] == [] and empty["last_id"] == head


def test_watch_events_resumes_after_the_server_side_closes(live: LiveServer, proxy: Proxy) -> None:
    live.ready_host("h1")
    with live.admin() as direct:
        before = direct.list_events(kind="host.*")["items"]
    transport = FlakyTransport(0)  # fails nothing; records what was sent
    with TdxClient(proxy.url, live.admin_token, transport=transport) as c:
        stream = c.watch_events(kind="host.*")
        seen = [next(stream) for _ in before]
        assert [e["id"] for e in seen] == [e["id"] for e in before]

        proxy.cut()
        with live.admin() as direct:
            direct.create_host("h2", 4, 4096)
        resumed = next(stream)
        assert resumed["kind"] == "host.created" and resumed["subject"] == "h2"
        assert resumed["id"] > seen[-1]["id"]
        assert proxy.connections >= 2
        reconnect = transport.faults.attempts("/v1/events/stream")[-1]
        assert reconnect.headers["Last-Event-ID"] == str(seen[-1]["id"])
        stream.close()


def test_register_hosts_in_bulk(live: LiveServer) -> None:
    with live.admin() as c:
        result = c.register_hosts(
            [
                {"name": "b1", "vcpus": 8, "memory_mib": 8192, "load": load_body("ready", keyids=3)},
                {"name": "b2", "vcpus": 8, "memory_mib": 8192},
            ]
        )
        assert result["created"] == 2
        assert [(h["name"], h["tdx_state"]) for h in result["hosts"]] == [("b1", "ready"), ("b2", "unknown")]
        assert c.get_host("b1")[0]["tdx"]["keyids_total"] == 3
        with pytest.raises(Conflict) as taken:
            c.register_hosts([{"name": "b3", "vcpus": 1, "memory_mib": 1}, {"name": "b1", "vcpus": 1, "memory_mib": 1}])
        assert taken.value.code == "host_name_taken"
        assert [h["name"] for h in c.iter_hosts()] == ["b1", "b2"]
