"""Validation types shared by every resource's schemas."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, StringConstraints

DNS_LABEL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
LABEL_KEY = re.compile(r"^([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$")

Name = Annotated[StrictStr, StringConstraints(pattern=DNS_LABEL, min_length=1, max_length=63)]


def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > 64:
        raise ValueError("at most 64 labels")
    for key, value in labels.items():
        if not LABEL_KEY.match(key):
            raise ValueError(f"label key {key!r} is not a valid key (prefix/name, name <= 63 chars)")
        if not LABEL_VALUE.match(value):
            raise ValueError(f"label value {value!r} for {key!r} is not valid (<= 63 chars, alphanumeric ends)")
    return labels


Labels = Annotated[dict[str, str], AfterValidator(_check_labels)]
# Numbers and booleans are strict: "8" or 8.0 for a count, or "true" for a flag, is a type error.
Count = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
PositiveCount = Annotated[StrictInt, Field(ge=1, le=2**31 - 1)]
MiB = Annotated[StrictInt, Field(ge=1, le=2**50)]


class StrictModel(BaseModel):
    """Request bodies: unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")


Flag = StrictBool
