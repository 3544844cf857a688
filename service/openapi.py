"""The published contract: /openapi.json describes what the server really answers.

A route declares only what is particular to it: its operation id comes from its function name
(``create_host`` -> ``createHost``) unless it gives one, and the problems it may answer beyond the
common ones are one argument, ``responses=problems("host_not_found", "host_name_taken")``.
``publish`` then adds to every operation what follows from its shape, so a new endpoint is
documented honestly without anyone remembering to:

- under ``/v1``: the bearer security scheme, 401, 403 and 503 (database unavailable);
- with a request body: 400 (unparsable), 413 (over the body limit) and 422;
- with any parameter: 422; with a ``cursor`` parameter: 400 ``invalid_cursor``;
- every status >= 400 as ``application/problem+json`` (RFC 9457) with the ``Problem`` schema,
  422 with ``ValidationProblem`` (``errors: [{loc, msg}]``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from service.errors import PROBLEM_MEDIA_TYPE

SECURITY_SCHEME = "bearerAuth"

# Every stable problem code the service answers with, its status(es) and when.
PROBLEM_CODES: dict[str, tuple[tuple[int, ...], str]] = {
    "bad_request": ((400,), "the request body could not be read (not JSON, not UTF-8)"),
    "invalid_cursor": ((400,), "`cursor` is not one this server issued"),
    "invalid_last_event_id": ((400,), "`Last-Event-ID` is not an event id"),
    "unauthorized": ((401,), "no bearer token, or an unknown or revoked one"),
    "forbidden": ((403,), "the token's role or binding (host, project) does not allow this"),
    "host_not_found": ((404,), "no host of that name"),
    "vm_not_found": ((404,), "no VM of that id (or not visible to this token)"),
    "token_not_found": ((404,), "no token of that id"),
    "operation_not_found": ((404,), "no operation of that id"),
    "method_not_allowed": ((405,), "the path exists but not with this method; `Allow` lists its methods"),
    "host_name_taken": ((409,), "a host of that name exists already"),
    "host_not_empty": ((409,), "the host still has active VMs"),
    "load_id_conflict": ((409,), "the `load_id` was reported by another host"),
    "load_facts_immutable": ((409,), "the `load_id` was already reported with other facts"),
    "reload_with_active_vms": ((409,), "a new kvm_intel load on the same boot while VMs are active"),
    "stale_load": ((409,), "`load_id` is not the host's current load"),
    "invalid_transition": ((409,), "the VM's state machine does not allow this"),
    "reservation_exceeds_free": (
        (409,),
        "the reservation would leave the host's placed VMs over capacity (`resource`, `requested`, `in_use`, "
        "`capacity`); nothing changed",
    ),
    "allocation_ratio_below_usage": (
        (409,),
        "the CPU allocation ratio would leave the host's placed vCPUs over its limit (`requested`, `in_use`, "
        "`capacity`, `limit`); nothing changed",
    ),
    "operation_in_progress": ((409,), "the host already has a running opt-in operation"),
    "tdx_already_ready": ((409,), "the host is TDX-ready already: there is nothing to opt in"),
    "operation_finished": ((409,), "the operation has ended; it can no longer be canceled"),
    "idempotency_key_reused": (
        (409, 422),
        "the `Idempotency-Key` was used with another body (422), or its VM no longer exists (409)",
    ),
    "quota_exceeded": ((403,), "the VM would take its project over a quota (`resource`, `limit`, `usage`, `request`)"),
    "precondition_failed": ((412,), "`If-Match` names no current version of the resource"),
    "payload_too_large": ((413,), "the request body is over the limit (1 MiB)"),
    "validation_error": ((422,), "the request does not match the schema or a rule; `errors` says where"),
    "rate_limited": ((429,), "too many requests of this kind from this token; retry after `Retry-After` seconds"),
    "too_many_streams": (
        (429,),
        "this token has as many event streams and waiting long-polls open on this replica as allowed "
        "(`limit`); close one, or retry after `Retry-After` seconds",
    ),
    "database_unavailable": (
        (503,),
        "the database is down, stalled or locked; retry after `Retry-After` seconds (a write's outcome is "
        "unknown: retry it with the same `Idempotency-Key`)",
    ),
    "quota_contended": ((503,), "the project's quota changed too fast to claim; retry"),
}

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; `code` is stable and machine-readable. Some problems carry "
    "more members (e.g. `current_generation`, `active_vms`).",
    "type": "object",
    "properties": {
        "type": {"type": "string", "title": "Type"},
        "title": {"type": "string", "title": "Title"},
        "status": {"type": "integer", "title": "Status"},
        "detail": {"type": "string", "title": "Detail"},
        "code": {"type": "string", "title": "Code"},
    },
    "required": ["type", "title", "status", "detail", "code"],
    "additionalProperties": True,
}
VALIDATION_ERROR_SCHEMA: dict[str, Any] = {
    "title": "ValidationErrorItem",
    "type": "object",
    "properties": {
        "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}, "title": "Loc"},
        "msg": {"type": "string", "title": "Msg"},
    },
    "required": ["loc", "msg"],
    "additionalProperties": True,
}
VALIDATION_PROBLEM_SCHEMA: dict[str, Any] = {
    **PROBLEM_SCHEMA,
    "title": "ValidationProblem",
    "description": "A 422 problem: for `validation_error`, `errors` lists each offending location and why.",
    "properties": {
        **PROBLEM_SCHEMA["properties"],
        "errors": {"type": "array", "items": {"$ref": "#/components/schemas/ValidationErrorItem"}, "title": "Errors"},
    },
}

_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    405: {"Allow": {"description": "every method of this path", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}},
}


def problems(*codes: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the problem codes it may answer beyond the common ones."""
    by_status: dict[int, list[str]] = {}
    for code in codes:
        if code not in PROBLEM_CODES:
            raise KeyError(f"unknown problem code {code!r}: add it to PROBLEM_CODES")
        for status in PROBLEM_CODES[code][0]:
            by_status.setdefault(status, []).append(code)
    return {status: {"description": "", "x-problem-codes": found} for status, found in by_status.items()}


