"""Token administration: create (secret shown once), list (no secrets), revoke."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from service.auth import Principal, Role, current_principal, hash_secret, new_secret
from service.clock import as_utc, utcnow
from service.context import get_context
from service.errors import ProblemError, not_found
from service.models import Host, Token
from service.openapi import problems, roles
from service.pagination import Page, PageParams, encode_cursor
from service.schemas import LINE_PATTERN, Name, StrictModel

BOOTSTRAP_ADMIN_LOCK = 0x7464_7861_646D  # "tdxadm": serializes first-start admin minting on PostgreSQL


Description = Annotated[str, StringConstraints(max_length=255, pattern=LINE_PATTERN)] | None


# One body per role, told apart by `role`: the schema itself says which binding each role takes
# (an agent token is bound to one host, a client token to one project, the others to neither).
class AdminTokenCreate(StrictModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"role": "admin", "description": "ops team"}]}
    )

    role: Literal["admin"]
    host: None = None
    project: None = None
    description: Description = None


class ReaderTokenCreate(StrictModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"role": "reader", "description": "dashboard"}]}
    )

    role: Literal["reader"]
    host: None = None
    project: None = None
    description: Description = None


class AgentTokenCreate(StrictModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"role": "agent", "host": "node-1", "description": "agent of node-1"}]},
    )

    role: Literal["agent"]
    host: Name
    project: None = None
    description: Description = None


class ClientTokenCreate(StrictModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"role": "client", "project": "web", "description": "web"}]}
    )

    role: Literal["client"]
    host: None = None
    project: Name
    description: Description = None


TokenCreate = Annotated[
    AdminTokenCreate | ReaderTokenCreate | AgentTokenCreate | ClientTokenCreate, Field(discriminator="role")
]


class TokenOut(BaseModel):
    id: uuid.UUID
    role: Role
    host: str | None
    project: str | None
    description: str | None
    created_at: datetime
    revoked_at: datetime | None


class TokenCreated(TokenOut):
    token: str


def _out(row: Token) -> TokenOut:
    return TokenOut(
        id=row.id,
        role=row.role,
        host=row.host,
        project=row.project,
        description=row.description,
        created_at=as_utc(row.created_at),
        revoked_at=as_utc(row.revoked_at) if row.revoked_at else None,
    )


def create_token(session: Session, body: TokenCreate) -> TokenCreated:
    host_id = None
    if body.host is not None:
        host_id = session.scalar(select(Host.id).where(Host.name == body.host))
        if host_id is None:
            raise not_found("host", body.host)
    secret = new_secret()
    row = Token(
        secret_hash=hash_secret(secret),
        role=body.role,
        host_id=host_id,
        host=body.host,
        project=body.project,
        description=body.description,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return TokenCreated(**_out(row).model_dump(), token=secret)


def ensure_bootstrap_admin(session: Session) -> str | None:
    """At first start without TDX_ADMIN_TOKEN: mint an admin token; the caller prints it once."""
    if session.get_bind().dialect.name == "postgresql":
        # Replicas starting together would each see no admin yet and each mint one.
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": BOOTSTRAP_ADMIN_LOCK})
    if session.scalar(select(Token.id).where(Token.role == "admin").limit(1)) is not None:
        return None
    secret = new_secret()
    session.add(
        Token(secret_hash=hash_secret(secret), role="admin", description="bootstrap admin", created_at=utcnow())
    )
    return secret


router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


@router.post(
    "",
    status_code=201,
    response_model=TokenCreated,
    operation_id="createToken",
    responses=problems("host_not_found"),
    summary="Create a token (the secret is shown only here)",
    openapi_extra=roles("admin"),
)
async def post_token(
    body: TokenCreate, request: Request, principal: Principal = Depends(current_principal)
) -> TokenCreated:
    principal.require("admin")
    return await get_context(request).db.run(lambda s: create_token(s, body))


@router.get("", response_model=Page[TokenOut], summary="List tokens (no secrets)", openapi_extra=roles("admin"))
async def list_tokens(
    request: Request, page: PageParams = Depends(), principal: Principal = Depends(current_principal)
) -> Page[TokenOut]:
    principal.require("admin")
    after = page.after_uuid()

    def _list(s: Session) -> Page[TokenOut]:
        query = select(Token)
        if after is not None:
            try:
                query = query.where(Token.id > uuid.UUID(str(after)))
            except ValueError as exc:
                raise ProblemError(400, "invalid_cursor", "cursor is not one this server issued") from exc
        rows = s.scalars(query.order_by(Token.id).limit(page.limit + 1)).all()
        items = [_out(r) for r in rows[: page.limit]]
        nxt = encode_cursor(str(items[-1].id)) if len(rows) > page.limit else None
        return Page[TokenOut](items=items, next=nxt)

    return await get_context(request).db.run(_list, write=False)


@router.delete(
    "/{token_id}",
    status_code=204,
    responses=problems("token_not_found"),
    summary="Revoke a token",
    openapi_extra=roles("admin"),
)
async def revoke_token(
    token_id: uuid.UUID, request: Request, principal: Principal = Depends(current_principal)
) -> Response:
    principal.require("admin")
    ctx = get_context(request)

    def _revoke(s: Session) -> None:
        row = s.get(Token, token_id)
        if row is None:
            raise not_found("token", token_id)
        if row.revoked_at is None:
            row.revoked_at = utcnow()

    await ctx.db.run(_revoke)
    ctx.token_cache.clear()
    return Response(status_code=204)
