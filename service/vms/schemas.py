"""VM request and response bodies (API.md, VMs and scheduling insight)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, model_validator

from service.scheduler.filters import REASON_CODES
from service.schemas import TEXT_PATTERN, Flag, IntegralFloat, Labels, MiB, Name, StrictModel
from service.vms.lifecycle import VmStatus

REASONS_DESCRIPTION = "hosts that could not take the VM, counted per stable reason code: " + ", ".join(REASON_CODES)

Priority = Annotated[StrictInt, Field(ge=-1_000_000, le=1_000_000), IntegralFloat]


class VmCreate(StrictModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "web-1", "vcpus": 2, "memory_mib": 4096, "tdx": True, "selector": {"zone": "a"}}]
        },
    )

    name: Name
    vcpus: Annotated[StrictInt, Field(ge=1, le=4096), IntegralFloat]
    memory_mib: MiB
    tdx: Flag
    project: Name | None = None
    selector: Labels = Field(default_factory=dict)
    anti_affinity_group: Name | None = None
    priority: Priority = 0
    schedule_timeout_s: Annotated[StrictInt, Field(ge=1, le=30 * 86400), IntegralFloat] | None = None
    # Only on hosts whose quote generation service answers; a TD only (tdx: true).
    attestation: Flag = False

    @model_validator(mode="after")
    def _attestation_needs_tdx(self) -> VmCreate:
        if self.attestation and not self.tdx:
            raise ValueError("attestation: true needs tdx: true (only a trust domain attests)")
        return self


class VmStatusReport(StrictModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"status": "running"}]})

    status: Literal["running", "failed", "deleted"]
    detail: Annotated[str, StringConstraints(max_length=2000, pattern=TEXT_PATTERN)] | None = None


class VmOut(BaseModel):
    id: uuid.UUID
    name: str
    project: str
    vcpus: int
    memory_mib: int
    tdx: bool
    attestation: bool
    # The per-TD memory overhead charged to its host at placement (0 for other VMs, or while pending).
    memory_overhead_mib: int
    selector: dict[str, str]
    anti_affinity_group: str | None
    priority: int
    status: VmStatus
    status_detail: str | None
    host: str | None
    explanation: str | None
    reasons: dict[str, int] = Field(description=REASONS_DESCRIPTION)
    deadline: datetime
    generation: int
    created_at: datetime
    updated_at: datetime


class CandidateOut(BaseModel):
    host: str
    score: float


class PreviewOut(BaseModel):
    host: str | None
    explanation: str
    reasons: dict[str, int] = Field(description=REASONS_DESCRIPTION)
    candidates: list[CandidateOut]
    hosts_considered: int
    hosts_fit: int


class StateCapacity(BaseModel):
    hosts: int
    hosts_alive: int
    vcpus_free: float
    memory_mib_free: int
    keyids_total: int
    keyids_used: int
    keyids_free: int
    keyids_stranded: int
    # Memory the TDX module's PAMT takes on these hosts (never schedulable).
    pamt_mib: int
    # TDs placed and not yet running.
    tds_building: int


class FitOut(BaseModel):
    vcpus: int
    memory_mib: int
    tdx: bool
    # memory_mib plus the per-TD overhead for a TD: what a placement takes from its host.
    memory_mib_charged: int
    fits_now: int


class CapacityOut(BaseModel):
    by_tdx_state: dict[str, StateCapacity]
    totals: StateCapacity
    fit: FitOut | None
    # The policy's per-TD memory overhead and TD build limit, as fits_now applies them.
    td_memory_overhead_mib: int
    max_td_builds_per_host: int
