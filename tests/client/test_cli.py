"""tdxctl against the real service over HTTP, through typer's CliRunner."""

from __future__ import annotations

import json
import re
import socket
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from service.cli import app
from tests.client.conftest import LiveServer
from tests.conftest import load_body


class Ctl:
    def __init__(self, live: LiveServer, token: str | None = None) -> None:
        self.runner = CliRunner()
        self.env = {"TDX_SERVER": live.url, "TDX_TOKEN": token or live.admin_token}

    def __call__(self, *args: str) -> Result:
        return self.runner.invoke(app, list(args), env=self.env)

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.exit_code == 0, (result.stdout, result.stderr)
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "-o", "json"))


@pytest.fixture
def ctl(live: LiveServer) -> Ctl:
    return Ctl(live)


def test_hosts_create_list_show(live: LiveServer, ctl: Ctl) -> None:
    created = ctl.json("hosts", "create", "h1", "--vcpus", "16", "--memory-mib", "32768", "--label", "zone=a")
    assert created["name"] == "h1" and created["labels"] == {"zone": "a"} and created["tdx"]["state"] == "unknown"
    live.ready_host("h2", keyids=15)

    listed = ctl.json("hosts", "list")
    assert sorted(h["name"] for h in listed) == ["h1", "h2"]
    assert [h["name"] for h in ctl.json("hosts", "list", "--tdx-state", "ready")] == ["h2"]
    assert [h["name"] for h in ctl.json("hosts", "list", "--label", "zone=a")] == ["h1"]

    table = ctl.ok("hosts", "list")
    assert "h1" in table and "h2" in table and "ready" in table and "unknown" in table
    assert "0/15" in table  # KeyIDs used/total

    shown = ctl.json("hosts", "show", "h2")
    assert shown["tdx"]["state"] == "ready" and shown["load"]["kernel"] == "6.16.0-tdx"
    details = ctl.ok("hosts", "show", "h2")
    for expected in ("ready", "0/15", "6.16.0-tdx", "1.5.06", shown["load"]["boot_id"], "alive"):
        assert expected in details

    loads = ctl.json("hosts", "loads", "h2")
    assert len(loads) == 1 and loads[0]["current"] is True and loads[0]["tdx_state"] == "ready"
    assert "6.16.0-tdx" in ctl.ok("hosts", "loads", "h2")


def test_cordon_uncordon_drain_delete(live: LiveServer, ctl: Ctl) -> None:
    live.ready_host("h1")
    assert "cordoned" in ctl.ok("hosts", "cordon", "h1")
    assert ctl.json("hosts", "show", "h1")["schedulable"] is False
    assert [h["name"] for h in ctl.json("hosts", "list", "--cordoned")] == ["h1"]

    ctl.ok("hosts", "drain", "h1")
    assert ctl.json("hosts", "show", "h1")["draining"] is True
    assert "uncordoned" in ctl.ok("hosts", "uncordon", "h1")
    host = ctl.json("hosts", "show", "h1")
    assert host["schedulable"] is True and host["draining"] is False

    ctl.ok("hosts", "delete", "h1")
    assert ctl.json("hosts", "list") == []


def test_vms_create_list_show_delete(live: LiveServer, ctl: Ctl) -> None:
    live.ready_host("h1", labels={"zone": "a"})
    vm = ctl.json(
        "vms", "create", "--name", "web", "--vcpus", "2", "--memory-mib", "2048", "--tdx", "--project", "p1",
        "--selector", "zone=a", "--anti-affinity-group", "web", "--priority", "3", "--timeout", "60",
    )
    assert vm["status"] == "scheduled" and vm["host"] == "h1"
    assert vm["selector"] == {"zone": "a"} and vm["anti_affinity_group"] == "web" and vm["priority"] == 3
    pending = ctl.json("vms", "create", "--name", "nowhere", "--vcpus", "2", "--memory-mib", "2048",
                       "--selector", "zone=b")
    assert pending["status"] == "pending" and pending["host"] is None and pending["explanation"]

    assert {v["id"] for v in ctl.json("vms", "list")} == {vm["id"], pending["id"]}
    assert [v["id"] for v in ctl.json("vms", "list", "--project", "p1")] == [vm["id"]]
    assert [v["id"] for v in ctl.json("vms", "list", "--status", "pending")] == [pending["id"]]
    table = ctl.ok("vms", "list")
    assert "web" in table and "scheduled" in table and "pending" in table
    assert ctl.json("vms", "show", vm["id"])["name"] == "web"
    assert "selector_mismatch" in ctl.ok("vms", "show", pending["id"])

    assert "deleted" in ctl.ok("vms", "delete", vm["id"])
    assert ctl.json("vms", "show", vm["id"])["status"] == "deleted"


