"""The TDX module's version and health, observed at every heartbeat.

Newer kernels (the TDX module runtime-update series) expose ``/sys/devices/faux/tdx_host/version``
(``1.5.06``). Its driver may load after boot, and a runtime update changes the version under the
same kvm_intel load, so the version is an observation, never part of a load's identity. After a
failed runtime update the TDX module is gone (its TDs with it) and reading the file fails
(``-ENXIO``): the module is then reported unhealthy. Kernels 6.16-7.0 expose no version at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VERSION = "sys/devices/faux/tdx_host/version"


@dataclass(frozen=True, slots=True)
class ModuleVersion:
    version: str | None
    # False when the version file is there but cannot be read; None when there is no such file.
    healthy: bool | None


def read_module_version(root: Path) -> ModuleVersion:
    try:
        text = (root / VERSION).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ModuleVersion(None, None)
    except (OSError, ValueError):
        return ModuleVersion(None, False)
    version = text.strip()[:64]
    return ModuleVersion(version or None, True if version else None)
