"""``tdx-agent probe``: everything the agent would report about this host now.

``{"load": <the load-report body, as if this load were first seen now>, "heartbeat": <the
observations a heartbeat carries>, "kvm_intel": "live"|"coming"|"going"|"absent"}``. The load
part can be posted as it is (``jq .load``).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from service.agent.attestation import DEFAULT_QGS_SOCKET
from service.agent.identity import boot_id_refusal, look
from service.agent.kernel_log import KernelLog, read_kernel_log
from service.agent.load_facts import read_load_facts
from service.agent.observations import observe
from service.agent.opt_in import tdx_configured
from service.agent.vmm import VmmProbe


class ProbeError(Exception):
    """The host cannot be reported (its boot id is unreadable)."""


def default_kernel_log(root: Path) -> str:
    return str(root / "dev/kmsg")


def read_log(root: Path, kernel_log: str | None) -> KernelLog:
    """``kernel_log`` (default ``<root>/dev/kmsg``); when probing ``/`` and that cannot be opened,
    ``dmesg`` is asked instead (never for another root: its log would be this machine's)."""
    return read_kernel_log(kernel_log or default_kernel_log(root), dmesg_fallback=root.resolve() == Path("/"))


def probe(
    root: Path, kernel_log: str | None = None, qgs_socket: str | None = DEFAULT_QGS_SOCKET,
    vmm: VmmProbe | None = None,
) -> dict[str, Any]:
    now = look(root)
    if now.boot_id is None:
        raise ProbeError(boot_id_refusal(root))
    facts = read_load_facts(root, now.boot_id, now.kvm, read_log(root, kernel_log), None, tdx_configured(root))
    return {
        "load": facts.report(str(uuid.uuid4())),
        "heartbeat": observe(root, qgs_socket, vmm).heartbeat_fields(),
        "kvm_intel": now.kvm.phase.value,
    }
