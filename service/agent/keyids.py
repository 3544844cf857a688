"""TDX KeyIDs: one per TD. How many this load offers, and how many are in use now.

KVM publishes its guest KeyIDs as the misc cgroup resource ``tdx`` when kvm_intel brings TDX up
(and sets it back to 0 when it unloads). The misc controller's root files are
``/sys/fs/cgroup/misc.capacity`` on cgroup v2 (``/sys/fs/cgroup/unified/`` in a hybrid layout) or
``/sys/fs/cgroup/misc/misc.capacity`` on cgroup v1; a resource is listed only while its capacity is
not zero, and a kernel without ``CGROUP_MISC`` has no such file at all. Then the count comes from
the boot's ``virt/tdx: BIOS enabled: private KeyID range [a, b)``: ``b - a`` TDX KeyIDs, of which
the first is the TDX module's own, so ``b - a - 1`` for TDs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from service.agent.files import read_text
from service.kernel_messages import keyid_range

MISC_DIRS = ("sys/fs/cgroup", "sys/fs/cgroup/unified", "sys/fs/cgroup/misc")
RESOURCE = "tdx"


def misc_resource(text: str, resource: str = RESOURCE) -> int:
    """The value of ``resource`` in a misc cgroup file (``misc.capacity``/``misc.current``); 0 if absent."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == resource and parts[1].isdigit():
            return int(parts[1])
    return 0


def misc_file(root: Path, name: str) -> str | None:
    """The first misc cgroup root file ``name`` found (v2, v2 hybrid, v1); None without a misc controller."""
    for directory in MISC_DIRS:
        text = read_text(root, f"{directory}/{name}")
        if text is not None:
            return text
    return None


def keyids_from_log(lines: Iterable[str]) -> int | None:
    """Guest KeyIDs from the boot's last ``private KeyID range [a, b)`` line: ``b - a - 1``."""
    found: int | None = None
    for line in lines:
        span = keyid_range(line)
        if span is not None:
            found = span[1] - span[0] - 1
    return found


def keyids_total(root: Path, tdx_effective: bool, log_lines: Iterable[str]) -> int:
    capacity = misc_file(root, "misc.capacity")
    if capacity is not None:
        return misc_resource(capacity)
    if tdx_effective:
        return max(keyids_from_log(log_lines) or 0, 0)
    return 0


def keyids_in_use(root: Path) -> int | None:
    """``tdx`` in misc.current (TDs started by anyone, leaked KeyIDs too); None without a misc controller."""
    current = misc_file(root, "misc.current")
    return misc_resource(current) if current is not None else None
