"""The VMM's TDX support: can this host's userspace build a TD?

Two sources, the first that answers wins:

- libvirt's domain capabilities (``virsh --readonly domcapabilities``, or a file the operator points
  the agent at): TDX is there when ``<launchSecurity supported='yes'>`` lists ``<value>tdx</value>``
  in its ``sectype`` enum. This is what libvirt would launch the TD with.
- QEMU itself: ``-object help`` lists ``tdx-guest`` when the binary can build TDs (upstream QEMU
  10.1 and later, where ``tdx-guest`` was merged, and distribution builds with TDX backported);
  when that list cannot be read, the version (``QEMU emulator version 10.1.0``) decides.

``supported`` / ``unsupported`` / ``unknown`` (neither answered: no QEMU or virsh found, a command
that failed or timed out). Commands run with a timeout and are found under the agent's ``--root``
(on a host, ``/``), so that a fixture tree never reports the QEMU of the machine running the tests.
The answer is kept for ``RECHECK_S`` and read again earlier when the QEMU binary or the
capabilities file changes (a package update).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

VmmTdx = Literal["supported", "unsupported", "unknown"]
SUPPORTED: VmmTdx = "supported"
UNSUPPORTED: VmmTdx = "unsupported"
UNKNOWN: VmmTdx = "unknown"
QEMU_MIN_TDX = (10, 1)
QEMU_NAMES = ("usr/bin/qemu-system-x86_64", "usr/local/bin/qemu-system-x86_64", "usr/libexec/qemu-kvm",
              "usr/bin/qemu-kvm")
VIRSH_NAMES = ("usr/bin/virsh", "usr/local/bin/virsh")
COMMAND_TIMEOUT_S = 10.0
RECHECK_S = 300.0
AUTO = "auto"
_QEMU_VERSION = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True, slots=True)
class VmmSupport:
    tdx: VmmTdx
    detail: str


def _run(argv: list[str], timeout_s: float) -> str | None:
    """The command's stdout, or None when it cannot run, fails or times out (never an exception)."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, check=False, stdin=subprocess.DEVNULL,
            env={**os.environ, "LC_ALL": "C"},
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout if done.returncode == 0 else None


def libvirt_tdx(domcaps_xml: str) -> bool | None:
    """Whether libvirt's domain capabilities offer TDX launch security; None when it is not such XML."""
    try:
        caps = ET.fromstring(domcaps_xml)
    except ET.ParseError:
        return None
    if caps.tag != "domainCapabilities":
        return None
    launch = caps.find(".//launchSecurity")
    if launch is None or launch.get("supported") != "yes":
        return False
    values = {(v.text or "").strip() for v in launch.findall("enum[@name='sectype']/value")}
    return "tdx" in values


def qemu_version(version_text: str) -> tuple[int, int, int] | None:
    m = _QEMU_VERSION.search(version_text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def _found(root: Path, configured: str | None, names: tuple[str, ...]) -> Path | None:
    if configured is None or configured == "":
        return None
    if configured != AUTO:
        return root / configured.lstrip("/")
    for name in names:
        path = root / name
        if os.access(path, os.X_OK) and path.is_file():
            return path
    return None


def _stat_key(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class VmmProbe:
    """Reads the VMM's TDX support, kept for ``recheck_s`` (commands are not run every heartbeat)."""

    def __init__(
        self, root: Path, qemu: str | None = AUTO, virsh: str | None = AUTO, domcapabilities: str | None = None,
        *, timeout_s: float = COMMAND_TIMEOUT_S, recheck_s: float = RECHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.qemu = qemu
        self.virsh = virsh
        self.domcapabilities = domcapabilities
        self.timeout_s = timeout_s
        self.recheck_s = recheck_s
        self._clock = clock
        self._cached: VmmSupport | None = None
        self._cached_at = 0.0
        self._cached_key: object = None

    def _key(self) -> object:
        caps = self.root / self.domcapabilities.lstrip("/") if self.domcapabilities else None
        return (_stat_key(_found(self.root, self.qemu, QEMU_NAMES)), _stat_key(caps))

    def observe(self) -> VmmSupport:
        key = self._key()
        now = self._clock()
        if self._cached is not None and key == self._cached_key and now - self._cached_at < self.recheck_s:
            return self._cached
        self._cached = self.read()
        self._cached_at = now
        self._cached_key = key
        return self._cached

    def read(self) -> VmmSupport:
        libvirt = self._libvirt()
        if libvirt is not None:
            return libvirt
        return self._qemu() or VmmSupport(UNKNOWN, "no QEMU or libvirt domain capabilities found")

    def _libvirt(self) -> VmmSupport | None:
        if self.domcapabilities:
            try:
                text: str | None = (self.root / self.domcapabilities.lstrip("/")).read_text(encoding="utf-8")
            except (OSError, ValueError):
                text = None
            source = f"domain capabilities {self.domcapabilities}"
        else:
            virsh = _found(self.root, self.virsh, VIRSH_NAMES)
            if virsh is None:
                return None
            text = _run([str(virsh), "--readonly", "domcapabilities"], self.timeout_s)
            source = "libvirt domain capabilities"
        tdx = libvirt_tdx(text) if text is not None else None
        if tdx is None:
            return None
        if tdx:
            return VmmSupport(SUPPORTED, f"{source} list TDX launch security")
        return VmmSupport(UNSUPPORTED, f"{source} list no TDX launch security")

    def _qemu(self) -> VmmSupport | None:
        qemu = _found(self.root, self.qemu, QEMU_NAMES)
        if qemu is None:
            return None
        version_text = _run([str(qemu), "--version"], self.timeout_s)
        version = qemu_version(version_text) if version_text is not None else None
        name = "QEMU " + ".".join(str(n) for n in version) if version else f"QEMU at {qemu}"
        objects = _run([str(qemu), "-object", "help"], self.timeout_s)
        if objects is not None and "List of user creatable objects" in objects:
            if re.search(r"^\s*tdx-guest\s*$", objects, re.MULTILINE):
                return VmmSupport(SUPPORTED, f"{name} has the tdx-guest object")
            return VmmSupport(UNSUPPORTED, f"{name} has no tdx-guest object (TDX needs QEMU 10.1+)")
        if version is None:
            return None
        if version[:2] >= QEMU_MIN_TDX:
            return VmmSupport(SUPPORTED, f"{name} (TDX since QEMU 10.1)")
        return VmmSupport(UNSUPPORTED, f"{name} (TDX needs QEMU 10.1+)")
