"""End to end: the real agent on a fixture host tree -> the real server over HTTP -> what ``tdxctl`` shows.

Hosts and tokens are created with ``tdxctl``; the agent runs ``--once`` as ``tdx-agent run`` would;
``tdxctl hosts show`` must then show the state, the reason and the KeyIDs the fixture implies. A
reboot of a fixture host (a new boot_id) makes the VMs placed on it ``lost`` and frees what they held.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from service.agent.main import main as agent_main
from service.cli import app as tdxctl
from tests.agent.conftest import CASES, FIXTURES, app, expected_of, live_server  # noqa: F401  (pytest fixtures)

NEW_BOOT_ID = "0f0e0d0c-0b0a-4908-8706-050403020100"


class Ctl:
    """``tdxctl`` as an operator runs it, against the live server."""

    def __init__(self, url: str, token: str) -> None:
        self.runner = CliRunner()
        self.env = {"TDX_SERVER": url, "TDX_TOKEN": token, "COLUMNS": "200"}

    def ok(self, *args: str) -> str:
        result = self.runner.invoke(tdxctl, list(args), env=self.env)
        assert result.exit_code == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "-o", "json"))

    def agent_token(self, host: str) -> str:
        token: str = self.json("tokens", "create", "--role", "agent", "--host", host)["token"]
        return token


def details(table: str) -> dict[str, str]:
    """``tdxctl ... show`` table output as {field: value}; fields are separated from values by 2+ spaces."""
    rows: dict[str, str] = {}
    for line in table.splitlines():
        key, sep, value = line.strip().partition("  ")
        if sep:
            rows[key] = value.strip()
    return rows


def run_agent(url: str, token: str, host: str, root: Path, state_dir: Path) -> None:
    args = [
        "run", "--server", url, "--token", token, "--host", host, "--root", str(root),
        "--kernel-log", str(root / "kmsg.log"), "--state-dir", str(state_dir), "--once", "--settle", "0",
    ]
    assert agent_main(args) == 0


@pytest.fixture
def ctl(live_server: tuple[str, str]) -> Ctl:  # noqa: F811
    return Ctl(*live_server)


@pytest.mark.parametrize("case", CASES)
def test_agent_report_shows_in_tdxctl(
    case: str, live_server: tuple[str, str], ctl: Ctl, tmp_path: Path  # noqa: F811
) -> None:
    url, _ = live_server
    expected = expected_of(case)
    state, reason, keyids_total = expected["tdx_state"], expected["reason"], expected["keyids_total"]
    root = FIXTURES / case
    name = case.replace(".", "-")  # a host name is a DNS label
    ctl.ok("hosts", "create", name, "--vcpus", "4", "--memory-mib", "8192")
    assert ctl.json("hosts", "show", name)["tdx"]["state"] == "unknown"

    run_agent(url, ctl.agent_token(name), name, root, tmp_path / "state")

    host = ctl.json("hosts", "show", name)
    assert host["tdx"]["state"] == state
    assert host["tdx"]["reason"] == reason
    assert host["tdx"]["reason_code"] == expected["reason_code"]
    assert host["tdx"]["keyids_total"] == keyids_total
    assert host["tdx"]["keyids_used"] == 0
    assert host["alive"] is True
    boot_id = (root / "proc/sys/kernel/random/boot_id").read_text().strip()
    assert host["load"]["boot_id"] == boot_id

    shown = details(ctl.ok("hosts", "show", name))
    assert shown["tdx state"] == state
    assert shown["reason"] == (reason or "-")
    assert shown["keyids used/total"].split()[0] == f"0/{keyids_total}"
    assert shown["boot id"] == boot_id
    assert shown["alive"] == "yes"


def test_reboot_makes_the_hosts_vms_lost_and_frees_their_resources(
    live_server: tuple[str, str], ctl: Ctl, tmp_path: Path  # noqa: F811
) -> None:
    url, _ = live_server
    root = tmp_path / "node1"
    shutil.copytree(FIXTURES / "ready-cmdline", root)
    state_dir = tmp_path / "state"
    ctl.ok("hosts", "create", "node1", "--vcpus", "4", "--memory-mib", "8192")
    agent_token = ctl.agent_token("node1")
    run_agent(url, agent_token, "node1", root, state_dir)

    vm = ctl.json("vms", "create", "--name", "web", "--vcpus", "2", "--memory-mib", "2048", "--tdx")
    assert (vm["status"], vm["host"]) == ("scheduled", "node1")
    # The agent does not manage VMs; whatever starts them reports through the host's agent token.
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {agent_token}"}) as as_agent:
        r = as_agent.post(f"/v1/vms/{vm['id']}/status", json={"status": "running"})
        assert r.status_code == 200, r.text
    run_agent(url, agent_token, "node1", root, state_dir)  # an agent restart, same boot: a heartbeat
    assert ctl.json("vms", "show", vm["id"])["status"] == "running"
    before = ctl.json("hosts", "show", "node1")
    assert before["usage"] == {"vcpus": 2, "memory_mib": 2048, "vms": 1}
    assert before["tdx"]["keyids_used"] == 1
    shown = details(ctl.ok("hosts", "show", "node1"))
    assert shown["keyids used/total"].split()[0] == "1/63"
    assert shown["vcpus used/total"].startswith("2/64 (16 physical")  # allocation ratio 4
    assert shown["vms"] == "1"

    (root / "proc/sys/kernel/random/boot_id").write_text(NEW_BOOT_ID + "\n")
    run_agent(url, agent_token, "node1", root, state_dir)

    lost = ctl.json("vms", "show", vm["id"])
    assert lost["status"] == "lost"
    assert details(ctl.ok("vms", "show", vm["id"]))["status"] == "lost"
    after = ctl.json("hosts", "show", "node1")
    assert after["usage"] == {"vcpus": 0, "memory_mib": 0, "vms": 0}
    assert (after["tdx"]["state"], after["tdx"]["keyids_used"]) == ("ready", 0)
    assert after["load"]["boot_id"] == NEW_BOOT_ID
    shown = details(ctl.ok("hosts", "show", "node1"))
    assert shown["keyids used/total"].split()[0] == "0/63"
    assert shown["vcpus used/total"].startswith("0/64")
    assert shown["vms"] == "0"
    assert shown["boot id"] == NEW_BOOT_ID
    loads = ctl.json("hosts", "loads", "node1")
    assert [ld["boot_id"] for ld in loads] == [NEW_BOOT_ID, before["load"]["boot_id"]]
    assert [ld["current"] for ld in loads] == [True, False]
