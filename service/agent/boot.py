"""Which boot the host is in, and its kernel.

The boot id is half of a load's identity: without it a reboot cannot be told from a kvm_intel
reload, so the agent reports nothing when it cannot read it.
"""

from __future__ import annotations

import re
from pathlib import Path

from service.agent.files import read_text

BOOT_ID = "proc/sys/kernel/random/boot_id"
OSRELEASE = "proc/sys/kernel/osrelease"
UNKNOWN_KERNEL = "unknown"
_BOOT_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")


def parse_boot_id(text: str | None) -> str | None:
    value = (text or "").strip()
    return value if _BOOT_ID.match(value) else None


def boot_id(root: Path) -> str | None:
    """``/proc/sys/kernel/random/boot_id``; ``None`` when unreadable or not a boot id."""
    return parse_boot_id(read_text(root, BOOT_ID))


def kernel_release(root: Path) -> str:
    return (read_text(root, OSRELEASE) or "").strip()[:255] or UNKNOWN_KERNEL
