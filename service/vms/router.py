"""VM endpoints (API.md, VMs). Thin: parse, authorize, call the service, shape the reply."""

from __future__ import annotations

import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from sqlalchemy.orm import Session

from service.auth import Principal, current_principal
from service.context import AppContext, get_context
from service.models import ACTIVE_VM_STATUSES
from service.openapi import problems, roles
from service.pagination import Page, PageParams
from service.scheduler.engine import CLAIMED, IN_FLIGHT
from service.schemas import LINE_PATTERN, Name
from service.vms import service
from service.vms.lifecycle import VmStatus
from service.vms.schemas import VmCreate, VmOut, VmStatusReport

router = APIRouter(tags=["vms"])

# One line of printable characters: a NUL would reach the database (a 500 on PostgreSQL).
IdempotencyKeyHeader = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255, pattern=LINE_PATTERN)
]


@router.post(
    "/v1/vms",
    status_code=201,
    response_model=VmOut,
    responses={
        200: {"model": VmOut, "description": "a replay: the VM created earlier with this Idempotency-Key and body"},
        **problems("idempotency_key_reused", "quota_exceeded", "rate_limited", "quota_contended"),
    },
    summary="Request a VM: placed at once, or pending with an explanation",
    openapi_extra=roles("admin", "client (its project)"),
)
async def create_vm(
    body: VmCreate,
    request: Request,
    idempotency_key: IdempotencyKeyHeader = None,
    principal: Principal = Depends(current_principal),
) -> Response:
    principal.require("admin", "client")
    ctx: AppContext = get_context(request)
    if principal.role != "admin" or ctx.settings.rate_limit_admin:
        ctx.create_limiter.check(principal.key, "VM creates")
    started = time.perf_counter()

    claimed: list[object] = []

    def _create(s: Session) -> tuple[VmOut, bool, int]:
        s.info[IN_FLIGHT] = ctx.in_flight
        s.info[CLAIMED] = claimed
        vm, created = service.create_vm(s, body, principal, ctx.placement, ctx.rng, idempotency_key)
        return service.vm_out(vm), created, s.info.get(service.CLAIM_CONFLICTS, 0)

    try:
        vm, created, conflicts = await ctx.db.run(_create)
    finally:
        ctx.in_flight.discard(claimed)  # the transaction has ended (committed or not)
    if conflicts:
        ctx.metrics.claim_conflicts.inc(conflicts)
    if created:
        ctx.metrics.placement_seconds.observe(time.perf_counter() - started)
        ctx.metrics.placements.labels(result=vm.status.value).inc()
    # Serialized once, here: the reply is already a VmOut (the response_model above is the
    # contract; validating it again on the way out cost as much as the placement's claim).
    return Response(
        vm.model_dump_json(),
        status_code=201 if created else 200,
        media_type="application/json",
        headers={"Location": f"/v1/vms/{vm.id}"},
    )


@router.get(
    "/v1/vms",
    response_model=Page[VmOut],
    summary="List VMs",
    openapi_extra=roles("admin", "reader", "client (its project's VMs only)"),
)
async def list_vms(
    request: Request,
    status: list[VmStatus] | None = Query(None, description="repeatable: VMs in any of these statuses"),
    host: Name | None = Query(None),
    project: Name | None = Query(None),
    tdx: bool | None = Query(None),
    page: PageParams = Depends(),
    principal: Principal = Depends(current_principal),
) -> Page[VmOut]:
    principal.require("admin", "reader", "client")
    if principal.role == "client":
        if project is not None and project != principal.project:
            return Page[VmOut](items=[], next=None)
        project = principal.project
    statuses = tuple(dict.fromkeys(status)) if status else None
    filters = service.VmFilters(statuses=statuses, host=host, project=project, tdx=tdx)
    after = page.after_uuid()
    return await get_context(request).db.run(
        lambda s: service.list_vms(s, filters, after, page.limit), write=False
    )


@router.get(
    "/v1/vms/{vm_id}",
    response_model=VmOut,
    responses=problems("vm_not_found"),
    summary="Get a VM",
    openapi_extra=roles("admin", "reader", "client (its project's VMs)", "agent (VMs placed on its host)"),
)
async def get_vm(vm_id: uuid.UUID, request: Request, principal: Principal = Depends(current_principal)) -> VmOut:
    return await get_context(request).db.run(
        lambda s: service.vm_out(service.visible_vm(s, vm_id, principal)), write=False
    )


@router.delete(
    "/v1/vms/{vm_id}",
    status_code=202,
    response_model=VmOut,
    responses=problems("vm_not_found", "invalid_transition"),
    summary="Delete a VM", openapi_extra=roles("admin", "client (its project's VMs)"),
)
async def delete_vm(vm_id: uuid.UUID, request: Request, principal: Principal = Depends(current_principal)) -> VmOut:
    principal.require("admin", "client")
    return await get_context(request).db.run(lambda s: service.vm_out(service.delete_vm(s, vm_id, principal)))


@router.post(
    "/v1/vms/{vm_id}/status",
    response_model=VmOut,
    responses=problems("vm_not_found", "invalid_transition"),
    summary="Report a VM's lifecycle (the agent of its host)",
    openapi_extra=roles("admin", "agent (VMs placed on its host)"),
)
async def report_vm_status(
    vm_id: uuid.UUID, body: VmStatusReport, request: Request, principal: Principal = Depends(current_principal)
) -> VmOut:
    principal.require("admin", "agent")
    return await get_context(request).db.run(
        lambda s: service.vm_out(service.report_status(s, vm_id, body, principal))
    )


@router.get(
    "/v1/hosts/{name}/vms",
    response_model=Page[VmOut],
    operation_id="listHostVms",
    responses=problems("host_not_found"),
    summary="The VMs assigned to a host",
    openapi_extra=roles("admin", "reader", "agent of the host"),
)
async def host_vms(
    name: Name,
    request: Request,
    status: list[VmStatus] | None = Query(None),
    page: PageParams = Depends(),
    principal: Principal = Depends(current_principal),
) -> Page[VmOut]:
    if principal.role == "agent":
        principal.require_agent_of(name)
    else:
        principal.require("admin", "reader")
    statuses = tuple(s.value for s in status) if status else ACTIVE_VM_STATUSES
    after = page.after_uuid()
    return await get_context(request).db.run(
        lambda s: service.host_vms(s, name, statuses, after, page.limit), write=False
    )