def test_capacity_and_preview(live: LiveServer, ctl: Ctl) -> None:
    live.ready_host("good", keyids=4)
    live.ready_host("off", "disabled")
    cap = ctl.json("capacity")
    assert cap["by_tdx_state"]["ready"]["keyids_total"] == 4 and cap["fit"] is None
    fit = ctl.json("capacity", "--vcpus", "2", "--memory-mib", "2048")
    assert fit["fit"]["tdx"] is True and fit["fit"]["fits_now"] > 0
    table = ctl.ok("capacity", "--vcpus", "2", "--memory-mib", "2048")
    assert "ready" in table and "disabled" in table and "fit now" in table

    preview = ctl.json("schedule", "preview", "--vcpus", "2", "--memory-mib", "2048")
    assert preview["host"] == "good" and preview["reasons"] == {"tdx_disabled": 1}
    assert "good" in ctl.ok("schedule", "preview", "--vcpus", "2", "--memory-mib", "2048")
    assert ctl.json("vms", "list") == []


def test_tokens(live: LiveServer, ctl: Ctl) -> None:
    created = ctl.json("tokens", "create", "--role", "reader", "--description", "dash")
    assert created["role"] == "reader" and created["token"]
    listed = ctl.json("tokens", "list")
    assert created["id"] in [t["id"] for t in listed]
    assert all("token" not in t for t in listed)
    assert "shown only now" in ctl.ok("tokens", "create", "--role", "client", "--project", "p1")

    reader = Ctl(live, created["token"])
    assert reader.json("hosts", "list") == []
    ctl.ok("tokens", "revoke", created["id"])
    refused = reader("hosts", "list")
    assert refused.exit_code == 1
    assert "(unauthorized, HTTP 401)" in refused.stderr


def test_events(live: LiveServer, ctl: Ctl) -> None:
    live.ready_host("h1")
    events = ctl.json("events", "--kind", "host.created")
    assert [(e["kind"], e["subject"]) for e in events] == [("host.created", "h1")]
    assert "host.load_reported" in ctl.ok("events")
    after = events[0]["id"]
    assert all(e["id"] > after for e in ctl.json("events", "--after", str(after)))


def test_errors_print_one_line_and_exit_non_zero(live: LiveServer, ctl: Ctl) -> None:
    missing = ctl("hosts", "show", "nope")
    assert missing.exit_code == 1
    assert missing.stdout == ""
    assert missing.stderr.strip() == "error: no host nope"
    assert "Traceback" not in missing.output

    live.ready_host("h1")
    taken = ctl("hosts", "create", "h1", "--vcpus", "4", "--memory-mib", "4096")
    assert taken.exit_code == 1 and "host_name_taken" in taken.stderr
    assert len(taken.stderr.strip().splitlines()) == 1

    invalid = ctl("vms", "create", "--name", "Bad_Name", "--vcpus", "1", "--memory-mib", "1024")
    assert invalid.exit_code == 1 and "validation_error" in invalid.stderr
    assert "request is not valid: name: " in invalid.stderr and "body.name" not in invalid.stderr

    bad_selector = ctl("vms", "create", "--name", "x", "--vcpus", "1", "--memory-mib", "1024", "--selector", "nokv")
    assert bad_selector.exit_code == 2


