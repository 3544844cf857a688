"""Project and quota bodies (API.md, Projects and quotas)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from service.schemas import IntegralFloat, StrictModel

# A limit: an integer >= 0 (0 forbids the resource), or null for no limit.
Limit = Annotated[StrictInt, Field(ge=0, le=2**53), IntegralFloat] | None


class QuotaLimits(StrictModel):
    """PUT body. It replaces the whole quota: a resource left out has no limit."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"vms": 20, "vcpus": 64, "memory_mib": 262144, "tdx_vms": 8}]}
    )

    vms: Limit = None
    vcpus: Limit = None
    memory_mib: Limit = None
    tdx_vms: Limit = None


class LimitsOut(BaseModel):
    vms: int | None
    vcpus: int | None
    memory_mib: int | None
    tdx_vms: int | None


class QuotaUsageOut(BaseModel):
    """What the project's VMs not yet ended (pending, scheduled, running, deleting) take."""

    vms: int
    vcpus: int
    memory_mib: int
    tdx_vms: int


class QuotaOut(BaseModel):
    project: str
    limits: LimitsOut
    usage: QuotaUsageOut
    # Bumped by every change of the limits (the ETag; If-Match on PUT); 0 before any.
    generation: int
