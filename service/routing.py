"""Routing answers the framework gets wrong: a 405 names every method of the path in ``Allow``.

Starlette answers 405 from the first route whose path matched, so ``Allow`` listed only that
route's methods (``GET`` on ``/v1/hosts/{name}``, which also has PATCH and DELETE).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.routing import Match

from service.errors import problem_response

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route takes on this request's path (routes are asked, not inspected, so
    included routers count too)."""
    allowed = []
    for method in METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in app.router.routes):
            allowed.append(method)
    return allowed


def install_method_not_allowed(app: FastAPI) -> None:
    async def _method_not_allowed(request: Request, _exc: Exception) -> JSONResponse:
        allow = allowed_methods(app, request)
        return problem_response(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(allow)}",
            headers={"Allow": ", ".join(allow)},
        )

    app.add_exception_handler(405, _method_not_allowed)
