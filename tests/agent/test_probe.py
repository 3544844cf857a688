"""``tdx-agent probe`` on the fixture host trees of each case and kernel era, and how a load's facts are
read: once, from what the kernel shows for *this* load.

Every fixture tree carries ``expected.json``: what the server must derive from it (state, reason code,
the kernel's words, KeyIDs). Agent and server agree when the agent's report of the tree derives exactly
that.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from service.agent.kernel_log import COMPLETE, ROTATED, UNREADABLE, Position, from_lines, read_kernel_log
from service.agent.kvm_intel import look
from service.agent.load_facts import read_load_facts
from service.agent.main import main
from service.hosts.readiness import KernelLog, LoadFacts, derive_readiness
from service.hosts.schemas import LoadReport
from tests.agent.conftest import CASES, FIXTURES, expected_of

LOAD_REPORT_FIELDS = {
    "load_id", "boot_id", "kernel", "kvm_intel_loaded", "kvm_tdx", "tdx_platform", "tdx_requested", "tdx_effective",
    "keyids_total", "module_version", "errors", "kernel_log", "vcpus", "present_cpus", "memory_mib", "pamt_kb",
}


def run_probe(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["probe", *args]) == 0
    out = capsys.readouterr().out
    facts: dict[str, Any] = json.loads(out)
    return facts


def probe_case(capsys: pytest.CaptureFixture[str], root: Path) -> dict[str, Any]:
    return run_probe(capsys, "--root", str(root), "--kernel-log", str(root / "kmsg.log"))


def derive(load: dict[str, Any]) -> tuple[str, str | None, str | None]:
    r = derive_readiness(LoadFacts(
        kvm_intel_loaded=load["kvm_intel_loaded"], tdx_platform=load["tdx_platform"],
        tdx_requested=load["tdx_requested"], tdx_effective=load["tdx_effective"], keyids_total=load["keyids_total"],
        errors=tuple(load["errors"]), kvm_tdx=load["kvm_tdx"], kernel_log=KernelLog(load["kernel_log"]),
    ))
    return r.state.value, r.reason_code, r.reason


@pytest.mark.parametrize("case", CASES)
def test_each_case_is_reported_so_that_the_server_derives_what_the_case_says(
    case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = FIXTURES / case
    expected = expected_of(case)
    probed = probe_case(capsys, root)
    load = probed["load"]
    assert set(load) == LOAD_REPORT_FIELDS
    LoadReport.model_validate(load)  # the server takes the body as it is
    assert uuid.UUID(load["load_id"]).version == 4
    assert load["boot_id"] == (root / "proc/sys/kernel/random/boot_id").read_text().strip()
    assert load["kernel_log"] == "complete"
    assert (load["kvm_intel_loaded"], load["keyids_total"]) == (expected["kvm_intel_loaded"], expected["keyids_total"])
    assert load["pamt_kb"] == expected["pamt_kb"]  # the boot's "virt/tdx: N KB allocated for PAMT"
    assert derive(load) == (expected["tdx_state"], expected["reason_code"], expected["reason"])
    assert probed["kvm_intel"] == ("live" if expected["kvm_intel_loaded"] else "absent")


def test_every_log_line_of_the_fixtures_is_upstream_wording() -> None:
    # A catalogued TDX line or a line the kernel prints elsewhere; never the invented "... disabling TDX".
    from service.kernel_messages import recognise, tagged

    other = ("SEAMCALL (0x", "RCX 0x", "R09 0x")
    for case in CASES:
        for line in read_kernel_log(str(FIXTURES / case / "kmsg.log"), dmesg_fallback=False).lines:
            message = tagged(line.text)
            if message is None:
                continue
            known = recognise(message) is not None
            assert known or message.removeprefix("virt/tdx: ").startswith(other), (case, message)
            assert "disabling TDX" not in message


def test_a_probe_mints_a_fresh_load_id_and_carries_the_heartbeat_observations(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = FIXTURES / "ready-7.1"
    first, second = probe_case(capsys, root), probe_case(capsys, root)
    assert first["load"]["load_id"] != second["load"]["load_id"]
    # The fixture trees have no QGS socket and no QEMU or libvirt (looked for under --root only).
    no_userspace = {
        "attestation_ready": False, "vmm_tdx": "unknown", "vmm_detail": "no QEMU or libvirt domain capabilities found",
    }
    assert first["heartbeat"] == {
        "keyids_in_use": 0, "module_version": "1.5.16", "module_healthy": True, "tdx_configured": True,
        **no_userspace,
    }
    assert first["load"]["module_version"] == "1.5.16"
    assert probe_case(capsys, FIXTURES / "no-misc-cgroup")["heartbeat"] == {
        "module_version": None, "module_healthy": None, "tdx_configured": True,  # 6.16: no version, no misc
        **no_userspace,
    }


def test_no_boot_id_means_no_report_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tdx-agent: error: cannot read the boot id")


def test_probe_rejects_a_root_that_is_not_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--root", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--root" in err


def test_probe_of_another_root_never_reads_this_machines_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The default log is <root>/dev/kmsg; without it the log is unreadable (no dmesg of the real host).
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / "missing-apicv", root)
    load = run_probe(capsys, "--root", str(root))["load"]
    assert (load["kernel_log"], load["errors"]) == ("unreadable", [])
    (root / "dev").mkdir()
    shutil.copy(root / "kmsg.log", root / "dev/kmsg")
    load = run_probe(capsys, "--root", str(root))["load"]
    assert (load["kernel_log"], load["errors"]) == ("complete", ["kvm_intel: APICv is required for TDX"])


# --- tdx_requested: this load's, not the configuration's ------------------------------------------


def _facts(root: Path, log_lines: list[str] | None, since: Position | None = None, configured: bool = False) -> Any:
    return read_load_facts(root, "b", look(root), from_lines(log_lines), since, configured)


def _copy(tmp_path: Path, case: str) -> Path:
    root = tmp_path / case
    shutil.copytree(FIXTURES / case, root)
    return root


def _log(root: Path) -> list[str]:
    return (root / "kmsg.log").read_text().splitlines()


def test_a_config_edit_is_not_a_fact_of_the_current_load(tmp_path: Path) -> None:
    # modprobe.d now says tdx=1, but this load came up without it: nothing of KVM's TDX bring-up in
    # its log, and the log is complete. Not requested; the edit is intent for the next load.
    root = _copy(tmp_path, "disabled")
    (root / "etc/modprobe.d/kvm.conf").write_text("options kvm_intel tdx=1\n")
    facts = _facts(root, _log(root), configured=True)
    assert (facts.tdx_requested, facts.kernel_log) == (False, COMPLETE)


def test_tdx_on_counts_as_requested_without_a_trace_in_the_config(tmp_path: Path) -> None:
    # `modprobe kvm_intel tdx=1` by hand leaves nothing in the command line or modprobe.d.
    root = _copy(tmp_path, "ready-cmdline")
    assert _facts(root, _log(root), configured=False).tdx_requested is True


def test_a_refusal_line_of_this_load_means_tdx_was_asked_for(tmp_path: Path) -> None:
    root = _copy(tmp_path, "missing-apicv")
    assert _facts(root, _log(root), configured=False).tdx_requested is True


def test_a_refusal_line_of_an_earlier_load_does_not_count(tmp_path: Path) -> None:
    # The APICv refusal was printed before the previous load the agent recorded ended (seq 4): it
    # belongs to that load. This load came up with tdx=N silently: not asked for.
    root = _copy(tmp_path, "missing-apicv")
    lines = _log(root)
    facts = _facts(root, lines, since=Position(seq=4, usec=None), configured=True)
    assert (facts.tdx_requested, facts.errors) == (False, ())
    # The boot's own lines (virt/tdx) stay true for every load of the boot.
    hib = _copy(tmp_path, "hibernation")
    late = _facts(hib, _log(hib), since=Position(seq=6, usec=None))
    assert late.errors == ("virt/tdx: initialization failed: Hibernation support is enabled",)


@pytest.mark.parametrize("log", [None, ["6,900,99000000,-;kvm: a record after the boot's first were overwritten"]])
def test_without_a_complete_log_the_configuration_at_first_sight_decides(tmp_path: Path, log: list[str] | None) -> None:
    root = _copy(tmp_path, "disabled")
    for configured in (False, True):
        facts = _facts(root, log, configured=configured)
        assert facts.tdx_requested is configured
        assert facts.kernel_log == (UNREADABLE if log is None else ROTATED)


def test_a_silent_refusal_on_6_16_falls_back_to_the_configuration(tmp_path: Path) -> None:
    # "module not loaded" is printed once per boot; a later tdx=1 load fails silently.
    root = _copy(tmp_path, "module-not-loaded")
    facts = _facts(root, _log(root), since=Position(seq=99, usec=None), configured=True)
    assert (facts.tdx_requested, facts.errors) == (True, ("virt/tdx: module not loaded",))


def test_kvm_intel_half_loaded_is_not_looked_at_as_effective(tmp_path: Path) -> None:
    root = _copy(tmp_path, "ready-cmdline")
    (root / "sys/module/kvm_intel/initstate").write_text("coming\n")
    facts = _facts(root, _log(root), configured=True)
    assert (facts.kvm_intel_loaded, facts.tdx_effective, facts.keyids_total) == (False, False, 63)


def test_unreadable_files_give_defaults_not_a_crash(tmp_path: Path) -> None:
    # A directory where a file is expected cannot be read as text: the same as missing.
    for rel in ("proc/cpuinfo", "proc/cmdline", "sys/fs/cgroup/misc.capacity", "proc/meminfo"):
        (tmp_path / rel).mkdir(parents=True)
    facts = _facts(tmp_path, None)
    assert (facts.tdx_platform, facts.tdx_requested, facts.keyids_total, facts.memory_mib, facts.vcpus) == (
        False, False, 0, None, None,
    )
    assert facts.kernel == "unknown" and os.path.isdir(tmp_path)
