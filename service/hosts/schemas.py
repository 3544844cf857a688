"""Host request and response bodies (API.md, Hosts)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StringConstraints, model_validator
from pydantic.json_schema import SkipJsonSchema

from service.hosts.readiness import KernelLog, TdxState
from service.schemas import (
    LINE_PATTERN,
    MAX_CPU_RATIO,
    MIN_CPU_RATIO,
    TEXT_PATTERN,
    Count,
    Flag,
    IntegralFloat,
    Labels,
    MiB,
    Name,
    PositiveCount,
    StrictModel,
)

# Strict: a JSON number (4 or 4.0), never the string "4"; within MIN_CPU_RATIO..MAX_CPU_RATIO.
Ratio = Annotated[
    StrictFloat,
    Field(
        ge=MIN_CPU_RATIO,
        le=MAX_CPU_RATIO,
        description="vCPU over-commit: the host offers (vcpus - reserved_vcpus) x this many vCPUs; "
        f"a JSON number from {MIN_CPU_RATIO} to {MAX_CPU_RATIO:g} (a new host without one: TDX_CPU_ALLOCATION_RATIO)",
    ),
]


HOST_EXAMPLE: dict[str, Any] = {"name": "node-1", "vcpus": 64, "memory_mib": 262144, "labels": {"zone": "a"}}


class HostCreate(StrictModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [HOST_EXAMPLE]})

    name: Name
    vcpus: PositiveCount
    memory_mib: MiB
    labels: Labels = Field(default_factory=dict)
    reserved_vcpus: Count = 0
    reserved_memory_mib: Count = 0
    cpu_allocation_ratio: Ratio | None = None

    @model_validator(mode="after")
    def _reserved_within_capacity(self) -> HostCreate:
        if self.reserved_vcpus > self.vcpus:
            raise ValueError("reserved_vcpus exceeds vcpus")
        if self.reserved_memory_mib > self.memory_mib:
            raise ValueError("reserved_memory_mib exceeds memory_mib")
        return self


def _no_null_defaults(schema: dict[str, Any]) -> None:
    for prop in schema.get("properties", {}).values():
        if "default" in prop and prop["default"] is None:
            del prop["default"]
    schema["examples"] = [{"labels": {"zone": "b"}, "schedulable": False}]


class HostPatch(StrictModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_no_null_defaults)

    # Each field may be omitted but not null (the validator below); SkipJsonSchema keeps null out
    # of the published schema, which says the same.
    labels: Labels | SkipJsonSchema[None] = None
    schedulable: Flag | SkipJsonSchema[None] = None
    draining: Flag | SkipJsonSchema[None] = None
    reserved_vcpus: Count | SkipJsonSchema[None] = None
    reserved_memory_mib: Count | SkipJsonSchema[None] = None
    cpu_allocation_ratio: Ratio | SkipJsonSchema[None] = None

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nulls = [k for k, v in data.items() if v is None]
            if nulls:
                raise ValueError(f"fields may be omitted but not null: {', '.join(nulls)}")
        return data


LogLine = Annotated[str, StringConstraints(max_length=2000, pattern=TEXT_PATTERN)]
BootId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]
ModuleVersion = Annotated[str, StringConstraints(max_length=64, pattern=LINE_PATTERN)]
VmmTdx = Literal["supported", "unsupported", "unknown"]


class LoadReport(StrictModel):
    """The facts of one kvm_intel load, read once when the agent first saw it (README, "TDX state
    derivation"). ``tdx_requested`` is whether *this* load was asked for tdx=1."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "load_id": "0b0e5f0e-6f1c-4a57-9d39-2f7f4a3c1e01",
                    "boot_id": "9e0d4b1a-5c3f-4a27-8b6e-1f2d3c4b5a69",
                    "kernel": "6.16.0-tdx",
                    "kvm_intel_loaded": True,
                    "tdx_platform": True,
                    "tdx_requested": True,
                    "tdx_effective": True,
                    "keyids_total": 63,
                    "module_version": "1.5.16",
                    "errors": [],
                }
            ]
        },
    )

    load_id: uuid.UUID
    boot_id: BootId
    kernel: Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=LINE_PATTERN)]
    kvm_intel_loaded: Flag
    tdx_platform: Flag
    tdx_requested: Flag
    tdx_effective: Flag
    keyids_total: Count
    module_version: ModuleVersion | None = None
    errors: Annotated[list[LogLine], Field(max_length=64)] = Field(
        default_factory=list
    )
    vcpus: PositiveCount | None = None
    memory_mib: MiB | None = None
    # /sys/module/kvm_intel/parameters/tdx exists (the kernel has KVM TDX); null: not known.
    kvm_tdx: Flag | None = None
    # How much of this boot's kernel log the agent could read; null: not said (an older agent).
    kernel_log: Literal["complete", "rotated", "unreadable"] | None = None
    # /sys/devices/system/cpu/present: a TD gets at most this many vCPUs.
    present_cpus: PositiveCount | None = None
    # "virt/tdx: N KB allocated for PAMT" of this boot; null: not in the kernel log.
    pamt_kb: Annotated[StrictInt, Field(ge=0, le=2**50), IntegralFloat] | None = None