def test_connection_failure_exits_non_zero_without_traceback(live: LiveServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(
        app, ["--server", f"http://127.0.0.1:{port}", "--token", "t", "hosts", "list"], env={"TDX_TOKEN": None}
    )
    assert result.exit_code == 3
    assert result.stderr.startswith("error: no answer from") and "Traceback" not in result.output


def test_missing_token_is_a_usage_error(live: LiveServer) -> None:
    result = CliRunner().invoke(app, ["--server", live.url, "hosts", "list"], env={"TDX_TOKEN": None})
    assert result.exit_code == 2 and "TDX_TOKEN" in result.stderr


def test_tdx_states_are_coloured(live: LiveServer) -> None:
    live.ready_host("good")
    live.ready_host("off", "disabled")
    live.ready_host("broken", "failed")
    live.ready_host("old", "unsupported")
    with live.admin() as c:
        c.create_host("new", 4, 4096)
    ctl = Ctl(live)
    ctl.env["FORCE_COLOR"] = "1"
    ctl.env["COLUMNS"] = "200"
    table = ctl.ok("hosts", "list")
    green, yellow, red, dim, magenta = "\x1b[32m", "\x1b[33m", "\x1b[31m", "\x1b[2m", "\x1b[35m"
    for style, state in ((green, "ready"), (yellow, "disabled"), (red, "failed"), (dim, "unsupported"),
                         (magenta, "unknown")):
        assert f"{style}{state}" in table, state


# ---- what a newcomer trips over: ended VMs, unknown ids, output formats, wrapping --------------


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _vms_in_every_status(live: LiveServer) -> dict[str, str]:
    """One VM per status a list can show (pending, scheduled, running, deleting) or hide (deleted,
    failed, lost); returns status -> VM id."""
    live.ready_host("node-1", keyids=8, labels={"zone": "a"})
    live.ready_host("node-2", keyids=8, labels={"zone": "b"})
    a = {"zone": "a"}
    with live.admin() as c:
        ids = {}
        for name in ("run", "del", "fail", "going"):
            ids[name] = c.create_vm(name, 1, 512, True, selector=a)["id"]
        c.report_vm_status(ids["run"], "running")
        c.report_vm_status(ids["going"], "running")
        assert c.delete_vm(ids["going"])["status"] == "deleting"
        assert c.delete_vm(ids["del"])["status"] == "deleted"
        assert c.report_vm_status(ids["fail"], "failed", "qemu exited")["status"] == "failed"
        waiting = c.create_vm("waits", 1000, 512, True)
        assert waiting["status"] == "pending"
        placed = c.create_vm("placed", 1, 512, False, selector=a)
        assert placed["status"] == "scheduled"
        # The host of a VM on node-2 reboots: that VM is lost.
        lost = c.create_vm("lost", 1, 512, True, selector={"zone": "b"})
        assert lost["host"] == "node-2"
        c.report_load("node-2", load_body())
        assert c.get_vm(lost["id"])["status"] == "lost"
        statuses = {vm["id"]: vm["status"] for vm in c.iter_vms()}
    by_status = {status: vm_id for vm_id, status in statuses.items()}
    assert set(by_status) >= {"pending", "running", "deleting", "deleted", "failed", "lost"}, statuses
    return by_status


def test_vms_list_hides_ended_vms_unless_all(live: LiveServer, ctl: Ctl) -> None:
    by_status = _vms_in_every_status(live)
    ended = {by_status[s] for s in ("deleted", "failed", "lost")}
    current = set(by_status.values()) - ended

    listed = {v["id"] for v in ctl.json("vms", "list")}
    assert listed and not listed & ended and listed >= current
    table = ctl.ok("vms", "list")
    assert all(vm_id not in table for vm_id in ended)
    assert "deleted" not in table and "lost" not in table

    assert {v["id"] for v in ctl.json("vms", "list", "--all")} >= set(by_status.values())
    assert {v["id"] for v in ctl.json("vms", "list", "-A")} >= set(by_status.values())
    assert [v["id"] for v in ctl.json("vms", "list", "--status", "deleted")] == [by_status["deleted"]]
    both = ctl.json("vms", "list", "--status", "lost", "--status", "failed")
    assert {v["id"] for v in both} == {by_status["lost"], by_status["failed"]}

    none = ctl("vms", "list", "--project", "nobody")
    assert none.exit_code == 0 and "NAME" in none.stdout
    assert none.stderr.strip() == "no VMs (ended VMs are hidden: --all shows them)"
    bad = ctl("vms", "list", "--status", "gone")
    assert bad.exit_code == 2 and "'gone' is not one of" in bad.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("vms", "show", "nope"), "no VM nope"),
        (("vms", "show", "00000000-0000-4000-8000-000000000000"), "no VM 00000000-0000-4000-8000-000000000000"),
        (("vms", "delete", "nope"), "no VM nope"),
        (("vms", "show", "a/b"), "no VM a/b"),
        (("hosts", "show", "nope"), "no host nope"),
        (("hosts", "show", "Not_A_Name"), "no host Not_A_Name"),
        (("hosts", "show", "h1/loads"), "no host h1/loads"),
        (("hosts", "show", "h1?x=1"), "no host h1?x=1"),
        (("hosts", "show", ".."), "no host .."),
        (("hosts", "cordon", "nope"), "no host nope"),
        (("hosts", "uncordon", "nope"), "no host nope"),
        (("hosts", "drain", "nope"), "no host nope"),
        (("hosts", "delete", "nope"), "no host nope"),
        (("hosts", "loads", "nope"), "no host nope"),
        (("tokens", "revoke", "nope"), "no token nope"),
        (("tokens", "revoke", "00000000-0000-4000-8000-000000000000"), "no token 00000000-0000-4000-8000-000000000000"),
    ],
)
def test_unknown_names_and_ids_are_said_in_words(
    live: LiveServer, ctl: Ctl, args: tuple[str, ...], message: str
) -> None:
    live.ready_host("h1")
    result = ctl(*args)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr == f"error: {message}\n"
    with live.admin() as c:
        assert c.get_host("h1").host["schedulable"] is True  # nothing acted on h1 instead


