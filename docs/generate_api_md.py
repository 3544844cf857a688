"""Writes docs/api.md, the API reference, from the service's own /openapi.json.

    .venv/bin/python docs/generate_api_md.py          # rewrite docs/api.md
    .venv/bin/python docs/generate_api_md.py --check  # exit 1 if docs/api.md is out of date

tests/contract/test_api_reference.py runs the same and fails when the two differ, so the
reference cannot drift from what the server publishes (and the server publishes what it does:
tests/contract/test_fuzz.py).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).with_name("api.md")
METHODS = ("get", "put", "post", "patch", "delete")

INTRO = """\
# HTTP API reference

Generated from the service's `/openapi.json` by `docs/generate_api_md.py`; do not edit by hand
(`tests/contract/test_api_reference.py` fails when this file and the schema differ). A running
service shows the same at `/docs` (Swagger UI, with an Authorize button for the bearer token) and
`/redoc`. The Python client over this API is described in the README ("Python client").

## Conventions

- **Auth.** Every `/v1` call takes `Authorization: Bearer <token>`; no token or an unknown one is
  401, a role that may not do this is 403. Roles: `admin` (everything), `reader` (every GET),
  `agent` (bound to one host: its loads, heartbeats and the VMs placed on it), `client` (bound to
  one project: its VMs, capacity and preview; another project's VM is 404, not 403). The first
  admin token comes from `TDX_ADMIN_TOKEN` or is printed once at first start; more come from
  `POST /v1/tokens`.
- **Bodies** are JSON; unknown fields are refused (422). Integers are JSON integers (`2.0` is 2;
  `"2"`, `true` and `2.5` are not). Times are UTC ISO 8601, ids UUIDs, names DNS labels
  (lowercase letters, digits, `-`, 1..63 characters).
- **Errors** are RFC 9457 problem documents, `application/problem+json`:
  `{type, title, status, detail, code}` with a stable `code` (below), plus context members where
  useful (`current_generation`, `active_vms`, ...); `validation_error` carries
  `errors: [{loc, msg}]`. An unknown path is 404; a known path with another method is 405 with
  `Allow` listing the path's methods. Bodies over 1 MiB are 413.
- **Lists** take `limit` (1..500, default 100) and `cursor` (the `next` of the previous page) and
  answer `{items, next}`; `next` is null on the last page. Pages stay correct while rows are added.
- **Concurrency.** A host's `generation` is its ETag; `PATCH` honours `If-Match` (412 on mismatch).
- **Retries.** `POST /v1/vms` takes `Idempotency-Key`: the same key and body answer the same VM
  (200); the same key with another body is 422 `idempotency_key_reused`. A load report with a
  `load_id` already recorded with the same facts is a replay (200).
"""


def anchor(name: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", name.lower()).replace(" ", "-")


def ref_name(schema: dict[str, Any]) -> str:
    return str(schema["$ref"]).rsplit("/", 1)[-1]


def type_of(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = ref_name(schema)
        return f"[{name}](#{anchor(name)})"
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return " | ".join(type_of(s) for s in schema[key])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    if "enum" in schema:
        return " | ".join(f"`{v}`" for v in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        return f"[{type_of(schema.get('items', {}))}]"
    if kind == "object":
        extra = schema.get("additionalProperties")
        return f"{{string: {type_of(extra)}}}" if isinstance(extra, dict) else "object"
    if isinstance(kind, list):
        return " | ".join(str(k) for k in kind)
    if kind is None:
        return "any"
    return f"{kind} ({schema['format']})" if "format" in schema else str(kind)


def num(value: Any) -> str:
    """The OpenAPI models write bounds as floats (0.0); JSON Schema reads 0.0 as 0."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def constraints(schema: dict[str, Any]) -> str:
    parts: list[str] = []
    for key in ("oneOf", "anyOf"):
        for sub in schema.get(key, []):
            if c := constraints(sub):
                parts.append(c)
    if "minimum" in schema or "maximum" in schema:
        parts.append(f"{num(schema.get('minimum', ''))}..{num(schema.get('maximum', ''))}")
    if "exclusiveMinimum" in schema:
        parts.append(f"> {num(schema['exclusiveMinimum'])}")
    if "minLength" in schema or "maxLength" in schema:
        parts.append(f"length {schema.get('minLength', 0)}..{schema.get('maxLength', '')}")
    if "maxItems" in schema:
        parts.append(f"at most {schema['maxItems']} items")
    if "maxProperties" in schema:
        parts.append(f"at most {schema['maxProperties']} entries")
    if "pattern" in schema:
        parts.append(f"matches `{schema['pattern']}`")
    if "propertyNames" in schema:
        parts.append(f"keys: {constraints(schema['propertyNames'])}")
    if isinstance(schema.get("additionalProperties"), dict) and (c := constraints(schema["additionalProperties"])):
        parts.append(f"values: {c}")
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict) and (c := constraints(schema["items"])):
        parts.append(f"each: {c}")
    if "default" in schema:
        parts.append(f"default `{json.dumps(schema['default'])}`")
    return "; ".join(parts)


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def operation_section(path: str, method: str, op: dict[str, Any]) -> list[str]:
    out = [f"### `{method.upper()} {path}`", "", f"`{op['operationId']}`: {op.get('summary', '')}", ""]
    if op.get("description"):
        out += [op["description"].strip(), ""]
    roles = op.get("x-roles")
    out.append(f"- **Roles:** {', '.join(roles)}" if roles else "- **Roles:** none (no token needed)")
    params = op.get("parameters", [])
    if params:
        out.append("- **Parameters:**")
        for p in params:
            req = "required" if p.get("required") else "optional"
            desc = f": {p['description']}" if p.get("description") else ""
            extra = constraints(p.get("schema", {}))
            extra = f" ({extra})" if extra else ""
            out.append(f"  - `{p['name']}` ({p['in']}, {req}) {type_of(p.get('schema', {}))}{extra}{desc}")
    body = op.get("requestBody")
    if body:
        (media, content), = body["content"].items()
        out.append(f"- **Body** (`{media}`): {type_of(content['schema'])}")
    replies = []
    problems = []
    for status, response in sorted(op["responses"].items()):
        if int(status) >= 400:
            codes = ", ".join(f"`{c}`" for c in response.get("x-problem-codes", []))
            problems.append(f"`{status}` {codes}")
            continue
        content = response.get("content", {})
        what = "; ".join(f"{type_of(c.get('schema', {}))} (`{m}`)" for m, c in content.items()) or "no body"
        desc = response.get("description", "")
        note = f": {desc}" if desc and desc != "Successful Response" else ""
        replies.append(f"  - `{status}` {what}{note}")
    out.append("- **Replies:**")
    out += replies
    if problems:
        out.append(f"- **Problems:** {'; '.join(problems)}")
    out.append("")
    return out


