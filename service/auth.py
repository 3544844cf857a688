"""Bearer tokens: random secrets shown once, stored as SHA-256 hashes; roles and principals.

Secrets carry 256 random bits, so a fast hash is as strong as a slow one here and keeps every
request cheap. Lookups are cached per process for ``TDX_TOKEN_CACHE_TTL_S`` (default 1 s); a
revocation clears this process's cache at once and reaches other replicas within that TTL.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import ProblemError
from service.models import Host, Token

Role = Literal["admin", "reader", "agent", "client"]
ROLES: tuple[Role, ...] = ("admin", "reader", "agent", "client")
TOKEN_PREFIX = "tdx_"


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    token_id: str
    host: str | None = None
    project: str | None = None

    @property
    def key(self) -> str:
        """Stable identity for scoping idempotency keys."""
        return self.token_id

    def require(self, *roles: Role) -> None:
        if self.role not in roles:
            raise ProblemError(
                403, "forbidden", f"role {self.role!r} may not do this (needs {' or '.join(roles)})"
            )

    def require_agent_of(self, host: str) -> None:
        """Admins may act for any host; an agent token only for its own host."""
        if self.role == "admin":
            return
        if self.role != "agent" or self.host != host:
            raise ProblemError(403, "forbidden", f"only the agent of host {host!r} may do this")


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenCache:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Principal | None]] = {}

    def get(self, digest: str) -> tuple[bool, Principal | None]:
        entry = self._entries.get(digest)
        if entry is None or entry[0] < time.monotonic():
            return False, None
        return True, entry[1]

    def put(self, digest: str, principal: Principal | None) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._entries) > 10_000:
            self._entries.clear()
        self._entries[digest] = (time.monotonic() + self.ttl_s, principal)

    def clear(self) -> None:
        self._entries.clear()


def lookup_token(session: Session, digest: str) -> Principal | None:
    """The principal of a live token. An agent token acts for the host it was made for, found by
    id: once that host is deleted the token is dead, even for a new host of the same name."""
    row = session.execute(
        select(Token.id, Token.role, Host.name, Token.project)
        .outerjoin(Host, Host.id == Token.host_id)
        .where(Token.secret_hash == digest, Token.revoked_at.is_(None))
    ).first()
    if row is None or (row.role == "agent" and row.name is None):
        return None
    return Principal(role=row.role, token_id=str(row.id), host=row.name, project=row.project)


def bearer_secret(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise ProblemError(401, "unauthorized", "missing Authorization: Bearer <token>")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ProblemError(401, "unauthorized", "expected Authorization: Bearer <token>")
    return secret.strip()


async def current_principal(request: Request) -> Principal:
    from service.context import get_context

    ctx = get_context(request)
    secret = bearer_secret(request)
    digest = hash_secret(secret)
    if ctx.admin_token_hash is not None and hmac.compare_digest(digest, ctx.admin_token_hash):
        return Principal(role="admin", token_id="bootstrap-admin")
    hit, principal = ctx.token_cache.get(digest)
    if not hit:
        principal = await ctx.db.run(lambda s: lookup_token(s, digest), write=False)
        ctx.token_cache.put(digest, principal)
    if principal is None:
        raise ProblemError(401, "unauthorized", "unknown or revoked token")
    return principal