def test_a_client_token_is_told_no_vm_for_another_projects_vm(live: LiveServer, ctl: Ctl) -> None:
    live.ready_host("h1")
    with live.admin() as c:
        theirs = c.create_vm("theirs", 1, 512, True, project="p2")
        mine = c.create_token("client", project="p1")["token"]
    assert Ctl(live, mine)("vms", "show", theirs["id"]).stderr == f"error: no VM {theirs['id']}\n"


def test_bad_filter_values_are_usage_errors(live: LiveServer, ctl: Ctl) -> None:
    bad = ctl("hosts", "list", "--tdx-state", "weird")
    assert bad.exit_code == 2 and "'weird' is not one of" in bad.stderr
    assert ctl("hosts", "loads", "h1", "--limit", "0").exit_code == 2


def _lists_and_shows(live: LiveServer) -> list[tuple[tuple[str, ...], type]]:
    by_status = _vms_in_every_status(live)
    with live.admin() as c:
        c.create_token("reader", description="for the list")
    return [
        (("hosts", "list"), list),
        (("hosts", "show", "node-1"), dict),
        (("hosts", "loads", "node-1"), list),
        (("vms", "list"), list),
        (("vms", "list", "--all"), list),
        (("vms", "show", by_status["running"]), dict),
        (("vms", "show", by_status["pending"]), dict),
        (("tokens", "list"), list),
        (("events",), list),
        (("capacity",), dict),
        (("schedule", "preview", "--vcpus", "1", "--memory-mib", "512"), dict),
        (("whoami",), dict),
    ]


def test_every_list_and_show_speaks_json_and_wide(live: LiveServer) -> None:
    ctl = Ctl(live)
    # A narrow colour terminal: JSON must come out whole and plain all the same.
    ctl.env.update(FORCE_COLOR="1", COLUMNS="30")
    for args, kind in _lists_and_shows(live):
        out = ctl.ok(*args, "-o", "json")
        assert "\x1b" not in out, args
        document = json.loads(out)  # one JSON document, nothing else on stdout
        assert isinstance(document, kind), args
        if isinstance(document, list):
            assert document and all(isinstance(item, dict) for item in document), args
        table, wide = ctl.ok(*args), ctl.ok(*args, "-o", "wide")
        assert table.strip() and len(ANSI.sub("", wide)) >= len(ANSI.sub("", table)), args


