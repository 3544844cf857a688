"""``GET /v1/whoami``: what the caller's token may do, for clients that adapt to it (the dashboard
shows its admin actions only to an admin token; ``tdxctl whoami``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from service.auth import Principal, Role, current_principal
from service.openapi import roles

router = APIRouter(tags=["tokens"])


class WhoAmI(BaseModel):
    role: Role
    token_id: str  # a token's id, or "bootstrap-admin" for TDX_ADMIN_TOKEN
    host: str | None  # an agent token's host
    project: str | None  # a client token's project


@router.get(
    "/v1/whoami",
    response_model=WhoAmI,
    summary="The caller's role and binding",
    openapi_extra=roles("admin", "reader", "agent", "client"),
)
async def whoami(principal: Principal = Depends(current_principal)) -> WhoAmI:
    return WhoAmI(role=principal.role, token_id=principal.token_id, host=principal.host, project=principal.project)
