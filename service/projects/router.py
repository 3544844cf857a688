"""Project quota endpoints (API.md, Projects and quotas). Thin: parse, authorize, call the service."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Request, Response

from service.auth import Principal, current_principal
from service.context import get_context
from service.openapi import problems, roles
from service.pagination import Page, PageParams
from service.projects import service
from service.projects.schemas import QuotaLimits, QuotaOut
from service.schemas import Name

router = APIRouter(prefix="/v1/projects", tags=["projects"])


def _etag(out: QuotaOut) -> dict[str, str]:
    return {"ETag": f'"{out.generation}"'}


@router.get(
    "",
    response_model=Page[QuotaOut],
    summary="Projects with their quota limits and usage",
    openapi_extra=roles("admin", "reader"),
)
async def list_projects(
    request: Request, page: PageParams = Depends(), principal: Principal = Depends(current_principal)
) -> Page[QuotaOut]:
    principal.require("admin", "reader")
    after = page.after_name()
    return await get_context(request).db.run(lambda s: service.list_projects(s, after, page.limit), write=False)


@router.get(
    "/{project}/quota",
    response_model=QuotaOut,
    summary="A project's quota limits and usage",
    openapi_extra=roles("admin", "reader", "client (its project)"),
)
async def get_quota(
    project: Name, request: Request, response: Response, principal: Principal = Depends(current_principal)
) -> QuotaOut:
    service.require_reader_of(principal, project)
    out = await get_context(request).db.run(lambda s: service.get_quota(s, project), write=False)
    response.headers.update(_etag(out))
    return out


@router.put(
    "/{project}/quota",
    response_model=QuotaOut,
    responses=problems("precondition_failed"),
    summary="Set a project's quota limits (If-Match honoured)",
    openapi_extra=roles("admin"),
)
async def set_quota(
    project: Name,
    body: QuotaLimits,
    request: Request,
    response: Response,
    if_match: str | None = Header(None),
    principal: Principal = Depends(current_principal),
) -> QuotaOut:
    principal.require("admin")
    out = await get_context(request).db.run(lambda s: service.set_quota(s, project, body, if_match))
    response.headers.update(_etag(out))
    return out