def test_json_lists_are_the_api_objects(live: LiveServer, ctl: Ctl) -> None:
    live.ready_host("h1", labels={"zone": "a"})
    with live.admin() as c:
        api_host = c.get_host("h1").host
        api_loads = c.list_loads("h1")["items"]
    (host,) = ctl.json("hosts", "list")
    assert host == api_host
    assert ctl.json("hosts", "show", "h1") == api_host
    assert ctl.json("hosts", "loads", "h1") == api_loads


def test_wide_adds_columns(live: LiveServer, ctl: Ctl) -> None:
    by_status = _vms_in_every_status(live)
    hosts = ctl.ok("hosts", "list", "-o", "wide")
    for column in ("RATIO", "MODULE", "KERNEL", "LAST HEARTBEAT", "GENERATION"):
        assert column in hosts and column not in ctl.ok("hosts", "list")
    vms = ctl.ok("vms", "list", "-o", "wide")
    for column in ("PRIORITY", "SELECTOR", "REASONS", "CREATED"):
        assert column in vms and column not in ctl.ok("vms", "list")
    loads = ctl.ok("hosts", "loads", "node-1", "-o", "wide")
    assert "EFFECTIVE" in loads and "ERRORS" in loads
    host = ctl.ok("hosts", "show", "node-1", "-o", "wide")
    assert "Active VMs" in host and "Latest loads" in host
    vm = ctl.ok("vms", "show", by_status["running"], "-o", "wide")
    assert "vm.created" in vm and "vm.running" in vm


def test_event_lines_never_wrap_and_json_is_never_styled(live: LiveServer) -> None:
    long_label = "x" * 60
    live.ready_host("node-with-a-rather-long-name", labels={"purpose": long_label, "zone": "a"})
    ctl = Ctl(live)
    ctl.env.update(FORCE_COLOR="1", COLUMNS="40")  # a colour terminal 40 columns wide
    events = Ctl(live).json("events")
    lines = ANSI.sub("", ctl.ok("events")).splitlines()
    assert len(lines) == len(events)
    for line, event in zip(lines, events, strict=True):
        assert line.split()[0] == str(event["id"])
        if event["data"]:
            assert json.loads(line[line.index("{"):]) == event["data"]
    assert long_label in "".join(lines)
    for wide_line in ANSI.sub("", ctl.ok("events", "-o", "wide")).splitlines():
        assert wide_line.split()[1].endswith("Z")
    raw = ctl.ok("events", "-o", "json")
    assert "\x1b" not in raw and json.loads(raw) == events


def test_figures_are_the_schedulers(live: LiveServer, ctl: Ctl) -> None:
    """vCPUs used/allocatable = (physical - reserved) x allocation ratio, in whole vCPUs; memory
    used/(physical - reserved); a host that stopped heartbeating is stale, never schedulable."""
    live.ready_host("odd", vcpus=7, reserved_vcpus=2, cpu_allocation_ratio=1.5, memory_mib=8192,
                    reserved_memory_mib=1024)
    with live.admin() as c:
        c.create_host("silent", 4, 4096)
    rows = {line.split()[0]: line.split() for line in ANSI.sub("", ctl.ok("hosts", "list")).splitlines()[1:]}
    assert rows["odd"][3:5] == ["0/7", "0/7168"]
    assert rows["odd"][6] == "schedulable"
    assert rows["silent"][6] == "stale" and rows["silent"][7] == "never"
    details = ctl.ok("hosts", "show", "odd")
    assert "0/7 (7 physical, 2 reserved, allocation ratio 1.5)" in details
    assert "scheduling         stale" in ctl.ok("hosts", "show", "silent")


def test_whoami(live: LiveServer, ctl: Ctl) -> None:
    assert ctl.json("whoami")["role"] == "admin"
    with live.admin() as c:
        client = c.create_token("client", project="p1")
    me = Ctl(live, client["token"]).json("whoami")
    assert me == {"role": "client", "token_id": client["id"], "host": None, "project": "p1"}
    assert "p1" in Ctl(live, client["token"]).ok("whoami")
