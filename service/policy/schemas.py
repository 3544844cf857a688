"""Fleet policy bodies (API.md, Fleet policy and operations)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr

from service.policy.versions import MAX_PARTS, VERSION_PATTERN, is_version
from service.schemas import IntegralFloat, StrictModel


def _dotted(value: str) -> str:
    text = value.strip()
    if not is_version(text):
        raise ValueError(f"a dotted numeric version like 1.5.10 (1 to {MAX_PARTS} numbers of up to 10 digits)")
    return text


ModuleVersionFloor = Annotated[StrictStr, Field(max_length=64, pattern=VERSION_PATTERN), AfterValidator(_dotted)]


class PolicyUpdate(StrictModel):
    """``PUT /v1/policy``: the fields given are set, the others keep their values. ``null`` means no
    floor for ``tdx_min_module_version`` and the server's default setting for the numbers."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"tdx_min_module_version": "1.5.10", "max_td_builds_per_host": 4}]},
    )

    tdx_min_module_version: ModuleVersionFloor | None = None
    max_td_builds_per_host: Annotated[StrictInt, Field(ge=1, le=10_000), IntegralFloat] | None = None
    td_memory_overhead_mib: Annotated[StrictInt, Field(ge=0, le=2**20), IntegralFloat] | None = None


class PolicyDefaults(BaseModel):
    max_td_builds_per_host: int
    td_memory_overhead_mib: int


class PolicyOut(BaseModel):
    # A TDX VM goes only to hosts whose TDX module version is at least this; null: no floor.
    tdx_min_module_version: str | None
    # TDs per host in scheduled (placed, not yet running) at once.
    max_td_builds_per_host: int
    # Memory charged to a host per TD on top of the TD's own.
    td_memory_overhead_mib: int
    # The server's settings the numbers fall back to when set to null.
    defaults: PolicyDefaults
    generation: int
    updated_at: datetime | None
