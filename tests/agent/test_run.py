"""``tdx-agent run`` against the real service (uvicorn on loopback, SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from service.agent.loop import Agent, AgentConfig, backoff_delay
from service.agent.main import main
from service.agent.state import StateStore
from service.client import TdxClient
from tests.agent.conftest import CASES, FIXTURES, Admin, loopback_socket, serve, url_of
from tests.conftest import load_body

# (tdx.state, the reason or a piece of it, tdx.keyids_total) the server derives from each case.
EXPECTED: dict[str, tuple[str, str | None, int]] = {
    "ready-cmdline": ("ready", None, 63),
    "ready-modprobe": ("ready", None, 31),
    "disabled": ("disabled", "not opted in", 0),
    "bringup-failed": ("failed", "virt/tdx: module initialization failed (-5)", 0),
    "kvm-intel-not-loaded": ("failed", "virt/tdx: module initialization failed (-12)", 0),
    "unsupported": ("unsupported", "tdx_host_platform", 0),
    "no-misc-cgroup": ("failed", "KeyIDs", 0),
}
TDX_VM = {"name": "a", "vcpus": 1, "memory_mib": 512, "tdx": True}


def agent_args(server: str, token: str, host: str, root: Path, state: Path, *extra: str) -> list[str]:
    return [
        "run", "--server", server, "--token", token, "--host", host, "--root", str(root),
        "--kernel-log", str(root / "kmsg.log"), "--state-dir", str(state), *extra,
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


def test_every_case_has_an_expected_state() -> None:
    assert sorted(EXPECTED) == CASES


@pytest.mark.parametrize("case", CASES)
def test_run_once_reports_each_case(
    case: str, live_server: tuple[str, str], admin: Admin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root = FIXTURES / case

    assert run_once(url, token, "node1", root, tmp_path / "state") == 0

    host = admin.host("node1")
    state, reason, keyids = EXPECTED[case]
    assert host["tdx"]["state"] == state
    assert host["tdx"]["keyids_total"] == keyids
    if reason is None:
        assert host["tdx"]["reason"] is None
    else:
        assert reason in host["tdx"]["reason"]
    assert host["alive"] is True
    (load,) = admin.loads("node1")
    assert host["load"]["id"] == load["id"]
    assert load["boot_id"] == (root / "proc/sys/kernel/random/boot_id").read_text().strip()
    assert "Traceback" not in capsys.readouterr().err


def test_heartbeat_carries_keyids_in_use_and_capacity_comes_from_the_host(
    live_server: tuple[str, str], admin: Admin, tmp_path: Path
) -> None:
    url, _ = live_server
    token = admin.host_with_agent("node1", vcpus=4, memory_mib=4096)
    assert run_once(url, token, "node1", FIXTURES / "ready-cmdline", tmp_path / "state") == 0
    host = admin.host("node1")
    assert host["tdx"]["keyids_observed_in_use"] == 2  # misc.current "tdx 2"
    assert host["tdx"]["module_version"] == "1.5.06"
    assert (host["vcpus"], host["memory_mib"]) == (16, 64287)


def test_agent_restart_reuses_the_load(live_server: tuple[str, str], admin: Admin, tmp_path: Path) -> None:
    url, _ = live_server
    token = admin.host_with_agent("node1")
    root, state = FIXTURES / "ready-cmdline", tmp_path / "state"
    assert run_once(url, token, "node1", root, state) == 0
    (first,) = admin.loads("node1")

    assert run_once(url, token, "node1", root, state) == 0

    assert admin.loads("node1") == [first]  # the same load: no new report in the history
    assert admin.host("node1")["load"]["id"] == first["id"]


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

    shutil.rmtree(root / "sys/module/kvm_intel")
    (root / "sys/module/kvm_intel/parameters").mkdir(parents=True)
    (root / "sys/module/kvm_intel/parameters/tdx").write_text("Y\n")
    (root / "etc/modprobe.d/kvm.conf").write_text("options kvm_intel nested=1 tdx=1\n")
    (root / "sys/fs/cgroup/misc.capacity").write_text("tdx 15\n")
    assert run_once(url, token, "node1", root, state) == 0

    loads = admin.loads("node1")
    assert [ld["tdx_state"] for ld in loads] == ["ready", "disabled"]
    assert loads[0]["boot_id"] == loads[1]["boot_id"]
    host = admin.host("node1")
    assert (host["tdx"]["state"], host["tdx"]["keyids_total"]) == ("ready", 15)


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

    (root / "sys/fs/cgroup/misc.capacity").write_text("tdx 31\n")  # a different load on the same boot
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
            setup = Admin(url, "tdx_test-admin-token")
            setup.host_with_agent("node1")
            setup.close()

    client = TdxClient(url, "tdx_test-admin-token", retries=0)
    config = AgentConfig("node1", FIXTURES / "ready-cmdline", os.devnull, INTERVAL, once=False)
    agent = Agent(client, config, StateStore(tmp_path / "state"), sleep=sleep, rng=random.Random(1))
    try:
        with pytest.raises(Stop):
            agent.run()
        assert len(waits) == 4
        for attempt, wait in enumerate(waits):
            assert 2.0**attempt / 2 <= wait <= 2.0**attempt
        admin = Admin(url, "tdx_test-admin-token")
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
    config = AgentConfig("node1", root, str(root / "kmsg.log"), INTERVAL, once=False)
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
    config = AgentConfig("node1", FIXTURES / "ready-cmdline", os.devnull, INTERVAL, once=False)
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
            (root / "sys/fs/cgroup/misc.capacity").write_text("tdx 31\n")  # another load, same boot
        elif len(seen) == 3:
            admin.ok("DELETE", f"/v1/vms/{vm['id']}", 202)  # never started: deleted at once
        elif len(seen) == 4:
            raise Stop

    client = TdxClient(url, token, retries=0)
    config = AgentConfig("node1", root, os.devnull, INTERVAL, once=False)
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