def operation_id(route: APIRoute) -> str:
    """``create_host`` -> ``createHost``: generated clients get names that read like the API."""
    first, *rest = route.name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


def _problem_response(status: int, codes: list[str]) -> dict[str, Any]:
    schema = "ValidationProblem" if status == 422 else "Problem"
    lines = [f"`{code}`: {PROBLEM_CODES[code][1]}" if code in PROBLEM_CODES else f"`{code}`" for code in codes]
    response: dict[str, Any] = {
        "description": "; ".join(lines) or "problem",
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        "x-problem-codes": codes,
    }
    if status in _HEADERS:
        response["headers"] = _HEADERS[status]
    return response


def _common_codes(path: str, operation: dict[str, Any]) -> list[str]:
    codes: list[str] = []
    params = operation.get("parameters", [])
    if "requestBody" in operation:
        codes += ["bad_request", "payload_too_large", "validation_error"]
    elif params:
        codes.append("validation_error")
    if any(p["name"] == "cursor" and p["in"] == "query" for p in params):
        codes.append("invalid_cursor")
    if path.startswith("/v1/"):
        codes += ["unauthorized", "forbidden", "database_unavailable"]
    return codes


def _document_problems(path: str, operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    declared: dict[int, list[str]] = {}
    for key, response in list(responses.items()):
        if key.isdigit() and int(key) >= 400:
            declared.setdefault(int(key), []).extend(response.get("x-problem-codes", []))
            del responses[key]
    for code in _common_codes(path, operation):
        for status in PROBLEM_CODES[code][0]:
            if code not in declared.setdefault(status, []):
                declared[status].append(code)
    for status in sorted(declared):
        responses[str(status)] = _problem_response(status, declared[status])


def _without_fastapi_validation_schemas(schemas: dict[str, Any]) -> None:
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def build_spec(app: FastAPI) -> dict[str, Any]:
    spec = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    components = spec.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    _without_fastapi_validation_schemas(schemas)
    schemas["Problem"] = PROBLEM_SCHEMA
    schemas["ValidationProblem"] = VALIDATION_PROBLEM_SCHEMA
    schemas["ValidationErrorItem"] = VALIDATION_ERROR_SCHEMA
    components["securitySchemes"] = {
        SECURITY_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "description": "`Authorization: Bearer <token>`; tokens come from `POST /v1/tokens` "
            "(the first admin token from TDX_ADMIN_TOKEN or the first start)",
        }
    }
    spec["x-problem-codes"] = {code: [list(statuses), when] for code, (statuses, when) in PROBLEM_CODES.items()}
    for path, item in spec.get("paths", {}).items():
        for method, operation in item.items():
            if method not in {"get", "put", "post", "delete", "patch", "head", "options", "trace"}:
                continue
            if path.startswith("/v1/"):
                operation["security"] = [{SECURITY_SCHEME: []}]
            _document_problems(path, operation)
    return spec


def publish(app: FastAPI) -> None:
    """Serve ``build_spec(app)`` at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_spec(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]



def roles(*who: str) -> dict[str, Any]:
    """``openapi_extra=`` for a route: who may call it, e.g. ``roles("admin", "agent of the host")``.
    Each entry starts with a role name; tests/contract/test_roles.py holds them to what the server
    enforces, and docs/api.md lists them."""
    return {"x-roles": list(who)}
