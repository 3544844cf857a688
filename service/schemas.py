"""Validation types shared by every resource's schemas.

Each type's JSON Schema (in /openapi.json) states the same rule the server applies, so a client
validating against the schema and the server agree on every value.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    StringConstraints,
    WithJsonSchema,
)

DNS_LABEL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
# Kubernetes-style keys (optional DNS-subdomain prefix and "/", then a name of <= 63 characters),
# at most 253 characters in all (the stored column); values of <= 63 characters, possibly empty.
LABEL_KEY_PATTERN = r"^([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$"
LABEL_VALUE_PATTERN = r"^([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$"
LABEL_KEY_MAX = 253
LABEL_VALUE_MAX = 63
MAX_LABELS = 64
LABEL_KEY = re.compile(LABEL_KEY_PATTERN)
LABEL_VALUE = re.compile(LABEL_VALUE_PATTERN)

Name = Annotated[StrictStr, StringConstraints(pattern=DNS_LABEL, min_length=1, max_length=63)]

# Free text a person reads (kernel log lines, a VM's status detail): no control characters but
# tab, newline and carriage return. NUL in particular: PostgreSQL cannot store it in text.
TEXT_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
# One line a person reads (a description, a kernel release, a version, a header value): no control
# characters at all. Patterns are whole-string matches (pydantic's regex engine, and JSON Schema's,
# anchor "$" at the very end; Python's re is used with fullmatch, since its "$" also matches before
# a final newline).
LINE_PATTERN = r"^[^\x00-\x1f\x7f]*$"



def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels")
    for key, value in labels.items():
        # fullmatch: "$" alone would also match before a trailing newline
        if len(key) > LABEL_KEY_MAX or not LABEL_KEY.fullmatch(key):
            raise ValueError(f"label key {key!r} is not a valid key (prefix/name, name <= 63 chars, <= 253 in all)")
        if not LABEL_VALUE.fullmatch(value):
            raise ValueError(f"label value {value!r} for {key!r} is not valid (<= 63 chars, alphanumeric ends)")
    return labels


LABELS_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "maxProperties": MAX_LABELS,
    "propertyNames": {"type": "string", "pattern": LABEL_KEY_PATTERN, "maxLength": LABEL_KEY_MAX},
    "additionalProperties": {"type": "string", "pattern": LABEL_VALUE_PATTERN, "maxLength": LABEL_VALUE_MAX},
}
Labels = Annotated[dict[str, str], AfterValidator(_check_labels), WithJsonSchema(LABELS_JSON_SCHEMA)]


def _integral(value: Any) -> Any:
    """JSON has one number type: 2.0 is the integer 2 (as JSON Schema's "integer" says). Strings,
    booleans and fractions stay refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Integers are strict ("8", 8.5 or true is a type error) but 8.0 is 8. IntegralFloat goes last in
# the Annotated, after the bounds, so that the published schema keeps minimum and maximum.
IntegralFloat = BeforeValidator(_integral)
Count = Annotated[StrictInt, Field(ge=0, le=2**31 - 1), IntegralFloat]
PositiveCount = Annotated[StrictInt, Field(ge=1, le=2**31 - 1), IntegralFloat]
MiB = Annotated[StrictInt, Field(ge=1, le=2**50), IntegralFloat]


class StrictModel(BaseModel):
    """Request bodies: unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")


Flag = StrictBool

# A host's vCPU over-commit (cpu_allocation_ratio, TDX_CPU_ALLOCATION_RATIO). Below 0.1 a host would
# offer under a tenth of its CPUs, which reserved_vcpus or schedulable: false say plainly; values
# such as 5e-324 are typing accidents that silently make a host unusable. 64 is far beyond any sane
# over-commit (TDs are usually not over-committed at all).
MIN_CPU_RATIO = 0.1
MAX_CPU_RATIO = 64.0
