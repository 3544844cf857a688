"""tdxctl against the real service over HTTP, through typer's CliRunner."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from service.cli import app
from tests.client.conftest import LiveServer


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
    assert missing.stderr.strip() == "error: host nope does not exist (host_not_found, HTTP 404)"
    assert "Traceback" not in missing.output

    live.ready_host("h1")
    taken = ctl("hosts", "create", "h1", "--vcpus", "4", "--memory-mib", "4096")
    assert taken.exit_code == 1 and "host_name_taken" in taken.stderr
    assert len(taken.stderr.strip().splitlines()) == 1

    invalid = ctl("vms", "create", "--name", "Bad_Name", "--vcpus", "1", "--memory-mib", "1024")
    assert invalid.exit_code == 1 and "validation_error" in invalid.stderr

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
