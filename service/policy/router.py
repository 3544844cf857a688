"""Fleet policy endpoints: GET (reader) and PUT (admin) /v1/policy."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Request, Response

from service.auth import Principal, current_principal
from service.context import get_context
from service.openapi import problems, roles
from service.policy import service
from service.policy.schemas import PolicyOut, PolicyUpdate
from service.preconditions import parse_if_match

router = APIRouter(prefix="/v1/policy", tags=["policy"])


@router.get("", response_model=PolicyOut, summary="The fleet's TDX policy", openapi_extra=roles("admin", "reader"))
async def get_policy(
    request: Request, response: Response, principal: Principal = Depends(current_principal)
) -> PolicyOut:
    principal.require("admin", "reader")
    ctx = get_context(request)
    defaults = ctx.placement.policy_defaults
    out = await ctx.db.run(lambda s: service.policy_out(service.current(s, defaults), defaults), write=False)
    response.headers["ETag"] = f'"{out.generation}"'
    return out


@router.put(
    "",
    response_model=PolicyOut,
    operation_id="setPolicy",
    summary="Set the fleet's TDX policy",
    responses=problems("precondition_failed"),
    openapi_extra=roles("admin"),
)
async def put_policy(
    body: PolicyUpdate,
    request: Request,
    response: Response,
    if_match: str | None = Header(None),
    principal: Principal = Depends(current_principal),
) -> PolicyOut:
    """Set the fleet's TDX policy: the fields given change, the others keep their values. Pending VMs
    are retried and re-explained under it; placed VMs never move."""
    principal.require("admin")
    ctx = get_context(request)
    defaults = ctx.placement.policy_defaults
    accepted = parse_if_match(if_match)
    out = await ctx.db.run(
        lambda s: service.policy_out(service.update(s, body, defaults, accepted), defaults)
    )
    response.headers["ETag"] = f'"{out.generation}"'
    return out