def schema_section(name: str, schema: dict[str, Any]) -> list[str]:
    out = [f"### {name}", ""]
    if schema.get("description"):
        out += [cell(schema["description"].strip()), ""]
    if "oneOf" in schema:
        out += [f"One of: {type_of(schema)}", ""]
        return out
    props = schema.get("properties", {})
    if not props:
        out += [f"{type_of(schema)}" + (f" ({constraints(schema)})" if constraints(schema) else ""), ""]
        return out
    required = set(schema.get("required", []))
    out += ["| field | type | required | constraints |", "|---|---|---|---|"]
    for field, prop in props.items():
        desc = f" {prop['description']}" if prop.get("description") else ""
        out.append(
            f"| `{field}` | {cell(type_of(prop))} | {'yes' if field in required else 'no'} "
            f"| {cell(constraints(prop) + desc)} |"
        )
    if schema.get("additionalProperties") is False:
        out.append("")
        out.append("Other fields are refused.")
    out.append("")
    return out


def render(spec: dict[str, Any]) -> str:
    out = [INTRO]
    ops = [
        (path, method, op)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]
    out += ["## Operations", "", "| method and path | operation | roles | what |", "|---|---|---|---|"]
    for path, method, op in ops:
        link = anchor(f"{method} {path}")
        out.append(
            f"| [`{method.upper()} {path}`](#{link}) | `{op['operationId']}` "
            f"| {cell(', '.join(op.get('x-roles', [])) or 'none')} | {cell(op.get('summary', ''))} |"
        )
    out.append("")
    tags: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, method, op in ops:
        tags.setdefault((op.get("tags") or ["other"])[0], []).append((path, method, op))
    for tag, tag_ops in tags.items():
        out += [f"## {tag.capitalize()}", ""]
        for path, method, op in tag_ops:
            out += operation_section(path, method, op)
    codes = spec.get("x-problem-codes", {})
    if codes:
        out += ["## Problem codes", "", "| code | status | when |", "|---|---|---|"]
        for code, (statuses, when) in codes.items():
            out.append(f"| `{code}` | {', '.join(str(s) for s in statuses)} | {cell(when)} |")
        out.append("")
    out += ["## Schemas", ""]
    for name, schema in sorted(spec.get("components", {}).get("schemas", {}).items()):
        out += schema_section(name, schema)
    return "\n".join(out).rstrip() + "\n"


def current_spec() -> dict[str, Any]:
    from service.app import create_app
    from service.config import Settings

    # Only to read its schema: no database is opened and no token is needed.
    app = create_app(Settings(database_url="sqlite://", admin_token=None))
    return app.openapi()


def main(argv: list[str]) -> int:
    text = render(current_spec())
    if "--check" in argv:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python docs/generate_api_md.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
