"""The kvm_intel module as the kernel shows it now: loaded or not, which instance, its tdx parameter.

A load of kvm_intel is identified by the boot plus the instance of its sysfs directory
``/sys/module/kvm_intel`` (the directory's inode: kernfs numbers inodes from a 64-bit counter,
so an unload and a reload give another number). Nothing else identifies a load: not the kernel
command line or modprobe.d (intent for the next load), not the TDX module version.

``/sys/module/kvm_intel/parameters/tdx`` (bool, 0444) reads ``Y`` when TDX is on for this load,
``N`` when it is off, and is absent when the kernel has no KVM TDX at all (< 6.16 or
``KVM_INTEL_TDX=n``). While the module is still initializing (``initstate`` ``coming``) the
parameter may still read ``Y`` before KVM's TDX bring-up turns it off, so a load is only looked at
once ``live``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from service.agent.files import read_text

MODULE_DIR = "sys/module/kvm_intel"
TDX_PARAM = f"{MODULE_DIR}/parameters/tdx"


class Phase(StrEnum):
    ABSENT = "absent"
    LOADING = "coming"
    UNLOADING = "going"
    LIVE = "live"


@dataclass(frozen=True, slots=True)
class KvmIntel:
    phase: Phase
    instance: str | None  # "<st_dev>:<st_ino>" of the sysfs directory; None when absent
    # The tdx parameter: "Y", "N", or None when the parameter does not exist.
    tdx: str | None

    @property
    def live(self) -> bool:
        return self.phase is Phase.LIVE

    @property
    def kvm_tdx(self) -> bool | None:
        """Whether this kernel's kvm_intel has KVM TDX (the tdx parameter exists); None when not loaded."""
        return (self.tdx is not None) if self.live else None

    @property
    def tdx_effective(self) -> bool:
        return self.live and self.tdx == "Y"


def _tdx_param(root: Path) -> str | None:
    try:
        value = (root / TDX_PARAM).read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "N"  # there but unreadable: not known to be on
    return "Y" if value == "Y" else "N"


def look(root: Path) -> KvmIntel:
    directory = root / MODULE_DIR
    try:
        st = directory.stat()
    except OSError:
        return KvmIntel(Phase.ABSENT, None, None)
    if not directory.is_dir():
        return KvmIntel(Phase.ABSENT, None, None)
    # Built-in modules have no initstate: always live.
    state = (read_text(root, f"{MODULE_DIR}/initstate") or "live").strip() or "live"
    phase = {p.value: p for p in Phase}.get(state, Phase.LIVE)
    return KvmIntel(phase, f"{st.st_dev}:{st.st_ino}", _tdx_param(root))
