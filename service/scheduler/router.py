"""Scheduling insight endpoints: preview and capacity (API.md, Scheduling insight)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy.orm import Session

from service.auth import Principal, current_principal
from service.context import get_context
from service.errors import ProblemError
from service.openapi import roles
from service.policy import service as fleet_policy
from service.scheduler import insight
from service.scheduler.types import VmRequest
from service.vms.schemas import CapacityOut, PreviewOut, VmCreate

router = APIRouter(tags=["scheduling"])


@router.post(
    "/v1/schedule/preview",
    response_model=PreviewOut,
    operation_id="previewSchedule",
    summary="Where a VM would land now, and why not elsewhere",
    openapi_extra=roles("admin", "client"),
)
async def preview(body: VmCreate, request: Request, principal: Principal = Depends(current_principal)) -> PreviewOut:
    principal.require("admin", "client")
    ctx = get_context(request)
    req = VmRequest(
        vcpus=body.vcpus,
        memory_mib=body.memory_mib,
        tdx=body.tdx,
        selector=tuple(sorted(body.selector.items())),
        anti_affinity_group=body.anti_affinity_group,
        attestation=body.attestation,
    )
    defaults = ctx.placement.policy_defaults

    def _preview(s: Session) -> PreviewOut:
        policy = fleet_policy.current(s, defaults).scheduler
        return insight.preview(s, req, ctx.placement.scheduler, ctx.settings.heartbeat_timeout_s, policy)

    return await ctx.db.run(_preview, write=False)


@router.get(
    "/v1/capacity",
    response_model=CapacityOut,
    operation_id="getCapacity",
    summary="Fleet capacity by TDX state",
    openapi_extra=roles("admin", "reader", "client"),
)
async def capacity(
    request: Request,
    vcpus: int | None = Query(None, ge=1, le=4096),
    memory_mib: int | None = Query(None, ge=1, le=2**50),
    tdx: bool = Query(False),
    attestation: bool = Query(False, description="count only hosts whose quote generation service answers"),
    principal: Principal = Depends(current_principal),
) -> CapacityOut:
    principal.require("admin", "reader", "client")
    if (vcpus is None) != (memory_mib is None):
        raise ProblemError(
            422, "validation_error", "give both vcpus and memory_mib, or neither",
            errors=[{"loc": ["query", "vcpus" if vcpus is None else "memory_mib"], "msg": "required with the other"}],
        )
    size = (
        VmRequest(vcpus=vcpus, memory_mib=memory_mib, tdx=tdx, attestation=attestation and tdx)
        if vcpus and memory_mib else None
    )
    ctx = get_context(request)
    defaults = ctx.placement.policy_defaults

    def _capacity(s: Session) -> CapacityOut:
        policy = fleet_policy.current(s, defaults).scheduler
        return insight.capacity(s, size, ctx.settings.heartbeat_timeout_s, policy)

    return await ctx.db.run(_capacity, write=False)
