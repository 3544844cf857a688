"""The web dashboard: one static page over the JSON API, with the operator's token.

The page and its assets (``service/static``: the page, its ES modules, its stylesheet) hold no data
and need no token; the page asks for a reader (or admin) token and sends it as
``Authorization: Bearer`` on its own calls to ``/v1``: GETs, and for an admin the host PATCHes
(cordon, uncordon, drain) with ``If-Match``. See README, "The dashboard".
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from service.errors import not_found

STATIC_PACKAGE = "service"
STATIC_DIR = "static"
INDEX = "index.html"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}

# Only the page's own files: no inline script or style, no other origin (the token must not leak).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["dashboard"], include_in_schema=False)


def _suffix(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:] if dot > 0 else ""


@functools.cache
def static_files() -> dict[str, bytes]:
    """Every servable file of ``service/static`` by name; nothing outside that directory is reachable."""
    directory = resources.files(STATIC_PACKAGE).joinpath(STATIC_DIR)
    return {
        entry.name: entry.read_bytes()
        for entry in directory.iterdir()
        if entry.is_file() and _suffix(entry.name) in CONTENT_TYPES
    }


def _serve(name: str) -> Response:
    body = static_files().get(name)
    if body is None:
        raise not_found("file", name)
    return Response(body, media_type=CONTENT_TYPES[_suffix(name)], headers=SECURITY_HEADERS)


@router.api_route("/dashboard", methods=["GET", "HEAD"])
async def dashboard() -> Response:
    return _serve(INDEX)


@router.api_route("/dashboard/static/{name}", methods=["GET", "HEAD"])
async def dashboard_asset(name: str) -> Response:
    return _serve(name)
