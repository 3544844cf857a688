"""``tdx-agent run`` against the real service (uvicorn on loopback, SQLite and PostgreSQL).

A load is the boot plus the kvm_intel module instance: a config edit, a TDX module version appearing
or changing, KeyIDs coming and going are not new loads; an unload/reload and a reboot are.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from service.agent.loop import SETTLE_POLL_S, Agent, AgentConfig, backoff_delay
from service.agent.main import main
from service.agent.state import StateStore
from service.client import TdxClient
from service.tdx_reasons import REASONS
from tests.agent.conftest import (
    CASES,
    FIXTURES,
    Admin,
    append_kmsg,
    expected_of,
    loopback_socket,
    reload_kvm_intel,
    serve,
    unload_kvm_intel,
    url_of,
)
from tests.conftest import load_body

TDX_VM = {"name": "a", "vcpus": 1, "memory_mib": 512, "tdx": True}


def agent_args(server: str, token: str, host: str, root: Path, state: Path, *extra: str) -> list[str]:
    return [
        "run", "--server", server, "--token", token, "--host", host, "--root", str(root),
        "--kernel-log", str(root / "kmsg.log"), "--state-dir", str(state), "--settle", "0", *extra,
    ]


def run_once(server: str, token: str, host: str, root: Path, state: Path) -> int:
    return main(agent_args(server, token, host, root, state, "--once"))


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("tdx-agent: error: ")
    return lines[0]


def test_every_case_says_what_it_expects() -> None:
    for case in CASES:
        expected = expected_of(case)
        assert expected["era"] in ("< 6.16", "6.16-7.0", "7.1+") and expected["about"]
        assert f"| `{case}` |" in (FIXTURES / "README.md").read_text()
        assert expected["reason_code"] is None or expected["reason_code"] in REASONS


@pytest.mark.parametrize("case", CASES)
def test_run_once_reports_each_case(
    case: str, live_server: tuple[str, str], admin: Admin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root = FIXTURES / case

    assert run_once(url, token, "node1", root, tmp_path / "state") == 0

    host = admin.host("node1")
    expected = expected_of(case)
    tdx = host["tdx"]
    assert (tdx["state"], tdx["reason_code"], tdx["reason"], tdx["keyids_total"]) == (
        expected["tdx_state"], expected["reason_code"], expected["reason"], expected["keyids_total"],
    )
    assert tdx["remedy"] == (REASONS[expected["reason_code"]].remedy if expected["reason_code"] else None)
    assert host["alive"] is True
    (load,) = admin.loads("node1")
    assert host["load"]["id"] == load["id"]
    assert load["boot_id"] == (root / "proc/sys/kernel/random/boot_id").read_text().strip()
    assert "Traceback" not in capsys.readouterr().err


def test_heartbeat_carries_the_observations_and_capacity_comes_from_the_host(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path
) -> None:
    url, _ = live_server
    token = admin.host_with_agent("node1", vcpus=4, memory_mib=4096)
    assert run_once(url, token, "node1", FIXTURES / "ready-cmdline", tmp_path / "state") == 0
    host = admin.host("node1")
    assert host["tdx"]["keyids_observed_in_use"] == 2  # misc.current "tdx 2"
    assert host["tdx"]["module_version"] is None  # 6.16-7.0 expose no version
    assert (host["tdx"]["configured"], host["tdx"]["next_load"]) == (True, None)
    assert (host["vcpus"], host["memory_mib"]) == (16, 64287)
    token2 = admin.host_with_agent("node2")
    assert run_once(url, token2, "node2", FIXTURES / "ready-7.1", tmp_path / "state2") == 0
    assert (admin.host("node2")["tdx"]["module_version"], admin.host("node2")["tdx"]["module_healthy"]) == (
        "1.5.16", True
    )


def test_agent_restart_reuses_the_load_and_says_it_was_already_recorded(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root, state = FIXTURES / "ready-cmdline", tmp_path / "state"
    assert run_once(url, token, "node1", root, state) == 0
    (first,) = admin.loads("node1")
    assert capsys.readouterr().err == f"INFO load {first['id']} reported: TDX ready\n"

    assert run_once(url, token, "node1", root, state) == 0

    assert admin.loads("node1") == [first]  # the same load: no new report in the history
    assert admin.host("node1")["load"]["id"] == first["id"]
    assert capsys.readouterr().err == f"INFO load {first['id']} was already recorded: TDX ready\n"


def test_a_fresh_state_dir_is_a_new_load(live_server: tuple[str, str], admin: Admin, tmp_path: Path) -> None:
    # Without its state the agent cannot know it reported this load: it reports a new one (same boot,
    # no VMs: a permitted reload).
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root = FIXTURES / "ready-cmdline"
    assert run_once(url, token, "node1", root, tmp_path / "a") == 0
    assert run_once(url, token, "node1", root, tmp_path / "b") == 0
    assert len(admin.loads("node1")) == 2


def test_reboot_makes_a_new_load_and_the_hosts_vms_are_lost(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, host_copy: Any
) -> None:
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root: Path = host_copy("ready-cmdline")
    state = tmp_path / "state"
    assert run_once(url, token, "node1", root, state) == 0
    vm = admin.ok("POST", "/v1/vms", 201, json=TDX_VM)
    assert (vm["status"], vm["host"]) == ("scheduled", "node1")

    (root / "proc/sys/kernel/random/boot_id").write_text("0f0e0d0c-0b0a-4908-8706-050403020100\n")
    assert run_once(url, token, "node1", root, state) == 0

    loads = admin.loads("node1")
    assert len(loads) == 2
    assert loads[0]["boot_id"] == "0f0e0d0c-0b0a-4908-8706-050403020100" and loads[0]["current"]
    assert admin.vm(vm["id"])["status"] == "lost"
    host = admin.host("node1")
    assert host["usage"]["vms"] == 0
    assert host["tdx"]["state"] == "ready"


def test_opting_in_by_reloading_kvm_intel_is_a_new_load(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, host_copy: Any
) -> None:
    # DESIGN.md 1: drain, reload kvm_intel with tdx=1, report the new load.
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root: Path = host_copy("disabled")
    state = tmp_path / "state"
    assert run_once(url, token, "node1", root, state) == 0
    assert admin.host("node1")["tdx"]["state"] == "disabled"

    (root / "etc/modprobe.d/kvm.conf").write_text("options kvm_intel nested=1 tdx=1\n")
    assert run_once(url, token, "node1", root, state) == 0
    assert len(admin.loads("node1")) == 1  # a config edit: intent for the next load, not a load
    assert admin.host("node1")["tdx"]["next_load"] == "opt-in configured: takes effect at the next kvm_intel load"

    reload_kvm_intel(root, "Y")  # modprobe -r kvm_intel && modprobe kvm_intel
    append_kmsg(root, "virt/tdx: 263168 KB allocated for PAMT", "virt/tdx: module initialized", level=6)
    (root / "sys/fs/cgroup/misc.capacity").write_text("tdx 15\n")
    assert run_once(url, token, "node1", root, state) == 0

    loads = admin.loads("node1")
    assert [ld["tdx_state"] for ld in loads] == ["ready", "disabled"]
    assert loads[0]["boot_id"] == loads[1]["boot_id"]
    host = admin.host("node1")
    assert (host["tdx"]["state"], host["tdx"]["keyids_total"], host["tdx"]["next_load"]) == ("ready", 15, None)


def test_reload_under_active_vms_is_refused_with_one_line(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, host_copy: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root: Path = host_copy("ready-cmdline")
    state = tmp_path / "state"
    assert run_once(url, token, "node1", root, state) == 0
    admin.ok("POST", "/v1/vms", 201, json=TDX_VM)
    capsys.readouterr()

    reload_kvm_intel(root, "Y")  # a different load on the same boot
    assert run_once(url, token, "node1", root, state) == 1

    assert "reload_with_active_vms" in one_error_line(capsys)
    assert len(admin.loads("node1")) == 1


def test_a_load_reported_by_someone_else_makes_the_agent_report_a_new_one(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path
) -> None:
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root, state = FIXTURES / "ready-cmdline", tmp_path / "state"
    assert run_once(url, token, "node1", root, state) == 0
    (mine,) = admin.loads("node1")
    admin.ok("POST", "/v1/hosts/node1/loads", 201, json=load_body("disabled"))

    # The remembered load is no longer current (409 stale_load): the agent reports the host as it is now.
    assert run_once(url, token, "node1", root, state) == 0

    loads = admin.loads("node1")
    assert len(loads) == 3
    assert loads[0]["id"] not in (mine["id"], loads[1]["id"]) and loads[0]["current"]
    assert loads[0]["boot_id"] == mine["boot_id"]
    assert admin.host("node1")["tdx"]["state"] == "ready"


def test_bad_token_exits_with_one_line(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live_server
    admin.host_with_agent("node1")
    assert run_once(url, "tdx_not-a-real-token", "node1", FIXTURES / "ready-cmdline", tmp_path / "s") != 0
    assert "401" in one_error_line(capsys)
    assert admin.loads("node1") == []


def test_another_hosts_token_exits_with_one_line(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live_server
    admin.host_with_agent("node1")
    other = admin.host_with_agent("node2")
    assert run_once(url, other, "node1", FIXTURES / "ready-cmdline", tmp_path / "s") == 1
    assert "403" in one_error_line(capsys)


def test_unregistered_host_exits_with_one_line(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, token = live_server  # the admin token may report for any host, but there is none
    assert run_once(url, token, "ghost", FIXTURES / "ready-cmdline", tmp_path / "s") == 1
    assert "register" in one_error_line(capsys)


def test_server_down_with_once_exits_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = loopback_socket()  # bound, never listening: connections are refused
    try:
        assert run_once(url_of(sock), "t", "node1", FIXTURES / "ready-cmdline", tmp_path / "s") == 1
    finally:
        sock.close()
    assert "unavailable" in one_error_line(capsys)


def test_unwritable_state_dir_exits_with_one_line(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live_server
    token = admin.host_with_agent("node1")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run_once(url, token, "node1", FIXTURES / "ready-cmdline", blocker / "state") == 1
    assert "state" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--token", "t", "--host", "h"], "--server"),
        (["run", "--server", "http://127.0.0.1:1", "--host", "h"], "--token"),
        (["run", "--server", "http://127.0.0.1:1", "--token", "t"], "--host"),
        (["run", "--server", "127.0.0.1:1", "--token", "t", "--host", "h"], "--server"),
        (["run", "--server", "http://127.0.0.1:1", "--token", "t", "--host", "Not_A_Name"], "--host"),
        (["run", "--server", "http://127.0.0.1:1", "--token", "t", "--host", "h", "--interval", "0"], "--interval"),
        (["run", "--server", "http://127.0.0.1:1", "--token", "t", "--host", "h", "--interval", "x"], "interval"),
        (["launch"], "launch"),
        ([], "command"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("TDX_SERVER", "TDX_TOKEN", "TDX_HOST"):
        monkeypatch.delenv(var, raising=False)
    assert main(args) == 2
    assert needle in one_error_line(capsys)


def test_server_and_token_from_the_environment(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = live_server
    token = admin.host_with_agent("node1")
    monkeypatch.setenv("TDX_SERVER", url)
    monkeypatch.setenv("TDX_TOKEN", token)
    root = FIXTURES / "disabled"
    args = ["run", "--host", "node1", "--root", str(root), "--kernel-log", os.devnull]
    assert main([*args, "--state-dir", str(tmp_path / "s"), "--once"]) == 0
    assert admin.host("node1")["tdx"]["state"] == "disabled"


# --- the loop ---------------------------------------------------------------------------------------


class Stop(Exception):
    pass


INTERVAL = 1000.0  # never really slept: the fake sleep tells interval waits from backoff by this value


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        ceiling = min(60.0, 2.0**attempt)
        delays = {backoff_delay(attempt, rng) for _ in range(20)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jitter
    assert backoff_delay(10_000, rng) <= 60.0


def test_agent_keeps_going_while_the_server_is_down(app: FastAPI, tmp_path: Path) -> None:
    sock = loopback_socket()  # refuses connections until the server starts on it
    url = url_of(sock)
    waits: list[float] = []
    server: Any = None

    def sleep(seconds: float) -> None:
        nonlocal server
        if seconds == INTERVAL:
            raise Stop
        waits.append(seconds)
        if len(waits) == 4:  # after four refused attempts the service comes (back) up
            server = serve(app, sock)
            url_up = server.__enter__()
            assert url_up == url
            setup = Admin(url, "tdx_test-admin-token-of-32-characters-or-more")
            setup.host_with_agent("node1")
            setup.close()

    client = TdxClient(url, "tdx_test-admin-token-of-32-characters-or-more", retries=0)
    config = AgentConfig("node1", FIXTURES / "ready-cmdline", os.devnull, INTERVAL, once=False, settle_s=0)
    agent = Agent(client, config, StateStore(tmp_path / "state"), sleep=sleep, rng=random.Random(1))
    try:
        with pytest.raises(Stop):
            agent.run()
        assert len(waits) == 4
        for attempt, wait in enumerate(waits):
            assert 2.0**attempt / 2 <= wait <= 2.0**attempt
        admin = Admin(url, "tdx_test-admin-token-of-32-characters-or-more")
        host = admin.host("node1")
        assert host["tdx"]["state"] == "ready" and host["alive"]
        admin.close()
    finally:
        client.close()
        if server is not None:
            server.__exit__(None, None, None)
        sock.close()


def test_agent_reports_when_kvm_intel_disappears_and_reappears(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, host_copy: Any
) -> None:
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root: Path = host_copy("ready-cmdline")
    module = root / "sys/module/kvm_intel"
    saved = tmp_path / "kvm_intel"
    shutil.copytree(module, saved)
    seen: list[int] = []

    def sleep(seconds: float) -> None:
        assert seconds == INTERVAL, "no backoff expected: the server is up"
        seen.append(len(admin.loads("node1")))
        step = len(seen)
        if step == 2:
            shutil.rmtree(module)  # modprobe -r kvm_intel
        elif step == 3:
            (module / "initstate").parent.mkdir(parents=True)
            (module / "initstate").write_text("coming\n")  # mid-load: not looked at yet
        elif step == 4:
            shutil.rmtree(module)
            shutil.copytree(saved, module)  # modprobe kvm_intel tdx=1: loaded and live
        elif step == 5:
            raise Stop

    client = TdxClient(url, token, retries=0)
    config = AgentConfig("node1", root, str(root / "kmsg.log"), INTERVAL, once=False, settle_s=0)
    try:
        with pytest.raises(Stop):
            Agent(client, config, StateStore(tmp_path / "state"), sleep=sleep).run()
    finally:
        client.close()

    # 1 after start, still 1 after an unchanged tick, 2 once kvm_intel was gone, still 2 while it was
    # loading, 3 when it was back.
    assert seen == [1, 1, 2, 2, 3]
    loads = admin.loads("node1")
    assert [(ld["kvm_intel_loaded"], ld["tdx_state"]) for ld in loads] == [
        (True, "ready"), (False, "failed"), (True, "ready"),
    ]
    assert len({ld["boot_id"] for ld in loads}) == 1
    assert admin.host("node1")["load"]["id"] == loads[0]["id"]


def test_agent_reports_again_when_its_heartbeat_is_stale(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path
) -> None:
    url, _ = live_server
    token = admin.host_with_agent("node1")
    ticks: list[int] = []

    def sleep(seconds: float) -> None:
        assert seconds == INTERVAL
        ticks.append(len(ticks))
        if len(ticks) == 1:
            admin.ok("POST", "/v1/hosts/node1/loads", 201, json=load_body("disabled"))  # someone else's load
        elif len(ticks) == 2:
            raise Stop

    client = TdxClient(url, token, retries=0)
    config = AgentConfig("node1", FIXTURES / "ready-cmdline", os.devnull, INTERVAL, once=False, settle_s=0)
    try:
        with pytest.raises(Stop):
            Agent(client, config, StateStore(tmp_path / "state"), sleep=sleep).run()
    finally:
        client.close()

    newest, foreign, first = admin.loads("node1")
    assert newest["current"] and newest["tdx_state"] == "ready"
    assert newest["id"] != first["id"] and newest["boot_id"] == first["boot_id"]
    assert foreign["tdx_state"] == "disabled"
    assert admin.host("node1")["alive"]


def test_a_refused_reload_is_retried_every_interval_without_heartbeats(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, host_copy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root: Path = host_copy("ready-cmdline")
    seen: list[tuple[int, str | None]] = []
    vm: dict[str, Any] = {}

    def sleep(seconds: float) -> None:
        assert seconds == INTERVAL
        seen.append((len(admin.loads("node1")), admin.host("node1")["last_heartbeat_at"]))
        if len(seen) == 1:
            vm.update(admin.ok("POST", "/v1/vms", 201, json=TDX_VM))
            reload_kvm_intel(root, "Y")  # another load, same boot
            (root / "sys/fs/cgroup/misc.capacity").write_text("tdx 31\n")
        elif len(seen) == 3:
            admin.ok("DELETE", f"/v1/vms/{vm['id']}", 202)  # never started: deleted at once
        elif len(seen) == 4:
            raise Stop

    client = TdxClient(url, token, retries=0)
    config = AgentConfig("node1", root, os.devnull, INTERVAL, once=False, settle_s=0)
    try:
        with pytest.raises(Stop):
            Agent(client, config, StateStore(tmp_path / "state"), sleep=sleep).run()
    finally:
        client.close()

    assert [n for n, _ in seen] == [1, 1, 1, 2]
    assert seen[1][1] == seen[2][1]  # refused: no heartbeat for the old load in between
    refusals = [r for r in caplog.records if "reload_with_active_vms" in r.getMessage() or "refused" in r.getMessage()]
    assert len(refusals) == 1  # said once, not every interval
    assert admin.host("node1")["tdx"]["keyids_total"] == 31


# --- what is a new load, and what is not ----------------------------------------------------------


class FakeTime:
    """sleep() advances clock(); ``on_sleep(seconds, step)`` changes the host between steps."""

    def __init__(self, on_sleep: Any) -> None:
        self.now = 1000.0
        self.steps = 0
        self.on_sleep = on_sleep

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.steps += 1
        self.on_sleep(seconds, self.steps)


def run_agent(url: str, token: str, root: Path, state: Path, fake: FakeTime, settle_s: float = 30.0) -> None:
    client = TdxClient(url, token, retries=0)
    config = AgentConfig("node1", root, str(root / "kmsg.log"), INTERVAL, once=False, settle_s=settle_s)
    try:
        with pytest.raises(Stop):
            Agent(client, config, StateStore(state), sleep=fake.sleep, clock=fake.clock).run()
    finally:
        client.close()


def test_a_config_edit_or_a_module_version_appearing_later_is_not_a_reload(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, host_copy: Any
) -> None:
    # The README's own opt-in step (writing modprobe.d) and a tdx_host driver that loads after the
    # agent, then a runtime TDX module update, under a running TD: the same load all along, and
    # the heartbeats go on (before, a fake reload was refused with 409 and the host went stale).
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root: Path = host_copy("ready-cmdline")
    beats: list[str] = []

    def on_sleep(seconds: float, step: int) -> None:
        assert seconds == INTERVAL
        beats.append(admin.host("node1")["last_heartbeat_at"])
        if step == 1:
            admin.ok("POST", "/v1/vms", 201, json=TDX_VM)
            (root / "etc/modprobe.d/kvm.conf").write_text("options kvm_intel nested=1 tdx=0\n")
            cmdline = root / "proc/cmdline"
            cmdline.write_text(cmdline.read_text().replace(" kvm_intel.tdx=1", ""))
            version = root / "sys/devices/faux/tdx_host/version"
            version.parent.mkdir(parents=True)
            version.write_text("1.5.06\n")
        elif step == 2:
            (root / "sys/devices/faux/tdx_host/version").write_text("1.5.16\n")
            (root / "sys/fs/cgroup/misc.current").write_text("tdx 3\n")
        elif step == 4:
            raise Stop

    run_agent(url, token, root, tmp_path / "state", FakeTime(on_sleep))

    assert len(admin.loads("node1")) == 1
    assert len(set(beats)) == len(beats)  # a heartbeat every interval
    host = admin.host("node1")
    assert (host["tdx"]["state"], host["tdx"]["module_version"], host["tdx"]["keyids_observed_in_use"]) == (
        "ready", "1.5.16", 3,
    )
    assert host["tdx"]["next_load"] == (
        "opt-in not configured: the next kvm_intel load (and a reboot) comes up without tdx=1"
    )
    assert host["usage"]["vms"] == 1 and host["alive"]


def test_a_reload_within_the_settle_window_is_one_new_load(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, host_copy: Any
) -> None:
    # modprobe -r kvm_intel; (a few seconds); modprobe kvm_intel tdx=1: never reported "not loaded".
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root: Path = host_copy("disabled")

    def on_sleep(seconds: float, step: int) -> None:
        if step == 1:
            unload_kvm_intel(root)
        elif step == 2:
            reload_kvm_intel(root, "Y")
            append_kmsg(root, "virt/tdx: 263168 KB allocated for PAMT", "virt/tdx: module initialized", level=6)
            (root / "sys/fs/cgroup/misc.capacity").write_text("tdx 63\n")
        elif step == 4:
            raise Stop

    run_agent(url, token, root, tmp_path / "state", FakeTime(on_sleep), settle_s=30.0)

    loads = admin.loads("node1")
    assert [(ld["kvm_intel_loaded"], ld["tdx_state"]) for ld in loads] == [(True, "ready"), (True, "disabled")]


def test_kvm_intel_gone_for_longer_than_the_settle_window_is_reported(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, host_copy: Any
) -> None:
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root: Path = host_copy("ready-cmdline")
    loads_seen: list[int] = []

    def on_sleep(seconds: float, step: int) -> None:
        loads_seen.append(len(admin.loads("node1")))
        if step == 1:
            unload_kvm_intel(root)
        elif step == 4:
            raise Stop

    # The first look after the unload starts the settle window; the next one, an interval (1000 s)
    # later, is past it and reports the module gone.
    run_agent(url, token, root, tmp_path / "state", FakeTime(on_sleep), settle_s=30.0)

    assert loads_seen == [1, 1, 2, 2]
    newest = admin.loads("node1")[0]
    assert (newest["kvm_intel_loaded"], newest["tdx_reason_code"]) == (False, "kvm_intel_not_loaded")


def test_start_up_waits_for_kvm_intel_being_autoloaded(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, host_copy: Any
) -> None:
    # At boot the agent may start before udev has loaded kvm_intel: no "failed" report meanwhile.
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root: Path = host_copy("ready-cmdline")
    unload_kvm_intel(root)
    polls: list[float] = []

    def on_sleep(seconds: float, step: int) -> None:
        if seconds == SETTLE_POLL_S:
            polls.append(seconds)
            assert admin.loads("node1") == []  # nothing reported while settling
            if len(polls) == 3:
                module = root / "sys/module/kvm_intel"
                (root / "sys/module/.kvm_intel-unloaded").rename(module)
                (module / "initstate").write_text("coming\n")  # loading: still not looked at
            elif len(polls) == 5:
                (root / "sys/module/kvm_intel/initstate").write_text("live\n")
        else:
            raise Stop

    run_agent(url, token, root, tmp_path / "state", FakeTime(on_sleep), settle_s=30.0)

    assert len(polls) == 5
    (load,) = admin.loads("node1")
    assert (load["kvm_intel_loaded"], load["tdx_state"]) == (True, "ready")


def test_start_up_reports_kvm_intel_absent_after_the_settle_window(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, host_copy: Any
) -> None:
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root: Path = host_copy("kvm-intel-unloaded")
    fake = FakeTime(lambda seconds, step: (_ for _ in ()).throw(Stop) if seconds == INTERVAL else None)
    run_agent(url, token, root, tmp_path / "state", fake, settle_s=5.0)
    assert fake.steps == 6  # five polls of a second, then the first interval
    (load,) = admin.loads("node1")
    assert (load["kvm_intel_loaded"], load["tdx_reason_code"]) == (False, "kvm_intel_not_loaded")


def test_without_a_boot_id_the_agent_reports_nothing(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, host_copy: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root: Path = host_copy("ready-cmdline")
    boot_id = root / "proc/sys/kernel/random/boot_id"
    saved = boot_id.read_text()
    boot_id.unlink()
    assert run_once(url, token, "node1", root, tmp_path / "state") == 1
    line = one_error_line(capsys)
    assert "cannot read the boot id" in line and "a reboot cannot be told from a kvm_intel reload" in line
    assert admin.loads("node1") == []

    # Lost while running: neither a report nor a heartbeat until it is back.
    boot_id.write_text(saved)
    beats: list[str | None] = []

    def on_sleep(seconds: float, step: int) -> None:
        beats.append(admin.host("node1")["last_heartbeat_at"])
        if step == 1:
            boot_id.unlink()
        elif step == 3:
            boot_id.write_text(saved)
        elif step == 4:
            raise Stop

    run_agent(url, token, root, tmp_path / "state", FakeTime(on_sleep))
    assert beats[1] == beats[2] != beats[3]
    assert len(admin.loads("node1")) == 1


def test_a_state_file_of_an_older_agent_is_the_same_load(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An agent upgrade must not look like a reload (with VMs on the host it would be refused).
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root = FIXTURES / "ready-cmdline"
    body = load_body("ready", 63, boot_id=(root / "proc/sys/kernel/random/boot_id").read_text().strip())
    admin.ok("POST", "/v1/hosts/node1/loads", 201, json=body)
    admin.ok("POST", "/v1/vms", 201, json=TDX_VM)
    state = tmp_path / "state"
    state.mkdir()
    old = {"format": 1, "host": "node1", "load_id": body["load_id"], "boot_id": body["boot_id"],
           "fingerprint": "0" * 64, "report": body}
    (state / "load.json").write_text(json.dumps(old))

    assert run_once(url, token, "node1", root, state) == 0

    assert [ld["id"] for ld in admin.loads("node1")] == [body["load_id"]]
    assert "was already recorded" in capsys.readouterr().err
    saved = json.loads((state / "load.json").read_text())
    assert saved["format"] == 2 and saved["kvm_intel_instance"] is not None and saved["load_id"] == body["load_id"]


def test_a_failed_tdx_module_update_fails_the_host_and_loses_its_tds(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path, host_copy: Any
) -> None:
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root: Path = host_copy("ready-7.1")
    vms: dict[str, Any] = {}

    def on_sleep(seconds: float, step: int) -> None:
        if step == 1:
            vms["td"] = admin.ok("POST", "/v1/vms", 201, json=TDX_VM)
            vms["plain"] = admin.ok("POST", "/v1/vms", 201, json={**TDX_VM, "name": "b", "tdx": False})
            version = root / "sys/devices/faux/tdx_host/version"
            version.unlink()
            version.mkdir()  # reading it fails, as -ENXIO does after a failed update
        elif step == 2:
            raise Stop

    run_agent(url, token, root, tmp_path / "state", FakeTime(on_sleep))

    host = admin.host("node1")
    assert (host["tdx"]["state"], host["tdx"]["reason_code"], host["tdx"]["module_healthy"]) == (
        "failed", "tdx_module_update_failed", False,
    )
    assert admin.vm(vms["td"]["id"])["status"] == "lost"
    assert admin.vm(vms["plain"]["id"])["status"] == "scheduled"
    assert len(admin.loads("node1")) == 1
