"""A load's identity: the boot (``boot_id``) plus the kvm_intel module instance. Nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.agent import kvm_intel
from service.agent.boot import BOOT_ID, boot_id


@dataclass(frozen=True, slots=True)
class Look:
    """The host now: its boot and its kvm_intel module."""

    boot_id: str | None  # None when unreadable: then nothing may be reported
    kvm: kvm_intel.KvmIntel

    @property
    def settled(self) -> bool:
        """kvm_intel is neither half loaded nor half unloaded."""
        return self.kvm.phase in (kvm_intel.Phase.LIVE, kvm_intel.Phase.ABSENT)


def look(root: Path) -> Look:
    return Look(boot_id(root), kvm_intel.look(root))


def boot_id_refusal(root: Path) -> str:
    return (
        f"cannot read the boot id ({root / BOOT_ID}): without it a reboot cannot be told from a kvm_intel "
        "reload, so nothing is reported"
    )
