"""Keyset (cursor) pagination: pages stay correct while rows are inserted, no OFFSET scans."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel

from service.errors import ProblemError

T = TypeVar("T")

MAX_LIMIT = 500
DEFAULT_LIMIT = 100


class Page(BaseModel, Generic[T]):
    items: list[T]
    next: str | None


def encode_cursor(key: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(key, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> Any:
    if cursor is None:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise ProblemError(400, "invalid_cursor", "cursor is not one this server issued") from exc


class PageParams:
    def __init__(
        self,
        limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
        cursor: str | None = Query(None, max_length=512),
    ) -> None:
        self.limit = limit
        self.cursor = cursor

    def after(self) -> Any:
        return decode_cursor(self.cursor)
