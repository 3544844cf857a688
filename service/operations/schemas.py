"""Operation bodies (API.md, Fleet policy and operations): the guided TDX opt-in of a host."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from service.schemas import IntegralFloat, StrictModel


class OperationStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class Step(StrEnum):
    """The opt-in's steps, in order."""

    CORDON = "cordon"
    WAIT_FOR_EMPTY = "wait_for_empty"  # no active VM left on the host (TDs cannot live-migrate)
    WAIT_FOR_LOAD = "wait_for_load"  # a kvm_intel load newer than the one the operation started under
    VERIFY = "verify"  # the new load is TDX-ready, or the reason it is not
    UNCORDON = "uncordon"


class OptInStart(StrictModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"timeout_s": 3600}]})

    # How long the operation may wait (for the host to empty, then for a new load) before it fails.
    timeout_s: Annotated[StrictInt, Field(ge=60, le=30 * 86400), IntegralFloat] | None = None


class BlockingVm(BaseModel):
    id: uuid.UUID
    name: str
    project: str
    status: str


class HistoryEntry(BaseModel):
    at: datetime
    step: Step
    message: str


class OperationOut(BaseModel):
    id: uuid.UUID
    kind: str
    host: str
    status: OperationStatus
    # The step under way (running) or the last one reached.
    step: Step
    # What the operation is waiting for now, or how it ended.
    detail: str | None
    # The active VMs that keep the host from being reloaded (while waiting for it to empty).
    blocking_vms: list[BlockingVm]
    blocking_vms_total: int
    # Why it failed, and what to do (service/tdx_reasons.py when the host's TDX state says it).
    reason_code: str | None
    reason: str | None
    remedy: str | None
    history: list[HistoryEntry]
    deadline: datetime
    generation: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
