"""Hooks the schemathesis run in tests/contract/test_fuzz.py loads (SCHEMATHESIS_HOOKS).

They shape the budget and the data, never a check; each value stays what the schema allows:

- ``GET /v1/events`` long-polls for up to ``wait`` seconds (30 at most) when nothing is new: real
  time the run cannot spend on every case. A valid ``wait`` above WAIT_S is sent as WAIT_S.
- ``POST /v1/vms``: API.md answers the same ``Idempotency-Key`` with another body 422
  (``idempotency_key_reused``); the fuzzer draws keys from a small alphabet and reuses them across
  bodies. A valid key is sent bound to its body (key + digest), so a repeat is a true replay (200).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import MutableMapping
from typing import Any

import schemathesis

WAIT_S = 0.05


def _clamp_wait(case: Any) -> None:
    wait = case.query.get("wait") if isinstance(case.query, dict) else None
    try:
        seconds = float(wait)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return
    if WAIT_S < seconds <= 30:
        case.query["wait"] = WAIT_S


def _bind_idempotency_key(case: Any) -> None:
    headers = case.headers
    if not isinstance(headers, MutableMapping):
        return
    name = next((h for h in headers if h.lower() == "idempotency-key"), None)
    key = headers[name] if name else None
    if not isinstance(key, str) or not 1 <= len(key) <= 200 or not key.isprintable() or not key.isascii():
        return
    digest = hashlib.sha256(json.dumps(case.body, sort_keys=True, default=str).encode()).hexdigest()[:16]
    headers[name] = f"{key}-{digest}"


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if case.operation.path == "/v1/events":
        _clamp_wait(case)
    elif case.operation.path == "/v1/vms" and case.operation.method.upper() == "POST":
        _bind_idempotency_key(case)
