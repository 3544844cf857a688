"""Read a host's kvm_intel / TDX facts (DESIGN.md section 2) under a root directory.

Every path is read relative to ``root`` (``/`` on a real host, a fixture tree in tests). A missing or
unreadable file never raises; it gives these defaults:

=====================  ==========================================================  ==================
fact                   source (under root)                                         default
=====================  ==========================================================  ==================
boot_id                proc/sys/kernel/random/boot_id                              ``"unknown"``
kernel                 proc/sys/kernel/osrelease                                   ``"unknown"``
tdx_platform           ``tdx_host_platform`` in the ``flags`` of proc/cpuinfo       ``False``
kvm_intel_loaded       sys/module/kvm_intel/ exists                                ``False``
tdx_requested          effective (below), or ``kvm_intel.tdx=`` on proc/cmdline,     ``False``
                       else ``options kvm_intel
                       tdx=`` in etc/modprobe.d/*.conf (and the other modprobe.d
                       directories)
tdx_effective          sys/module/kvm_intel/parameters/tdx is ``Y``                 ``False``
keyids_total           line ``tdx N`` of sys/fs/cgroup/misc.capacity                ``0``
keyids_in_use          line ``tdx M`` of sys/fs/cgroup/misc.current                 ``0``
module_version         sys/devices/faux/tdx_host/version                           ``None``
errors                 TDX failure lines of the kernel log (see kernel_log.py)     ``[]``
vcpus                  ranges in sys/devices/system/cpu/online (``0-7,9`` -> 9)    ``None``
memory_mib             MemTotal (kB) of proc/meminfo // 1024                       ``None``
=====================  ==========================================================  ==================

``None`` capacity means "not known": the load report then leaves the capacity the operator
registered unchanged. Boolean module parameters follow the kernel's ``kstrtobool`` (``1``, ``y``,
``Y``, ``on``, ``true`` ... are true; a bare ``kvm_intel.tdx`` is true), the last setting wins, and
``-``/``_`` are equivalent in module and parameter names, as for the kernel and modprobe. When both
sources set ``tdx``, the kernel command line wins: modprobe appends its options after those of
modprobe.d, and the kernel keeps the last value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.agent.kernel_log import read_kernel_log, tdx_errors

UNKNOWN = "unknown"
MODULE = "kvm_intel"
PARAM = "tdx"
MODPROBE_DIRS = ("etc/modprobe.d", "run/modprobe.d", "usr/local/lib/modprobe.d", "usr/lib/modprobe.d", "lib/modprobe.d")
_BOOT_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")


@dataclass(frozen=True, slots=True)
class HostFacts:
    boot_id: str
    kernel: str
    kvm_intel_loaded: bool
    tdx_platform: bool
    tdx_requested: bool
    tdx_effective: bool
    keyids_total: int
    module_version: str | None
    errors: tuple[str, ...]
    vcpus: int | None
    memory_mib: int | None
    keyids_in_use: int

    def load_report(self, load_id: str) -> dict[str, Any]:
        """The API.md load-report body (``keyids_in_use`` belongs to heartbeats, not loads)."""
        body = self.as_json()
        body.pop("keyids_in_use")
        return {"load_id": load_id, **body}

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["errors"] = list(self.errors)
        return data


# --- pure parsers ------------------------------------------------------------------------------


def kstrtobool(value: str | None) -> bool | None:
    """The kernel's reading of a bool parameter; ``None`` for a value it would reject.

    A parameter given without ``=value`` (``value is None``) means true.
    """
    if value is None:
        return True
    if not value:
        return None
    first = value[0].lower()
    if first in "yt1":
        return True
    if first in "nf0":
        return False
    if first == "o" and len(value) > 1:
        return {"n": True, "f": False}.get(value[1].lower())
    return None


def _norm(name: str) -> str:
    return name.replace("-", "_")


def cmdline_tokens(cmdline: str) -> list[str]:
    """Kernel command line parameters split like the kernel's ``next_arg``: on blanks outside double
    quotes, quotes removed; what follows ``--`` goes to init."""
    tokens: list[str] = []
    current: list[str] = []
    quoted = started = False
    for ch in cmdline:
        if ch == '"':
            quoted, started = not quoted, True
        elif ch.isspace() and not quoted:
            if started:
                tokens.append("".join(current))
            current, started = [], False
        else:
            current.append(ch)
            started = True
    if started:
        tokens.append("".join(current))
    return tokens[: tokens.index("--")] if "--" in tokens else tokens


def _apply_param(tokens: Iterable[str], param: str, current: bool | None) -> bool | None:
    for token in tokens:
        name, sep, value = token.partition("=")
        if _norm(name) != _norm(param):
            continue
        parsed = kstrtobool(value if sep else None)
        if parsed is not None:  # the kernel refuses an invalid value and keeps the old one
            current = parsed
    return current


def cmdline_param(cmdline: str, module: str = MODULE, param: str = PARAM) -> bool | None:
    """``module.param`` on the kernel command line, last one wins; ``None`` when it is not set."""
    params: list[str] = []
    for token in cmdline_tokens(cmdline):
        name, sep, value = token.partition("=")
        mod, dot, pname = _norm(name).partition(".")
        if dot and mod == _norm(module):
            params.append(f"{pname}{sep}{value}")
    return _apply_param(params, param, None)


def modprobe_logical_lines(text: str) -> list[str]:
    """Lines of a modprobe.d file with ``\\`` continuations joined and whole-line comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            lines.append(stripped)
    if pending.strip() and not pending.strip().startswith("#"):
        lines.append(pending.strip())
    return lines


