"""Keyset (cursor) pagination: pages stay correct while rows are inserted, no OFFSET scans.

A cursor is the last key of the previous page, opaque to clients. A route reads it back as the key
its list is ordered by (``after_name``, ``after_seq``, ``after_uuid``), so that a cursor a client
made up (a huge number, a NUL, not a UUID) is refused with 400 ``invalid_cursor`` before it reaches
the database, which would fail on it (a 500).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from typing import Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel

from service.errors import ProblemError
from service.schemas import DNS_LABEL

T = TypeVar("T")

MAX_LIMIT = 500
MAX_SEQ = 2**63 - 1  # BIGINT
_NAME = re.compile(DNS_LABEL)
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
        raise invalid_cursor() from exc


def invalid_cursor() -> ProblemError:
    return ProblemError(400, "invalid_cursor", "cursor is not one this server issued")


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

    def after_name(self) -> str | None:
        """Lists ordered by a DNS-label name (hosts, projects)."""
        key = self.after()
        if key is None or (isinstance(key, str) and _NAME.fullmatch(key)):
            return key
        raise invalid_cursor()

    def after_seq(self) -> int | None:
        """Lists ordered by a BIGINT sequence number (loads)."""
        key = self.after()
        if key is None or (type(key) is int and 0 < key <= MAX_SEQ):  # bool is an int, and no key
            return key
        raise invalid_cursor()

    def after_uuid(self) -> str | None:
        """Lists ordered by a UUID (VMs, tokens, operations): its canonical text."""
        key = self.after()
        if key is None:
            return None
        if isinstance(key, str) and len(key) == 36:
            try:
                return str(uuid.UUID(key))
            except ValueError:
                pass
        raise invalid_cursor()
