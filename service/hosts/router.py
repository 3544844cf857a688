"""Host endpoints (API.md, Hosts). Thin: parse, authorize, call the service, shape the reply."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import StringConstraints
from sqlalchemy.orm import Session

from service.auth import Principal, current_principal
from service.context import get_context
from service.errors import ProblemError
from service.hosts import service
from service.hosts.heartbeat import heartbeat as heartbeat_fast
from service.hosts.readiness import TdxState
from service.hosts.schemas import (
    Heartbeat,
    HostBatch,
    HostBatchOut,
    HostCreate,
    HostOut,
    HostPatch,
    LoadOut,
    LoadReport,
)
from service.openapi import problems, roles
from service.pagination import Page, PageParams
from service.policy.versions import VERSION_PATTERN, version_key
from service.schemas import LABEL_KEY_MAX, LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN, Name

# label=key=value, both parts as in a host's labels (hosts without the label do not match).
LabelFilter = Annotated[
    str, StringConstraints(pattern=f"{LABEL_KEY_PATTERN[:-1]}={LABEL_VALUE_PATTERN[1:]}", max_length=317)
]

router = APIRouter(prefix="/v1/hosts", tags=["hosts"])
batch_router = APIRouter(tags=["hosts"])


def _etag(host: HostOut) -> dict[str, str]:
    return {"ETag": f'"{host.generation}"'}


def _parse_label_filters(raw: list[str] | None) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in raw or []:
        key, sep, value = item.partition("=")
        if not sep or not key or len(key) > LABEL_KEY_MAX:
            raise ProblemError(
                422, "validation_error", f"label filter {item[:80]!r} must be key=value",
                errors=[{"loc": ["query", "label"], "msg": f"expected key=value, a key of <= {LABEL_KEY_MAX} chars"}],
            )
        pairs.append((key, value))
    return tuple(pairs)


@router.post(
    "",
    status_code=201,
    response_model=HostOut,
    responses=problems("host_name_taken"),
    summary="Register a host",
    openapi_extra=roles("admin"),
)
async def create_host(
    body: HostCreate, request: Request, response: Response, principal: Principal = Depends(current_principal)
) -> HostOut:
    principal.require("admin")
    ctx = get_context(request)
    timeout = ctx.settings.heartbeat_timeout_s

    def _create(s: Session) -> HostOut:
        host = service.create_host(s, body, ctx.settings.cpu_allocation_ratio)
        return service.render(s, host, timeout)

    host = await ctx.db.run(_create)
    response.headers.update(_etag(host))
    response.headers["Location"] = f"/v1/hosts/{host.name}"
    return host


@router.get("", response_model=Page[HostOut], summary="List hosts", openapi_extra=roles("admin", "reader"))
async def list_hosts(
    request: Request,
    tdx_state: TdxState | None = Query(None),
    schedulable: bool | None = Query(None),
    label: list[LabelFilter] | None = Query(None, max_length=20),
    tdx_module_below: str | None = Query(
        None, max_length=64, pattern=VERSION_PATTERN,
        description="hosts whose TDX module version is known and lower (e.g. 1.5.10)",
    ),
    page: PageParams = Depends(),
    principal: Principal = Depends(current_principal),
) -> Page[HostOut]:
    principal.require("admin", "reader")
    ctx = get_context(request)
    below = None
    if tdx_module_below is not None:
        below = version_key(tdx_module_below)
        if below is None:
            raise ProblemError(
                422, "validation_error", f"tdx_module_below {tdx_module_below!r} is not a dotted numeric version",
                errors=[{"loc": ["query", "tdx_module_below"], "msg": "expected a version like 1.5.10"}],
            )
    filters = service.HostFilters(
        tdx_state=tdx_state, schedulable=schedulable, labels=_parse_label_filters(label), tdx_module_below=below
    )
    after = page.after_name()
    return await ctx.db.run(
        lambda s: service.list_hosts(s, filters, after, page.limit, ctx.settings.heartbeat_timeout_s), write=False
    )


@router.get(
    "/{name}",
    response_model=HostOut,
    responses=problems("host_not_found"),
    summary="Get a host",
    openapi_extra=roles("admin", "reader", "agent of the host"),
)
async def get_host(
    name: Name, request: Request, response: Response, principal: Principal = Depends(current_principal)
) -> HostOut:
    if principal.role != "agent":
        principal.require("admin", "reader")
    else:
        principal.require_agent_of(name)
    ctx = get_context(request)
    host = await ctx.db.run(
        lambda s: service.render(s, service.get_host_row(s, name), ctx.settings.heartbeat_timeout_s), write=False
    )
    response.headers.update(_etag(host))
    return host


@router.patch(
    "/{name}",
    response_model=HostOut,
    operation_id="updateHost",
    responses=problems(
        "host_not_found", "precondition_failed", "reservation_exceeds_free", "allocation_ratio_below_usage"
    ),
    summary="Change labels, cordon, drain or reservations (If-Match honoured)",
    openapi_extra=roles("admin"),
)
async def patch_host(
    name: Name,
    body: HostPatch,
    request: Request,
    response: Response,
    if_match: str | None = Header(None),
    principal: Principal = Depends(current_principal),
) -> HostOut:
    principal.require("admin")
    ctx = get_context(request)
    host = await ctx.db.run(
        lambda s: service.render(s, service.patch_host(s, name, body, if_match), ctx.settings.heartbeat_timeout_s)
    )
    response.headers.update(_etag(host))
    return host


@router.delete(
    "/{name}",
    status_code=204,
    responses=problems("host_not_found", "host_not_empty"),
    summary="Delete a host",
    openapi_extra=roles("admin"),
)
async def delete_host(name: Name, request: Request, principal: Principal = Depends(current_principal)) -> Response:
    principal.require("admin")
    ctx = get_context(request)
    await ctx.db.run(lambda s: service.delete_host(s, name))
    ctx.token_cache.clear()  # the host's agent tokens are revoked (other replicas: within the cache TTL)
    return Response(status_code=204)


@router.post(
    "/{name}/drain",
    response_model=HostOut,
    responses=problems("host_not_found"),
    summary="Drain a host: no new placements",
    openapi_extra=roles("admin"),
)
async def drain_host(
    name: Name, request: Request, response: Response, principal: Principal = Depends(current_principal)
) -> HostOut:
    principal.require("admin")
    ctx = get_context(request)
    host = await ctx.db.run(
        lambda s: service.render(s, service.drain_host(s, name), ctx.settings.heartbeat_timeout_s)
    )
    response.headers.update(_etag(host))
    return host


@router.post(
    "/{name}/loads",
    status_code=201,
    response_model=HostOut,
    responses={
        200: {"model": HostOut, "description": "a replay: this load was recorded already with the same facts"},
        **problems("host_not_found", "load_id_conflict", "load_facts_immutable", "reload_with_active_vms"),
    },
    summary="Report a kvm_intel load (the host's agent)",
    openapi_extra=roles("admin", "agent of the host"),
)
async def report_load(
    name: Name,
    body: LoadReport,
    request: Request,
    response: Response,
    principal: Principal = Depends(current_principal),
) -> HostOut:
    principal.require_agent_of(name)
    ctx = get_context(request)

    def _report(s: Session) -> tuple[HostOut, bool]:
        host, created = service.report_load(s, name, body)
        return service.render(s, host, ctx.settings.heartbeat_timeout_s), created

    host, created = await ctx.db.run(_report)
    if not created:
        response.status_code = 200
    response.headers.update(_etag(host))
    return host


@router.get(
    "/{name}/loads",
    response_model=Page[LoadOut],
    responses=problems("host_not_found"),
    summary="Load history, newest first",
    openapi_extra=roles("admin", "reader", "agent of the host"),
)
async def list_loads(
    name: Name, request: Request, page: PageParams = Depends(), principal: Principal = Depends(current_principal)
) -> Page[LoadOut]:
    if principal.role == "agent":
        principal.require_agent_of(name)
    else:
        principal.require("admin", "reader")
    after = page.after_seq()
    return await get_context(request).db.run(lambda s: service.list_loads(s, name, after, page.limit), write=False)


@router.post(
    "/{name}/heartbeat",
    response_model=HostOut,
    operation_id="sendHeartbeat",
    responses=problems("host_not_found", "stale_load"),
    summary="Heartbeat of the host's agent",
    openapi_extra=roles("admin", "agent of the host"),
)
async def heartbeat(
    name: Name,
    body: Heartbeat,
    request: Request,
    principal: Principal = Depends(current_principal),
) -> Response:
    principal.require_agent_of(name)
    ctx = get_context(request)
    timeout = ctx.settings.heartbeat_timeout_s

    def _heartbeat(s: Session) -> HostOut:
        fast = heartbeat_fast(s, name, body, timeout)
        return fast if fast is not None else service.render(s, service.heartbeat(s, name, body, timeout), timeout)

    host = await ctx.db.run(_heartbeat)
    # Serialized once (the response_model is the contract; validating the reply again cost as
    # much as the heartbeat's statements).
    return Response(host.model_dump_json(), media_type="application/json", headers=_etag(host))


@batch_router.post(
    "/v1/hosts:batch",
    status_code=201,
    response_model=HostBatchOut,
    responses=problems("host_name_taken", "load_id_conflict"),
    summary="Register up to 1,000 hosts at once",
    openapi_extra=roles("admin"),
)
async def register_hosts(
    body: HostBatch, request: Request, principal: Principal = Depends(current_principal)
) -> HostBatchOut:
    """Register up to 1,000 hosts at once, each with its first load report if known (fleet
    onboarding); all or nothing."""
    principal.require("admin")
    ctx = get_context(request)
    hosts = await ctx.db.run(
        lambda s: service.register_hosts(s, body.hosts, ctx.settings.cpu_allocation_ratio)
    )
    return HostBatchOut(created=len(hosts), hosts=hosts)
