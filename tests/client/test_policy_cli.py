"""tdxctl for the fleet's TDX policy and the guided opt-in, against the real service over HTTP."""

from __future__ import annotations

import threading

from tests.client.conftest import LiveServer
from tests.client.test_cli import Ctl
from tests.conftest import load_body


def test_policy_show_and_set(live: LiveServer) -> None:
    ctl = Ctl(live)
    assert ctl.json("policy", "show")["tdx_min_module_version"] is None
    shown = ctl.ok("policy", "show")
    assert "max td builds per host  4 (default 4)" in shown
    policy = ctl.json("policy", "set", "--min-module-version", "1.5.10", "--max-td-builds", "2",
                      "--td-overhead-mib", "256")
    assert (policy["tdx_min_module_version"], policy["max_td_builds_per_host"], policy["td_memory_overhead_mib"]) == (
        "1.5.10", 2, 256
    )
    policy = ctl.json("policy", "set", "--min-module-version", "none", "--max-td-builds", "default")
    assert (policy["tdx_min_module_version"], policy["max_td_builds_per_host"], policy["td_memory_overhead_mib"]) == (
        None, 4, 256
    )
    bad = ctl("policy", "set", "--min-module-version", "1.5.x")
    assert bad.exit_code == 1 and "tdx_min_module_version" in bad.stderr
    assert ctl("policy", "set").exit_code == 2
    assert ctl("policy", "set", "--max-td-builds", "many").exit_code == 2


def test_hosts_to_update_and_attestation_vms(live: LiveServer) -> None:
    ctl = Ctl(live)
    live.ready_host("old")
    assert [h["name"] for h in ctl.json("hosts", "list", "--tdx-module-below", "1.5.10")] == ["old"]
    assert ctl.json("hosts", "list", "--tdx-module-below", "1.5.06") == []
    vm = ctl.json("vms", "create", "--name", "att", "--vcpus", "1", "--memory-mib", "1024", "--attestation")
    assert (vm["status"], vm["attestation"], vm["reasons"]) == ("pending", True, {"attestation_unavailable": 1})
    details = ctl.ok("hosts", "show", "old")
    assert "attestation" in details and "not checked" in details and "pamt" in details


def test_opt_in_wait_follows_the_operation_to_its_end(live: LiveServer) -> None:
    ctl = Ctl(live)
    body = live.ready_host("node-2", state="disabled")

    def reload_when_waiting() -> None:
        with live.admin() as c:
            for _ in range(600):
                ops = c.list_operations(host="node-2", status="running")["items"]
                if ops and ops[0]["step"] == "wait_for_load":
                    c.report_load("node-2", load_body("ready", 31, boot_id=body["boot_id"]))
                    return
                c.list_events(after=c.list_events(limit=1)["head_id"], wait=0.2)

    agent = threading.Thread(target=reload_when_waiting, daemon=True)
    agent.start()
    result = ctl("hosts", "opt-in", "node-2", "--wait")
    agent.join(timeout=30)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    out = result.stdout
    assert "TDX opt-in of node-2 started" in out
    for line in ("cordon: cordoned node-2", "wait_for_load: no active VM on node-2", "uncordon: uncordoned node-2"):
        assert line in out, out
    assert "succeeded" in out
    (op,) = ctl.json("operations", "list")
    assert op["status"] == "succeeded"
    assert "verify" in ctl.ok("operations", "show", op["id"])
    assert ctl.json("hosts", "show", "node-2")["schedulable"] is True


def test_opt_in_without_wait_then_cancel(live: LiveServer) -> None:
    ctl = Ctl(live)
    live.ready_host("h", state="disabled")
    out = ctl.ok("hosts", "opt-in", "h")
    assert "wait_for_load: no active VM on h" in out
    (op,) = ctl.json("operations", "list", "--status", "running")
    assert "canceled" in ctl.ok("operations", "cancel", op["id"])
    again = ctl("operations", "cancel", op["id"])
    assert again.exit_code == 1 and "operation_finished" in again.stderr
    assert ctl("operations", "show", "nope").exit_code == 1
    live.ready_host("ok")
    refused = ctl("hosts", "opt-in", "ok", "--wait")
    assert refused.exit_code == 1 and "tdx_already_ready" in refused.stderr
    assert ctl("hosts", "opt-in", "nope").exit_code == 1
