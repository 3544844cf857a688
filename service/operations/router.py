"""Operation endpoints: start a host's guided TDX opt-in, read and cancel operations."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Body, Depends, Query, Request, Response

from service.auth import Principal, current_principal
from service.context import get_context
from service.openapi import problems, roles
from service.operations import service
from service.operations.schemas import OperationOut, OperationStatus, OptInStart
from service.pagination import Page, PageParams
from service.schemas import Name

router = APIRouter(tags=["operations"])


@router.post(
    "/v1/hosts/{name}/tdx-opt-in",
    status_code=202,
    response_model=OperationOut,
    operation_id="startTdxOptIn",
    summary="Start a host's guided TDX opt-in",
    responses=problems("host_not_found", "operation_in_progress", "tdx_already_ready"),
    openapi_extra=roles("admin"),
)
async def start_opt_in(
    name: Name,
    request: Request,
    response: Response,
    body: OptInStart | None = Body(None),
    principal: Principal = Depends(current_principal),
) -> OperationOut:
    """Opt a host in to TDX: cordon it, wait until no VM is active on it, wait for a new kvm_intel
    load report, and uncordon it when it is TDX-ready (or stop with the reason and the remedy).
    202 with the operation; follow it at its Location or in the event log (``operation.*``)."""
    principal.require("admin")
    ctx = get_context(request)
    timeout = (body.timeout_s if body and body.timeout_s else None) or ctx.settings.opt_in_timeout_s
    op = await ctx.db.run(lambda s: service.operation_out(service.start_opt_in(s, name, timeout)))
    response.headers["Location"] = f"/v1/operations/{op.id}"
    return op


@router.get(
    "/v1/operations", response_model=Page[OperationOut], summary="Operations, newest first",
    openapi_extra=roles("admin", "reader"),
)
async def list_operations(
    request: Request,
    status: OperationStatus | None = Query(None),
    host: Name | None = Query(None),
    page: PageParams = Depends(),
    principal: Principal = Depends(current_principal),
) -> Page[OperationOut]:
    """Operations, newest first."""
    principal.require("admin", "reader")
    after = page.after_uuid()
    return await get_context(request).db.run(
        lambda s: service.list_operations(s, status, host, after, page.limit), write=False
    )


@router.get(
    "/v1/operations/{op_id}", response_model=OperationOut, summary="One operation: its step, history and outcome",
    responses=problems("operation_not_found"), openapi_extra=roles("admin", "reader"),
)
async def get_operation(
    op_id: uuid.UUID, request: Request, principal: Principal = Depends(current_principal)
) -> OperationOut:
    principal.require("admin", "reader")
    return await get_context(request).db.run(
        lambda s: service.operation_out(service.get_operation(s, op_id)), write=False
    )


@router.post(
    "/v1/operations/{op_id}/cancel", response_model=OperationOut, summary="Cancel a running operation",
    responses=problems("operation_not_found", "operation_finished"), openapi_extra=roles("admin"),
)
async def cancel_operation(
    op_id: uuid.UUID, request: Request, principal: Principal = Depends(current_principal)
) -> OperationOut:
    """Stop a running operation; a host it cordoned is uncordoned. 409 ``operation_finished`` once it ended."""
    principal.require("admin")
    return await get_context(request).db.run(lambda s: service.operation_out(service.cancel(s, op_id)))