def modprobe_param(texts: Iterable[str], module: str = MODULE, param: str = PARAM) -> bool | None:
    """``options <module> ... param=...`` across modprobe.d files (in read order), last one wins.

    Like modprobe, only whole lines are comments: a ``#`` after options is handed to the kernel,
    which ignores it as an unknown parameter and still applies the options after it.
    """
    value: bool | None = None
    for text in texts:
        for line in modprobe_logical_lines(text):
            words = line.split()
            if len(words) >= 2 and words[0] == "options" and _norm(words[1]) == _norm(module):
                value = _apply_param(words[2:], param, value)
    return value


def tdx_requested(cmdline: str, modprobe_texts: Iterable[str]) -> bool:
    on_cmdline = cmdline_param(cmdline)
    if on_cmdline is not None:
        return on_cmdline
    return bool(modprobe_param(modprobe_texts))


def cpu_flags(cpuinfo: str) -> set[str]:
    """The ``flags`` of the first CPU in /proc/cpuinfo (``tdx_host_platform`` is system wide)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return set(value.split())
    return set()


def misc_resource(text: str, resource: str = "tdx") -> int:
    """The value of ``resource`` in a misc cgroup file (``misc.capacity``/``misc.current``); 0 if absent."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == resource and parts[1].isdigit():
            return int(parts[1])
    return 0


def count_cpu_list(text: str) -> int | None:
    """The number of CPUs in a kernel CPU list like ``0-7,9``; ``None`` when it is empty or garbled."""
    total = 0
    for part in text.strip().split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            return None
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            return None
        total += last - first + 1
    return total or None


def memtotal_mib(meminfo: str) -> int | None:
    for line in meminfo.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "MemTotal:" and parts[1].isdigit():
            mib = int(parts[1]) // 1024
            return mib or None
    return None


def boot_id(text: str | None) -> str:
    value = (text or "").strip()
    return value if _BOOT_ID.match(value) else UNKNOWN


# --- reading a root ------------------------------------------------------------------------------


def _read(root: Path, rel: str) -> str | None:
    try:
        return (root / rel).read_text(encoding="utf-8", errors="replace")
    except (OSError, ValueError):
        return None


def modprobe_texts(root: Path) -> list[str]:
    """modprobe.d files in modprobe's order: sorted by file name; the first directory wins a name."""
    chosen: dict[str, Path] = {}
    for directory in MODPROBE_DIRS:
        try:
            entries = list((root / directory).glob("*.conf"))
        except OSError:
            continue
        for path in entries:
            chosen.setdefault(path.name, path)
    texts = []
    for name in sorted(chosen):
        try:
            texts.append(chosen[name].read_text(encoding="utf-8", errors="replace"))
        except (OSError, ValueError):
            continue
    return texts


def kvm_intel_dir(root: Path) -> Path:
    return root / "sys/module" / MODULE


def kvm_intel_instance(root: Path) -> str | None:
    """An identity of this load of kvm_intel: the inode of its sysfs directory.

    sysfs (kernfs) numbers inodes without reusing them soon, so an unload and reload between two
    looks gives another number even when every fact is the same. ``None`` when not loaded.
    """
    try:
        st = kvm_intel_dir(root).stat()
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"


def kvm_intel_settling(root: Path) -> bool:
    """True while the module is still loading or already unloading (``initstate`` not ``live``)."""
    state = _read(root, f"sys/module/{MODULE}/initstate")
    return state is not None and state.strip() not in ("", "live")


def default_kernel_log(root: Path) -> str:
    return str(root / "dev/kmsg")


def probe(root: Path | str = "/", kernel_log: str | None = None, *, read_log: bool = True) -> HostFacts:
    """All facts of the host under ``root``.

    ``kernel_log`` defaults to ``<root>/dev/kmsg``; when probing ``/`` and that cannot be opened,
    ``dmesg`` is asked instead (never for another root: its log would be this machine's).
    ``read_log=False`` skips the kernel log (``errors`` stays empty), for cheap periodic looks.
    """
    root = Path(root)
    module = kvm_intel_dir(root)
    loaded = module.is_dir()
    effective = (_read(root, f"sys/module/{MODULE}/parameters/{PARAM}") or "").strip() == "Y"
    errors: list[str] = []
    if read_log:
        is_host_root = root.resolve() == Path("/")
        errors = tdx_errors(read_kernel_log(kernel_log or default_kernel_log(root), dmesg_fallback=is_host_root))
    version = (_read(root, "sys/devices/faux/tdx_host/version") or "").strip()
    kernel = (_read(root, "proc/sys/kernel/osrelease") or "").strip()
    return HostFacts(
        boot_id=boot_id(_read(root, "proc/sys/kernel/random/boot_id")),
        kernel=kernel[:255] or UNKNOWN,
        kvm_intel_loaded=loaded,
        tdx_platform="tdx_host_platform" in cpu_flags(_read(root, "proc/cpuinfo") or ""),
        # tdx=Y in sysfs proves it was asked for, even by a bare `modprobe kvm_intel tdx=1`
        # that left no trace in the command line or modprobe.d.
        tdx_requested=(loaded and effective)
        or tdx_requested(_read(root, "proc/cmdline") or "", modprobe_texts(root)),
        tdx_effective=loaded and effective,
        keyids_total=misc_resource(_read(root, "sys/fs/cgroup/misc.capacity") or ""),
        keyids_in_use=misc_resource(_read(root, "sys/fs/cgroup/misc.current") or ""),
        module_version=version[:64] or None,
        vcpus=count_cpu_list(_read(root, "sys/devices/system/cpu/online") or ""),
        memory_mib=memtotal_mib(_read(root, "proc/meminfo") or ""),
        errors=tuple(errors),
    )
