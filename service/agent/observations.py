"""What the agent observes at every heartbeat, under whatever load is current: KeyIDs in use, the
TDX module's version and health, and what the host is configured to ask for at the next kvm_intel
load. None of it identifies a load or changes one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.agent.keyids import keyids_in_use
from service.agent.module_version import read_module_version
from service.agent.opt_in import tdx_configured


@dataclass(frozen=True, slots=True)
class Observations:
    keyids_in_use: int | None
    module_version: str | None
    module_healthy: bool | None
    tdx_configured: bool

    def heartbeat_fields(self) -> dict[str, Any]:
        """The heartbeat body's observation fields (API.md), without ``load_id`` and ``running_vms``."""
        fields: dict[str, Any] = {
            "module_version": self.module_version,
            "module_healthy": self.module_healthy,
            "tdx_configured": self.tdx_configured,
        }
        if self.keyids_in_use is not None:
            fields["keyids_in_use"] = self.keyids_in_use
        return fields


def observe(root: Path) -> Observations:
    module = read_module_version(root)
    return Observations(
        keyids_in_use=keyids_in_use(root),
        module_version=module.version,
        module_healthy=module.healthy,
        tdx_configured=tdx_configured(root),
    )
