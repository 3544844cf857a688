"""What the agent observes at every heartbeat, under whatever load is current: KeyIDs in use, the
TDX module's version and health, what the host is configured to ask for at the next kvm_intel
load, whether the quote generation service answers (attestation.py) and whether the VMM can build
TDs (vmm.py). None of it identifies a load or changes one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.agent.attestation import DEFAULT_QGS_SOCKET, qgs_answers
from service.agent.keyids import keyids_in_use
from service.agent.module_version import read_module_version
from service.agent.opt_in import tdx_configured
from service.agent.vmm import VmmProbe, VmmSupport


@dataclass(frozen=True, slots=True)
class Observations:
    keyids_in_use: int | None
    module_version: str | None
    module_healthy: bool | None
    tdx_configured: bool
    attestation_ready: bool | None = None
    vmm: VmmSupport | None = None

    def heartbeat_fields(self) -> dict[str, Any]:
        """The heartbeat body's observation fields (API.md), without ``load_id`` and ``running_vms``."""
        fields: dict[str, Any] = {
            "module_version": self.module_version,
            "module_healthy": self.module_healthy,
            "tdx_configured": self.tdx_configured,
            "attestation_ready": self.attestation_ready,
        }
        if self.keyids_in_use is not None:
            fields["keyids_in_use"] = self.keyids_in_use
        if self.vmm is not None:
            fields["vmm_tdx"] = self.vmm.tdx
            fields["vmm_detail"] = self.vmm.detail[:255]
        return fields


def observe(root: Path, qgs_socket: str | None = DEFAULT_QGS_SOCKET, vmm: VmmProbe | None = None) -> Observations:
    """``qgs_socket`` None: attestation not checked; ``vmm`` None: the VMM not looked at."""
    module = read_module_version(root)
    return Observations(
        keyids_in_use=keyids_in_use(root),
        module_version=module.version,
        module_healthy=module.healthy,
        tdx_configured=tdx_configured(root),
        attestation_ready=qgs_answers(root, qgs_socket),
        vmm=vmm.observe() if vmm is not None else None,
    )
