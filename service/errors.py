"""RFC 9457 problem details with stable machine-readable codes."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.db import is_unavailable

PROBLEM_MEDIA_TYPE = "application/problem+json"
# Seconds a client is asked to wait after a 503 database_unavailable.
DATABASE_RETRY_AFTER_S = 2
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
log = logging.getLogger("tdx.errors")


class ProblemError(Exception):
    """Raise anywhere in the service to answer with a problem document."""

    def __init__(
        self, status: int, code: str, detail: str, *, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers
        self.extra = extra


def not_found(kind: str, ident: object) -> ProblemError:
    return ProblemError(404, f"{kind}_not_found", f"{kind} {ident!s} does not exist")


def problem_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://tdx-control-plane.dev/problems/{code.replace('_', '-')}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
    }
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def database_unavailable(method: str) -> JSONResponse:
    """503 for a database that is down, stalled or locked; a write may or may not have happened."""
    detail = "the database cannot be reached now; retry later"
    if method.upper() not in _SAFE_METHODS:
        detail = (
            "the database cannot be reached now, so the outcome of this request is unknown (it may or may "
            "not have been applied): retry it, with the same Idempotency-Key where the operation takes one"
        )
    return problem_response(
        503, "database_unavailable", detail, headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)}
    )


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def _loc(loc: tuple[int | str, ...] | list[int | str]) -> list[int | str]:
    return list(loc)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(_request: Request, exc: ProblemError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        headers.update(exc.headers or {})
        return problem_response(exc.status, exc.code, exc.detail, headers=headers or None, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI parses and validates the body before it resolves dependencies, so a caller
        # without a valid token would learn about the schema before being told 401.
        if request.url.path.startswith("/v1/"):
            from service.auth import current_principal

            try:
                await current_principal(request)
            except ProblemError as auth_error:
                return await _problem(request, auth_error)
            except SQLAlchemyError as db_error:
                return await _database(request, db_error)
        errors = [
            {"loc": _loc(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": err.get("type")}
            for err in exc.errors()
        ]
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in errors[:5])
        return problem_response(
            422, "validation_error", f"request is not valid: {fields}", errors=errors
        )

    @app.exception_handler(SQLAlchemyError)
    async def _database(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        if not is_unavailable(exc):
            raise exc  # a bug: the generic handler answers 500
        log.warning("database unavailable (%s %s): %s", request.method, request.url.path, exc)
        return database_unavailable(request.method)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return problem_response(
            exc.status_code, code, detail, headers=dict(exc.headers) if exc.headers else None
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return problem_response(500, "internal_error", "the server failed to handle the request")
