"""The facts of one kvm_intel load, read once when the agent first sees the load and then frozen:
they are the load report, replayed as stored for as long as the load lasts.

``tdx_requested`` says whether *this* load was asked for ``tdx=1``: true when the module reports
``tdx=Y``; else true when this load's kernel-log records show KVM's TDX bring-up (KVM prints its
refusals only when asked for TDX); else, with a complete log and no way for the kernel to have
refused silently, false; otherwise (log unreadable or rotated, kvm_intel not loaded) what the kernel
command line and modprobe.d asked for when the agent first saw the load. A later edit of those files
is intent for the next load and never changes this one (see opt_in.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.agent import capacity
from service.agent.boot import kernel_release
from service.agent.kernel_log import (
    COMPLETE,
    KernelLog,
    Position,
    silent_refusal_possible,
    tdx_bringup_seen,
    tdx_errors,
)
from service.agent.keyids import keyids_total
from service.agent.kvm_intel import KvmIntel
from service.agent.module_version import read_module_version
from service.agent.pamt import pamt_kb_of_boot
from service.agent.platform import tdx_host_platform


@dataclass(frozen=True, slots=True)
class LoadFacts:
    boot_id: str
    kernel: str
    kvm_intel_loaded: bool
    kvm_tdx: bool | None
    tdx_platform: bool
    tdx_requested: bool
    tdx_effective: bool
    keyids_total: int
    module_version: str | None
    errors: tuple[str, ...]
    kernel_log: str
    vcpus: int | None
    present_cpus: int | None
    memory_mib: int | None
    pamt_kb: int | None = None

    def report(self, load_id: str) -> dict[str, Any]:
        """The load-report body (API.md)."""
        body = asdict(self)
        body["errors"] = list(self.errors)
        return {"load_id": load_id, **body}


def requested(kvm: KvmIntel, log: KernelLog, since: Position | None, configured: bool) -> bool:
    if kvm.tdx_effective:
        return True
    if not kvm.live:
        return configured
    if tdx_bringup_seen(log, since):
        return True
    if log.status == COMPLETE and not silent_refusal_possible(log):
        return False
    return configured


def read_load_facts(
    root: Path, boot_id: str, kvm: KvmIntel, log: KernelLog, since: Position | None, configured: bool
) -> LoadFacts:
    """The facts of the load ``kvm`` on boot ``boot_id``; ``since`` is where the previous load the
    agent recorded on this boot ended in the kernel log (None: the whole boot's log counts)."""
    return LoadFacts(
        boot_id=boot_id,
        kernel=kernel_release(root),
        kvm_intel_loaded=kvm.live,
        kvm_tdx=kvm.kvm_tdx,
        tdx_platform=tdx_host_platform(root),
        tdx_requested=requested(kvm, log, since, configured),
        tdx_effective=kvm.tdx_effective,
        keyids_total=keyids_total(root, kvm.tdx_effective, log.texts()),
        module_version=read_module_version(root).version,
        errors=tuple(tdx_errors(log, since)),
        kernel_log=log.status,
        vcpus=capacity.online_cpus(root),
        present_cpus=capacity.present_cpus(root),
        memory_mib=capacity.memory_mib(root),
        pamt_kb=pamt_kb_of_boot(log.texts()),
    )
