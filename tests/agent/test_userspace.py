"""The agent's userspace observations on fixture trees: the quote generation service (a real Unix
socket server, or none), the VMM's TDX support (fake qemu and virsh executables in the tree, a
libvirt domain capabilities file), and the PAMT the boot's kernel log reports."""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.agent.attestation import DEFAULT_QGS_SOCKET, qgs_answers
from service.agent.main import main
from service.agent.vmm import VmmProbe, libvirt_tdx, qemu_version
from tests.agent.conftest import Admin

DOMCAPS_TDX = """<domainCapabilities>
  <path>/usr/bin/qemu-system-x86_64</path>
  <domain>kvm</domain>
  <features>
    <sev supported='no'/>
    <launchSecurity supported='yes'>
      <enum name='sectype'>
        <value>tdx</value>
      </enum>
    </launchSecurity>
  </features>
</domainCapabilities>
"""
DOMCAPS_NO_TDX = DOMCAPS_TDX.replace("<value>tdx</value>", "<value>sev</value>")
DOMCAPS_OLD = """<domainCapabilities><features><sev supported='no'/></features></domainCapabilities>"""


def _executable(path: Path, script: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_qemu(root: Path, version: str, tdx_guest: bool | None, log: Path | None = None) -> Path:
    """A qemu-system-x86_64 that answers --version and -object help like QEMU (None: -object fails)."""
    objects = "List of user creatable objects:\n  authz-list\n  memory-backend-memfd\n  sev-guest\n"
    if tdx_guest:
        objects += "  tdx-guest\n"
    object_branch = f"printf '{objects}'; exit 0" if tdx_guest is not None else "echo unknown option >&2; exit 1"
    record = f'echo "$@" >> {log}\n' if log else ""
    return _executable(
        root / "usr/bin/qemu-system-x86_64",
        record + f'case "$1" in\n  --version) echo "QEMU emulator version {version}"; '
        'echo "Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers"; exit 0;;\n'
        f"  -object) {object_branch};;\nesac\nexit 1\n",
    )


@pytest.fixture
def qgs(tmp_path: Path) -> Iterator[Path]:
    """A host root whose quote generation service listens on the default socket (a long path)."""
    root = tmp_path / ("host-root-with-a-long-name-" + "x" * 60)
    path = root / DEFAULT_QGS_SOCKET.lstrip("/")
    path.parent.mkdir(parents=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    here = os.getcwd()
    os.chdir(path.parent)  # bind by its short name: the full path is longer than sun_path
    try:
        server.bind(path.name)
    finally:
        os.chdir(here)
    server.listen(8)
    try:
        yield root
    finally:
        server.close()


def test_the_qgs_answers_when_something_accepts_on_its_socket(qgs: Path) -> None:
    assert len(str(qgs / DEFAULT_QGS_SOCKET.lstrip("/"))) > 108
    assert qgs_answers(qgs, DEFAULT_QGS_SOCKET) is True
    assert qgs_answers(qgs, None) is None  # not checked


def test_the_qgs_does_not_answer_without_a_socket_or_a_listener(tmp_path: Path) -> None:
    assert qgs_answers(tmp_path, DEFAULT_QGS_SOCKET) is False
    path = tmp_path / "run/qgs.socket"
    path.parent.mkdir(parents=True)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # bound, never listening: connections are refused
    try:
        assert qgs_answers(tmp_path, "/run/qgs.socket") is False
    finally:
        dead.close()
    (tmp_path / "run/file").write_text("not a socket")
    assert qgs_answers(tmp_path, "/run/file") is False


def test_qemu_with_the_tdx_guest_object_can_build_tds(tmp_path: Path) -> None:
    fake_qemu(tmp_path, "10.1.0", tdx_guest=True)
    seen = VmmProbe(tmp_path).read()
    assert (seen.tdx, seen.detail) == ("supported", "QEMU 10.1.0 has the tdx-guest object")


def test_a_distribution_qemu_with_tdx_backported_counts_by_its_objects_not_its_version(tmp_path: Path) -> None:
    fake_qemu(tmp_path, "9.2.1 (Debian 1:9.2.1+ds-1ubuntu5+tdx2.0)", tdx_guest=True)
    assert VmmProbe(tmp_path).read().tdx == "supported"
    fake_qemu(tmp_path, "9.2.0", tdx_guest=False)
    seen = VmmProbe(tmp_path).read()
    assert (seen.tdx, seen.detail) == ("unsupported", "QEMU 9.2.0 has no tdx-guest object (TDX needs QEMU 10.1+)")


def test_the_qemu_version_decides_when_its_objects_cannot_be_listed(tmp_path: Path) -> None:
    fake_qemu(tmp_path, "10.0.3", tdx_guest=None)
    seen = VmmProbe(tmp_path).read()
    assert (seen.tdx, seen.detail) == ("unsupported", "QEMU 10.0.3 (TDX needs QEMU 10.1+)")
    fake_qemu(tmp_path, "10.2.0", tdx_guest=None)
    assert VmmProbe(tmp_path).read().tdx == "supported"
    assert qemu_version("QEMU emulator version 10.1.50 (v10.1.0-123-gabc)") == (10, 1, 50)


def test_libvirt_domain_capabilities_win_over_qemu(tmp_path: Path) -> None:
    fake_qemu(tmp_path, "10.1.0", tdx_guest=True)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/domcaps.xml").write_text(DOMCAPS_NO_TDX)
    seen = VmmProbe(tmp_path, domcapabilities="/etc/domcaps.xml").read()
    assert (seen.tdx, seen.detail) == (
        "unsupported", "domain capabilities /etc/domcaps.xml list no TDX launch security"
    )
    _executable(tmp_path / "usr/bin/virsh", f"cat <<'EOF'\n{DOMCAPS_TDX}EOF\n")
    seen = VmmProbe(tmp_path).read()
    assert (seen.tdx, seen.detail) == ("supported", "libvirt domain capabilities list TDX launch security")
    assert libvirt_tdx(DOMCAPS_OLD) is False
    assert libvirt_tdx("<html>not libvirt</html>") is None and libvirt_tdx("<<<") is None


def test_no_vmm_a_failing_one_or_a_hanging_one_is_unknown_and_never_blocks(tmp_path: Path) -> None:
    assert VmmProbe(tmp_path).read().tdx == "unknown"
    _executable(tmp_path / "usr/bin/qemu-system-x86_64", "exit 3\n")
    assert VmmProbe(tmp_path).read().tdx == "unknown"
    _executable(tmp_path / "usr/bin/qemu-system-x86_64", "exec sleep 30\n")
    _executable(tmp_path / "usr/bin/virsh", "exec sleep 30\n")
    started = time.monotonic()
    assert VmmProbe(tmp_path, timeout_s=0.3).read().tdx == "unknown"
    assert time.monotonic() - started < 10  # each command is cut at its timeout
    assert VmmProbe(tmp_path, qemu=None, virsh=None).read().tdx == "unknown"


def test_the_vmm_is_read_again_only_when_qemu_changes_or_the_recheck_is_due(tmp_path: Path) -> None:
    calls = tmp_path / "calls.log"
    qemu = fake_qemu(tmp_path, "9.2.0", tdx_guest=False, log=calls)
    now = [0.0]
    probe = VmmProbe(tmp_path, clock=lambda: now[0], recheck_s=300)
    assert probe.observe().tdx == "unsupported"
    assert probe.observe().tdx == "unsupported"
    assert len(calls.read_text().splitlines()) == 2  # --version and -object help, once
    fake_qemu(tmp_path, "10.1.0", tdx_guest=True, log=calls)  # a package update
    os.utime(qemu, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert probe.observe().tdx == "supported"
    now[0] = 301.0
    probe.observe()
    assert len(calls.read_text().splitlines()) == 6


def test_the_agent_reports_attestation_the_vmm_and_the_pamt(
    qgs: Path, live_server: tuple[str, str], admin: Admin, tmp_path: Path, host_copy: object
) -> None:
    import shutil

    from tests.agent.conftest import FIXTURES

    shutil.copytree(FIXTURES / "ready-7.1", qgs, dirs_exist_ok=True)
    fake_qemu(qgs, "10.1.0", tdx_guest=True)
    url, _ = live_server
    token = admin.host_with_agent("node1")
    args = ["run", "--server", url, "--token", token, "--host", "node1", "--root", str(qgs),
            "--kernel-log", str(qgs / "kmsg.log"), "--state-dir", str(tmp_path / "state"), "--once", "--settle", "0"]
    assert main(args) == 0
    tdx = admin.host("node1")["tdx"]
    assert (tdx["attestation_ready"], tdx["vmm"], tdx["vmm_detail"]) == (
        True, "supported", "QEMU 10.1.0 has the tdx-guest object"
    )
    assert tdx["pamt_mib"] == 257  # 263168 KB
    # The same host, told not to check attestation, reports null.
    assert main([*args, "--qgs-socket", "none"]) == 0
    assert admin.host("node1")["tdx"]["attestation_ready"] is None