class Heartbeat(StrictModel):
    """A heartbeat names its load and carries observations; a field left out is not observed."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"load_id": "0b0e5f0e-6f1c-4a57-9d39-2f7f4a3c1e01", "keyids_in_use": 1, "running_vms": []}]
        },
    )

    load_id: uuid.UUID
    keyids_in_use: Count | None = None
    running_vms: Annotated[list[uuid.UUID], Field(max_length=100_000)] | None = None
    module_version: ModuleVersion | None = None
    # False: the TDX module's version can no longer be read (a failed runtime update; its TDs are gone).
    module_healthy: Flag | None = None
    # What the kernel command line and modprobe.d ask for at the next kvm_intel load.
    tdx_configured: Flag | None = None
    # The quote generation service answered a connect (null: not checked).
    attestation_ready: Flag | None = None
    # The VMM's TDX support (QEMU version, libvirt domain capabilities) and what it was seen from.
    vmm_tdx: VmmTdx | None = None
    vmm_detail: Annotated[str, StringConstraints(max_length=255, pattern=LINE_PATTERN)] | None = None


class TdxOut(BaseModel):
    state: TdxState = Field(
        description="unknown until the first load report; unsupported: no TDX on the platform or kernel; "
        "disabled: kvm_intel loaded without tdx=1 (not opted in); failed: tdx=1 asked for and bring-up "
        "failed, or no KeyIDs (see reason); ready: the only state that receives TDX VMs"
    )
    reason: str | None
    reason_code: str | None
    remedy: str | None
    keyids_total: int
    keyids_used: int
    keyids_observed_in_use: int | None
    # total - max(claimed, observed in use): what placement offers.
    keyids_free: int
    module_version: str | None
    module_healthy: bool | None
    # Whether the command line / modprobe.d ask for tdx=1 at the next kvm_intel load (heartbeats).
    configured: bool | None
    # e.g. "opt-in configured: takes effect at the next kvm_intel load", while configured and the
    # current load differ.
    next_load: str | None
    # Memory the TDX module's PAMT took this boot (never schedulable), as the kernel logged it; 0
    # when the load's kernel log did not say (see the load's pamt_kb).
    pamt_mib: int
    # TDs placed here and not yet running (at most the policy's max_td_builds_per_host).
    tds_building: int
    # The quote generation service answered the latest heartbeat's check; null: not checked.
    attestation_ready: bool | None
    # The VMM's TDX support as the agent sees it, and from what.
    vmm: VmmTdx | None
    vmm_detail: str | None


class LoadRef(BaseModel):
    id: uuid.UUID
    boot_id: str
    kernel: str
    reported_at: datetime


class UsageOut(BaseModel):
    vcpus: int
    # Including each TD's overhead charged at its placement.
    memory_mib: int
    vms: int


class HostOut(BaseModel):
    id: uuid.UUID
    name: str
    labels: dict[str, str]
    vcpus: int
    memory_mib: int
    reserved_vcpus: int
    reserved_memory_mib: int
    cpu_allocation_ratio: float
    schedulable: bool
    draining: bool
    alive: bool
    last_heartbeat_at: datetime | None
    tdx: TdxOut
    load: LoadRef | None
    usage: UsageOut
    generation: int
    created_at: datetime
    updated_at: datetime


class LoadOut(BaseModel):
    id: uuid.UUID
    host: str
    boot_id: str
    kernel: str
    kvm_intel_loaded: bool
    tdx_platform: bool
    tdx_requested: bool
    tdx_effective: bool
    keyids_total: int
    module_version: str | None
    errors: list[str]
    vcpus: int | None
    memory_mib: int | None
    kvm_tdx: bool | None
    kernel_log: KernelLog | None
    present_cpus: int | None
    pamt_kb: int | None
    tdx_state: TdxState
    tdx_reason: str | None
    tdx_reason_code: str | None
    tdx_remedy: str | None
    current: bool
    reported_at: datetime


class HostRegistration(HostCreate):
    """One host of a batch, with its first kvm_intel load report when it is known already."""

    load: LoadReport | None = None


MAX_BATCH = 1000


class HostBatch(StrictModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"hosts": [HOST_EXAMPLE]}]})

    hosts: Annotated[list[HostRegistration], Field(min_length=1, max_length=MAX_BATCH)]


class RegisteredHost(BaseModel):
    id: uuid.UUID
    name: str
    tdx_state: TdxState


class HostBatchOut(BaseModel):
    created: int
    hosts: list[RegisteredHost]
