"""``tdx-agent probe`` on the fixture host trees, and the pure parsers it is made of."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from service.agent import probe as p
from service.agent.main import main
from tests.agent.conftest import CASES, FIXTURES

COMMON: dict[str, Any] = {
    "kernel": "6.16.0-tdx",
    "kvm_intel_loaded": True,
    "tdx_platform": True,
    "tdx_requested": True,
    "tdx_effective": False,
    "keyids_total": 0,
    "keyids_in_use": 0,
    "module_version": "1.5.06",
    "errors": [],
    "vcpus": 16,
    "memory_mib": 64287,
}

EXPECTED: dict[str, dict[str, Any]] = {
    "ready-cmdline": {
        **COMMON,
        "boot_id": "3b1f7c6e-0d2a-4e8b-9f61-7a5c2d4e8f10",
        "tdx_effective": True,
        "keyids_total": 63,
        "keyids_in_use": 2,
    },
    "ready-modprobe": {
        **COMMON,
        "boot_id": "9e0d4b1a-5c3f-4a27-8b6e-1f2d3c4b5a69",
        "tdx_effective": True,
        "keyids_total": 31,
        "module_version": "1.5.16",
        "vcpus": 32,
        "memory_mib": 128768,
    },
    "disabled": {
        **COMMON,
        "boot_id": "c4a8e2f0-7b19-4d63-a5e2-0f9b8d7c6e54",
        "tdx_requested": False,
        "module_version": None,
    },
    "bringup-failed": {
        **COMMON,
        "boot_id": "5d7e9f1b-2c4a-4b8d-9e6f-3a1b2c3d4e5f",
        "errors": [
            "virt/tdx: module initialization failed (-5)",
            "kvm_intel: tdx: TDX module initialization failed, disabling TDX",
        ],
    },
    "kvm-intel-not-loaded": {
        **COMMON,
        "boot_id": "8f2e4d6c-1a3b-4c5d-8e7f-9a0b1c2d3e4f",
        "kvm_intel_loaded": False,
        "errors": ["virt/tdx: module initialization failed (-12)"],
    },
    "unsupported": {
        **COMMON,
        "boot_id": "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
        "tdx_platform": False,
        "module_version": None,
        "vcpus": 8,
        "errors": ["kvm_intel: tdx: no TDX private KeyIDs available"],
    },
    "no-misc-cgroup": {
        **COMMON,
        "boot_id": "6e5d4c3b-2a19-4807-b6f5-e4d3c2b1a098",
        "tdx_effective": True,
    },
}
LOAD_REPORT_FIELDS = {
    "load_id", "boot_id", "kernel", "kvm_intel_loaded", "tdx_platform", "tdx_requested", "tdx_effective",
    "keyids_total", "module_version", "errors", "vcpus", "memory_mib",
}


def run_probe(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["probe", *args]) == 0
    out = capsys.readouterr().out
    facts: dict[str, Any] = json.loads(out)
    return facts


def test_every_case_has_expected_facts() -> None:
    assert sorted(EXPECTED) == CASES


@pytest.mark.parametrize("case", CASES)
def test_probe_prints_the_load_facts_of_each_case(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = FIXTURES / case
    facts = run_probe(capsys, "--root", str(root), "--kernel-log", str(root / "kmsg.log"))
    assert set(facts) == LOAD_REPORT_FIELDS | {"keyids_in_use"}
    assert uuid.UUID(facts.pop("load_id")).version == 4
    assert facts == EXPECTED[case]


def test_each_probe_mints_a_fresh_load_id(capsys: pytest.CaptureFixture[str]) -> None:
    root = str(FIXTURES / "disabled")
    first = run_probe(capsys, "--root", root, "--kernel-log", os.devnull)
    second = run_probe(capsys, "--root", root, "--kernel-log", os.devnull)
    assert first["load_id"] != second["load_id"]


def test_empty_root_gives_the_documented_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    facts = run_probe(capsys, "--root", str(tmp_path))
    facts.pop("load_id")
    assert facts == {
        "boot_id": "unknown",
        "kernel": "unknown",
        "kvm_intel_loaded": False,
        "tdx_platform": False,
        "tdx_requested": False,
        "tdx_effective": False,
        "keyids_total": 0,
        "keyids_in_use": 0,
        "module_version": None,
        "errors": [],
        "vcpus": None,
        "memory_mib": None,
    }


def test_unreadable_files_give_defaults_not_a_crash(tmp_path: Path) -> None:
    # A directory where a file is expected cannot be read as text: the same as missing.
    for rel in ("proc/cpuinfo", "proc/cmdline", "sys/fs/cgroup/misc.capacity", "proc/meminfo"):
        (tmp_path / rel).mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/random").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/random/boot_id").write_bytes(b"\xff\xfe not a boot id\n")
    facts = p.probe(tmp_path, str(tmp_path / "no-such-log"))
    assert (facts.boot_id, facts.tdx_platform, facts.tdx_requested, facts.keyids_total, facts.memory_mib) == (
        "unknown", False, False, 0, None,
    )


def test_tdx_effective_needs_the_module_loaded(tmp_path: Path) -> None:
    # A parameters file without the module directory cannot be; only "Y" counts as effective.
    (tmp_path / "sys/module/kvm_intel/parameters").mkdir(parents=True)
    (tmp_path / "sys/module/kvm_intel/parameters/tdx").write_text("y\n")
    assert p.probe(tmp_path, os.devnull).tdx_effective is False
    (tmp_path / "sys/module/kvm_intel/parameters/tdx").write_text("Y\n")
    assert p.probe(tmp_path, os.devnull).tdx_effective is True


def test_probe_of_another_root_never_reads_this_machines_log(tmp_path: Path) -> None:
    # The default log is <root>/dev/kmsg; without it there are no errors (no dmesg of the real host).
    assert p.probe(tmp_path).errors == ()
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/kmsg").write_text("3,1,1,-;virt/tdx: module initialization failed (-5)\n")
    assert p.probe(tmp_path).errors == ("virt/tdx: module initialization failed (-5)",)


def test_probe_rejects_a_root_that_is_not_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--root", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--root" in err


# --- pure parsers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, True), ("1", True), ("y", True), ("Y", True), ("on", True), ("true", True), ("yes", True),
        ("0", False), ("n", False), ("N", False), ("off", False), ("false", False),
        ("", None), ("2", None), ("o", None), ("maybe", None),
    ],
)
def test_kstrtobool(value: str | None, expected: bool | None) -> None:
    assert p.kstrtobool(value) is expected


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        ("ro quiet", None),
        ("ro kvm_intel.tdx=1", True),
        ("ro kvm_intel.tdx=Y", True),
        ("ro kvm_intel.tdx=on", True),
        ("ro kvm_intel.tdx=true", True),
        ("ro kvm_intel.tdx", True),  # a bare bool parameter is true
        ("ro kvm-intel.tdx=1", True),  # '-' and '_' are the same in module names
        ("ro kvm_intel.tdx=0", False),
        ("kvm_intel.tdx=1 kvm_intel.tdx=0", False),  # the last one wins
        ("kvm_intel.tdx=0 kvm_intel.tdx=1", True),
        ("kvm_intel.tdx=1 kvm_intel.tdx=bogus", True),  # an invalid value is ignored
        ("kvm.tdx=1 kvm_intel.tdxx=1 tdx=1", None),  # other modules and parameters
        ('ro "kvm_intel.tdx=1" quiet', True),
        ('acpi_osi="Windows 2020" kvm_intel.tdx=1', True),
        ("ro -- kvm_intel.tdx=1", None),  # after "--": arguments for init
        ("kvm_intel.nested=1 kvm_intel.tdx=y\n", True),
    ],
)
def test_cmdline_param(cmdline: str, expected: bool | None) -> None:
    assert p.cmdline_param(cmdline) is expected


def test_cmdline_tokens_follow_the_kernels_quoting() -> None:
    assert p.cmdline_tokens('a b="c d" "e f" g') == ["a", "b=c d", "e f", "g"]


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        ([], None),
        (["options kvm_intel tdx=1\n"], True),
        (["options kvm_intel nested=1 tdx=1 enable_apicv=1\n"], True),  # several options per line
        (["options kvm-intel tdx=Y\n"], True),
        (["# options kvm_intel tdx=1\n"], None),  # a comment
        (["   # options kvm_intel tdx=1\n"], None),
        (["options kvm_intel tdx=1\noptions kvm_intel tdx=0\n"], False),  # the last one wins
        (["options kvm_intel tdx=0\n", "options kvm_intel tdx=1\n"], True),  # across files, in order
        (["options kvm_intel tdx=1 tdx=0\n"], False),
        (["options kvm tdx=1\noptions kvm_intel_foo tdx=1\n"], None),  # other modules
        (["options kvm_intel nested=1 \\\n  tdx=1\n"], True),  # a continued line
        (["blacklist kvm_intel\ninstall kvm_intel tdx=1\n"], None),
        # As modprobe does: only whole lines are comments; a "#" among options is handed to the kernel,
        # which ignores it as an unknown parameter and applies the rest.
        (["options kvm_intel nested=1 # tdx=1\n"], True),
        (["options kvm_intel tdx=on # opt in to TDX\n"], True),
    ],
)
def test_modprobe_param(texts: list[str], expected: bool | None) -> None:
    assert p.modprobe_param(texts) is expected


def test_kernel_command_line_wins_over_modprobe_d() -> None:
    assert p.tdx_requested("ro kvm_intel.tdx=0", ["options kvm_intel tdx=1\n"]) is False
    assert p.tdx_requested("ro", ["options kvm_intel tdx=1\n"]) is True
    assert p.tdx_requested("ro kvm_intel.tdx=1", ["options kvm_intel tdx=0\n"]) is True
    assert p.tdx_requested("ro", []) is False


def test_modprobe_d_files_are_read_in_name_order_and_etc_shadows_lib(tmp_path: Path) -> None:
    (tmp_path / "etc/modprobe.d").mkdir(parents=True)
    (tmp_path / "lib/modprobe.d").mkdir(parents=True)
    (tmp_path / "etc/modprobe.d/20-b.conf").write_text("options kvm_intel tdx=1\n")
    (tmp_path / "lib/modprobe.d/10-a.conf").write_text("options kvm_intel tdx=0\n")
    (tmp_path / "lib/modprobe.d/20-b.conf").write_text("options kvm_intel tdx=0\n")  # shadowed
    (tmp_path / "etc/modprobe.d/30-c.txt").write_text("options kvm_intel tdx=0\n")  # not a .conf
    assert p.modprobe_param(p.modprobe_texts(tmp_path)) is True


def test_cpu_flags() -> None:
    info = "processor\t: 0\nflags\t\t: fpu vmx tdx_host_platform\n\nprocessor\t: 1\nflags\t\t: fpu vmx\n"
    assert "tdx_host_platform" in p.cpu_flags(info)
    assert p.cpu_flags("processor : 0\nvmx flags : ept tdx_host_platform\n") == set()
    assert p.cpu_flags("") == set()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("tdx 63\n", 63), ("sev 10\ntdx 15\nsev_es 2\n", 15), ("sev 10\n", 0), ("", 0), ("tdx max\n", 0)],
)
def test_misc_resource(text: str, expected: int) -> None:
    assert p.misc_resource(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0-7,9\n", 9), ("0\n", 1), ("0-3,6,8-9", 7), ("0-255", 256), ("", None), ("x-1", None), ("3-1", None)],
)
def test_count_cpu_list(text: str, expected: int | None) -> None:
    assert p.count_cpu_list(text) == expected


def test_memtotal_mib() -> None:
    assert p.memtotal_mib("MemTotal:       65830712 kB\nMemFree: 1 kB\n") == 64287
    assert p.memtotal_mib("MemFree:       1 kB\n") is None
    assert p.memtotal_mib("MemTotal: 512 kB\n") is None  # less than a MiB is no capacity


def test_boot_id() -> None:
    assert p.boot_id("5d21a4e3-2e27-4116-a3bb-0d0f1891bd77\n") == "5d21a4e3-2e27-4116-a3bb-0d0f1891bd77"
    assert p.boot_id(None) == "unknown"
    assert p.boot_id("not a boot id") == "unknown"


def test_tdx_on_in_sysfs_counts_as_requested_without_a_trace_in_config(tmp_path: Path) -> None:
    """`modprobe kvm_intel tdx=1` by hand leaves nothing in the command line or modprobe.d."""
    import shutil

    root = tmp_path / "root"
    shutil.copytree(FIXTURES / "ready-cmdline", root)
    cmdline = root / "proc/cmdline"
    cmdline.write_text(cmdline.read_text().replace(" kvm_intel.tdx=1", ""))
    for conf in (root / "etc/modprobe.d").glob("*.conf"):
        conf.unlink()
    facts = p.probe(root, kernel_log=root / "kmsg.log")
    assert facts.tdx_effective and facts.tdx_requested
