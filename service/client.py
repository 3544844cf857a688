"""Typed Python client for the control plane's HTTP API (API.md): sync ``TdxClient`` and async ``AsyncTdxClient``.

Both clients share everything but the I/O: each endpoint is described once as a ``_Call`` (method,
path, query, body, headers, whether a retry is safe, how to read the answer) by the ``_calls``
builders; the clients only send calls, retry them and page through lists.

Retries: a failure to connect means the request never left, so every call is retried then. After
the request may have reached the server (a read error, a lost connection, a 502/503/504), only
idempotent calls are retried: GETs, PATCH, DELETE, drain, load reports, heartbeats, VM status
reports, and VM creation, which carries an ``Idempotency-Key`` generated once per call and
reused by its retries, so the server answers a replay with the same VM.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Generic, Literal, NamedTuple, NotRequired, Self, TypedDict, TypeVar, cast
from urllib.parse import quote

import httpx
from typing_extensions import Unpack

__all__ = [
    "ENDED_VM_STATUSES",
    "NOT_ENDED_VM_STATUSES",
    "ApiError",
    "AsyncTdxClient",
    "BadRequest",
    "Candidate",
    "Capacity",
    "ClientError",
    "Conflict",
    "ConnectionFailed",
    "Event",
    "EventPage",
    "Forbidden",
    "HeartbeatObservations",
    "Host",
    "HostFilter",
    "HostOptions",
    "HostPatch",
    "Load",
    "LoadReceipt",
    "LoadReport",
    "NotFound",
    "Page",
    "PreconditionFailed",
    "Preview",
    "ProjectUsage",
    "Quota",
    "QuotaExceeded",
    "QuotaLimits",
    "RateLimited",
    "ServerError",
    "TaggedHost",
    "TdxClient",
    "Token",
    "TokenCreated",
    "Unauthorized",
    "ValidationFailed",
    "Vm",
    "VmFilter",
    "VmOptions",
    "WhoAmI",
]

T = TypeVar("T")

TdxState = Literal["unknown", "unsupported", "disabled", "failed", "ready"]
VmStatus = Literal["pending", "scheduled", "running", "deleting", "deleted", "failed", "lost"]
# A VM in one of these will not change any more: lists of "current" VMs leave them out.
ENDED_VM_STATUSES: tuple[VmStatus, ...] = ("deleted", "failed", "lost")
NOT_ENDED_VM_STATUSES: tuple[VmStatus, ...] = ("pending", "scheduled", "running", "deleting")
Role = Literal["admin", "reader", "agent", "client"]

# ---- API objects ------------------------------------------------------------------------------


class Page(TypedDict, Generic[T]):
    items: list[T]
    next: str | None


class TdxInfo(TypedDict):
    state: TdxState
    reason: str | None
    reason_code: NotRequired[str | None]
    remedy: NotRequired[str | None]
    keyids_total: int
    keyids_used: int
    keyids_observed_in_use: int | None
    keyids_free: NotRequired[int]
    module_version: str | None
    module_healthy: NotRequired[bool | None]
    configured: NotRequired[bool | None]
    next_load: NotRequired[str | None]
    pamt_mib: NotRequired[int]
    tds_building: NotRequired[int]
    attestation_ready: NotRequired[bool | None]
    vmm: NotRequired[Literal["supported", "unsupported", "unknown"] | None]
    vmm_detail: NotRequired[str | None]


class LoadRef(TypedDict):
    id: str
    boot_id: str
    kernel: str
    reported_at: str


class Usage(TypedDict):
    vcpus: int
    memory_mib: int
    vms: int


class Host(TypedDict):
    id: str
    name: str
    labels: dict[str, str]
    vcpus: int
    memory_mib: int
    reserved_vcpus: int
    reserved_memory_mib: int
    cpu_allocation_ratio: NotRequired[float]
    schedulable: bool
    draining: bool
    alive: bool
    last_heartbeat_at: str | None
    tdx: TdxInfo
    load: LoadRef | None
    usage: Usage
    generation: int
    created_at: str
    updated_at: str


class TaggedHost(NamedTuple):
    """A host and its ``ETag``, to pass back as ``if_match`` when patching."""

    host: Host
    etag: str


class LoadReport(TypedDict):
    load_id: str
    boot_id: str
    kernel: str
    kvm_intel_loaded: bool
    tdx_platform: bool
    tdx_requested: bool
    tdx_effective: bool
    keyids_total: int
    module_version: NotRequired[str | None]
    errors: NotRequired[list[str]]
    vcpus: NotRequired[int | None]
    memory_mib: NotRequired[int | None]
    kvm_tdx: NotRequired[bool | None]
    kernel_log: NotRequired[Literal["complete", "rotated", "unreadable"] | None]
    present_cpus: NotRequired[int | None]
    pamt_kb: NotRequired[int | None]


class LoadReceipt(NamedTuple):
    """The answer to a load report: the host, and whether this report recorded a new load (201) or
    the server already had it (200, a replay)."""

    host: Host
    created: bool


class HeartbeatObservations(TypedDict, total=False):
    """What an agent observes under the current load (API.md heartbeat), besides KeyIDs and VMs."""

    module_version: str | None
    module_healthy: bool | None
    tdx_configured: bool | None
    attestation_ready: bool | None
    vmm_tdx: Literal["supported", "unsupported", "unknown"] | None
    vmm_detail: str | None


class RegisteredHost(TypedDict):
    id: str
    name: str
    tdx_state: str


class HostBatchResult(TypedDict):
    created: int
    hosts: list[RegisteredHost]


class Load(TypedDict):
    id: str
    host: str
    boot_id: str
    kernel: str
    kvm_intel_loaded: bool
    tdx_platform: bool
    tdx_requested: bool
    tdx_effective: bool
    keyids_total: int
    module_version: str | None
    errors: list[str]
    vcpus: int | None
    memory_mib: int | None
    kvm_tdx: NotRequired[bool | None]
    kernel_log: NotRequired[str | None]
    present_cpus: NotRequired[int | None]
    tdx_state: TdxState
    tdx_reason: str | None
    tdx_reason_code: NotRequired[str | None]
    tdx_remedy: NotRequired[str | None]
    current: bool
    reported_at: str


class Vm(TypedDict):
    id: str
    name: str
    project: str
    vcpus: int
    memory_mib: int
    tdx: bool
    attestation: NotRequired[bool]
    memory_overhead_mib: NotRequired[int]
    selector: dict[str, str]
    anti_affinity_group: str | None
    priority: int
    status: VmStatus
    status_detail: NotRequired[str | None]
    host: str | None
    explanation: str | None
    reasons: dict[str, int]
    deadline: str
    generation: int
    created_at: str
    updated_at: str


class Candidate(TypedDict):
    host: str
    score: float


class Preview(TypedDict):
    host: str | None
    explanation: str
    reasons: dict[str, int]
    candidates: list[Candidate]
    hosts_considered: NotRequired[int]
    hosts_fit: NotRequired[int]


class StateCapacity(TypedDict):
    hosts: int
    hosts_alive: int
    vcpus_free: float
    memory_mib_free: int
    keyids_total: int
    keyids_used: int
    keyids_free: int
    keyids_stranded: int
    pamt_mib: NotRequired[int]
    tds_building: NotRequired[int]


class Fit(TypedDict):
    vcpus: int
    memory_mib: int
    tdx: bool
    memory_mib_charged: NotRequired[int]
    fits_now: int


class Capacity(TypedDict):
    by_tdx_state: dict[str, StateCapacity]
    totals: StateCapacity
    fit: Fit | None
    td_memory_overhead_mib: NotRequired[int]
    max_td_builds_per_host: NotRequired[int]


class Event(TypedDict):
    id: int
    at: str
    kind: str
    subject: str
    data: dict[str, Any]


class EventPage(TypedDict):
    items: list[Event]
    last_id: int
    head_id: int


class Token(TypedDict):
    id: str
    role: Role
    host: str | None
    project: str | None
    description: str | None
    created_at: str
    revoked_at: str | None


class TokenCreated(Token):
    token: str


class Policy(TypedDict):
    tdx_min_module_version: str | None
    max_td_builds_per_host: int
    td_memory_overhead_mib: int
    defaults: dict[str, int]
    generation: int
    updated_at: str | None


class PolicyUpdate(TypedDict, total=False):
    """``PUT /v1/policy``: the keys given are set (None: no floor / the server's default)."""

    tdx_min_module_version: str | None
    max_td_builds_per_host: int | None
    td_memory_overhead_mib: int | None


class Operation(TypedDict):
    id: str
    kind: str
    host: str
    status: Literal["running", "succeeded", "failed", "canceled"]
    step: str
    detail: str | None
    blocking_vms: list[dict[str, str]]
    blocking_vms_total: int
    reason_code: str | None
    reason: str | None
    remedy: str | None
    history: list[dict[str, str]]
    deadline: str
    generation: int
    created_at: str
    updated_at: str
    finished_at: str | None


class WhoAmI(TypedDict):
    role: Role
    token_id: str
    host: str | None
    project: str | None

class QuotaLimits(TypedDict):
    """A project's limits; None: no limit."""

    vms: int | None
    vcpus: int | None
    memory_mib: int | None
    tdx_vms: int | None


class ProjectUsage(TypedDict):
    """What a project's VMs not yet ended (pending, scheduled, running, deleting) take."""

    vms: int
    vcpus: int
    memory_mib: int
    tdx_vms: int


class Quota(TypedDict):
    project: str
    limits: QuotaLimits
    usage: ProjectUsage
    generation: int


# ---- keyword options shared by both clients ---------------------------------------------------


class HostOptions(TypedDict, total=False):
    labels: Mapping[str, str]
    reserved_vcpus: int
    reserved_memory_mib: int
    cpu_allocation_ratio: float


class HostPatch(HostOptions, total=False):
    schedulable: bool
    draining: bool


class VmOptions(TypedDict, total=False):
    project: str
    selector: Mapping[str, str]
    anti_affinity_group: str
    priority: int
    schedule_timeout_s: int
    attestation: bool


class HostFilter(TypedDict, total=False):
    tdx_state: TdxState | str
    schedulable: bool
    label: Sequence[str] | Mapping[str, str]
    tdx_module_below: str


class VmFilter(TypedDict, total=False):
    status: VmStatus | str | Sequence[str]  # several: any of them
    host: str
    project: str
    tdx: bool


# ---- errors -----------------------------------------------------------------------------------


class ClientError(Exception):
    """Anything this client raises: an error answer (``ApiError``) or no answer (``ConnectionFailed``)."""


class ApiError(ClientError):
    """The server answered with an error; ``code`` is the problem's stable machine-readable code."""

    def __init__(self, status: int, code: str, detail: str, problem: dict[str, Any]) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.problem = problem


class BadRequest(ApiError):
    """400"""


class Unauthorized(ApiError):
    """401: missing, unknown or revoked token."""


class Forbidden(ApiError):
    """403: the token's role may not do this (or, ``QuotaExceeded``, its project's quota)."""


class QuotaExceeded(Forbidden):
    """403 ``quota_exceeded``: the create would take ``resource`` past its project's ``limit``."""

    @property
    def resource(self) -> str:
        return str(self.problem.get("resource", ""))

    @property
    def limit(self) -> int | None:
        value = self.problem.get("limit")
        return int(value) if value is not None else None

    @property
    def usage(self) -> int | None:
        value = self.problem.get("usage")
        return int(value) if value is not None else None

    @property
    def request(self) -> int | None:
        value = self.problem.get("request")
        return int(value) if value is not None else None


class NotFound(ApiError):
    """404"""


class Conflict(ApiError):
    """409: e.g. ``host_name_taken``, ``stale_load``, ``host_not_empty``, ``invalid_transition``."""


class PreconditionFailed(ApiError):
    """412: ``If-Match`` did not match the current generation."""


class ValidationFailed(ApiError):
    """422: ``validation_error`` (see ``errors``) or ``idempotency_key_reused``."""

    @property
    def errors(self) -> list[dict[str, Any]]:
        return list(self.problem.get("errors") or [])


class RateLimited(ApiError):
    """429 ``rate_limited`` (too many requests from this token) or ``too_many_streams`` (too many open
    event streams); ``retry_after`` seconds to wait."""

    retry_after: float | None = None


class ServerError(ApiError):
    """5xx"""


class ConnectionFailed(ClientError):
    """No answer from the server, after the retries this call allowed."""


_ERRORS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    412: PreconditionFailed,
    422: ValidationFailed,
    429: RateLimited,
}
_CODES: dict[str, type[ApiError]] = {"quota_exceeded": QuotaExceeded}


def _seconds(header: str | None) -> float | None:
    try:
        return float(header) if header is not None else None
    except ValueError:
        return None


def error_from_response(response: httpx.Response) -> ApiError:
    """The typed exception for an error answer; tolerates bodies that are not problem documents."""
    try:
        body = response.json()
    except ValueError:
        body = None
    problem: dict[str, Any] = body if isinstance(body, dict) else {}
    status = response.status_code
    code = str(problem.get("code") or f"http_{status}")
    detail = str(problem.get("detail") or response.text[:200] or response.reason_phrase)
    cls = ServerError if status >= 500 else _CODES.get(code) or _ERRORS.get(status, ApiError)
    error = cls(status, code, detail, problem)
    if isinstance(error, RateLimited):
        error.retry_after = _seconds(response.headers.get("Retry-After"))
    return error


# ---- calls: one description per endpoint, shared by both clients ------------------------------

Params = list[tuple[str, str]]


def _json(response: httpx.Response) -> Any:
    return response.json()


def _nothing(_response: httpx.Response) -> None:
    return None


def _receipt(response: httpx.Response) -> LoadReceipt:
    return LoadReceipt(cast(Host, response.json()), response.status_code == 201)


def _tagged(response: httpx.Response) -> TaggedHost:
    return TaggedHost(cast(Host, response.json()), response.headers.get("ETag", ""))


@dataclass(frozen=True)
class _Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Params = field(default_factory=list)
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    idempotent: bool = False
    # Added to the client's timeout (a long-poll holds the answer back this long).
    extra_timeout: float = 0.0

    def with_cursor(self, cursor: str) -> _Call[T]:
        params = [(k, v) for k, v in self.params if k != "cursor"] + [("cursor", cursor)]
        return replace(self, params=params)


def _q(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _params(**values: object) -> Params:
    """Query parameters, skipping ``None``; a sequence becomes a repeated parameter."""
    out: Params = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            out.extend((key, _q(v)) for v in value)
        else:
            out.append((key, _q(value)))
    return out


def _seg(value: object) -> str:
    """One path segment: "/", "?" and "#" in a name or id stay inside it, and "." or ".." are sent
    as such (encoded), not resolved away by the URL."""
    text = quote(str(value), safe="")
    return text.replace(".", "%2E") if text in (".", "..") else text


def _label_params(labels: Sequence[str] | Mapping[str, str] | None) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, Mapping):
        return [f"{k}={v}" for k, v in labels.items()]
    return list(labels)


def _get(path: str, parse: Callable[[httpx.Response], T], params: Params | None = None) -> _Call[T]:
    return _Call("GET", path, parse, params or [], idempotent=True)


def _page(limit: int | None, cursor: str | None) -> Params:
    return _params(limit=limit, cursor=cursor)


def _vm_body(name: str, vcpus: int, memory_mib: int, tdx: bool, options: VmOptions) -> dict[str, Any]:
    return {"name": name, "vcpus": vcpus, "memory_mib": memory_mib, "tdx": tdx, **_options(options)}


def _etag(value: str | int | None) -> str | None:
    """An If-Match value from a generation (``3``) or an ETag as the server sent it (``"3"``)."""
    if value is None:
        return None
    text = str(value)
    return text if text.startswith(('"', "W/")) or text == "*" else f'"{text}"'


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in options.items() if v is not None}


class _calls:
    """The endpoint builders, read as ``_calls.get_host(name)``."""

    @staticmethod
    def create_token(
        role: Role | str, host: str | None, project: str | None, description: str | None
    ) -> _Call[TokenCreated]:
        body = _options({"role": role, "host": host, "project": project, "description": description})
        return _Call("POST", "/v1/tokens", _json, body=body)

    @staticmethod
    def list_tokens(limit: int | None, cursor: str | None) -> _Call[Page[Token]]:
        return _get("/v1/tokens", _json, _page(limit, cursor))

    @staticmethod
    def revoke_token(token_id: str) -> _Call[None]:
        return _Call("DELETE", f"/v1/tokens/{_seg(token_id)}", _nothing, idempotent=True)

    @staticmethod
    def create_host(name: str, vcpus: int, memory_mib: int, options: HostOptions) -> _Call[Host]:
        body = {"name": name, "vcpus": vcpus, "memory_mib": memory_mib, **_options(options)}
        return _Call("POST", "/v1/hosts", _json, body=body)

    @staticmethod
    def register_hosts(hosts: list[dict[str, Any]]) -> _Call[HostBatchResult]:
        return _Call("POST", "/v1/hosts:batch", _json, body={"hosts": hosts})

    @staticmethod
    def list_hosts(filters: HostFilter, limit: int | None, cursor: str | None) -> _Call[Page[Host]]:
        params = _params(
            tdx_state=filters.get("tdx_state"),
            schedulable=filters.get("schedulable"),
            label=_label_params(filters.get("label")),
            tdx_module_below=filters.get("tdx_module_below"),
        )
        return _get("/v1/hosts", _json, params + _page(limit, cursor))

    @staticmethod
    def get_host(name: str) -> _Call[TaggedHost]:
        return _get(f"/v1/hosts/{_seg(name)}", _tagged)

    @staticmethod
    def patch_host(name: str, patch: HostPatch, if_match: str | None) -> _Call[Host]:
        headers = {"If-Match": if_match} if if_match is not None else {}
        path = f"/v1/hosts/{_seg(name)}"
        return _Call("PATCH", path, _json, body=_options(patch), headers=headers, idempotent=True)

    @staticmethod
    def delete_host(name: str) -> _Call[None]:
        return _Call("DELETE", f"/v1/hosts/{_seg(name)}", _nothing, idempotent=True)

    @staticmethod
    def drain_host(name: str) -> _Call[Host]:
        return _Call("POST", f"/v1/hosts/{_seg(name)}/drain", _json, idempotent=True)

    @staticmethod
    def report_load(host: str, body: Mapping[str, Any]) -> _Call[Host]:
        # The server answers a repeated load_id with the host, unchanged: safe to retry.
        return _Call("POST", f"/v1/hosts/{_seg(host)}/loads", _json, body=dict(body), idempotent=True)

    @staticmethod
    def submit_load(host: str, body: Mapping[str, Any]) -> _Call[LoadReceipt]:
        return _Call("POST", f"/v1/hosts/{_seg(host)}/loads", _receipt, body=dict(body), idempotent=True)

    @staticmethod
    def list_loads(host: str, limit: int | None, cursor: str | None) -> _Call[Page[Load]]:
        return _get(f"/v1/hosts/{_seg(host)}/loads", _json, _page(limit, cursor))

    @staticmethod
    def heartbeat(
        host: str,
        load_id: str | uuid.UUID,
        keyids_in_use: int | None,
        running_vms: Sequence[str | uuid.UUID] | None,
        observations: HeartbeatObservations,
    ) -> _Call[Host]:
        body: dict[str, Any] = {"load_id": str(load_id)}
        if keyids_in_use is not None:
            body["keyids_in_use"] = keyids_in_use
        if running_vms is not None:
            body["running_vms"] = [str(v) for v in running_vms]
        body.update(observations)
        return _Call("POST", f"/v1/hosts/{_seg(host)}/heartbeat", _json, body=body, idempotent=True)

    @staticmethod
    def host_vms(
        host: str, status: VmStatus | str | Sequence[str] | None, limit: int | None, cursor: str | None
    ) -> _Call[Page[Vm]]:
        statuses = [status] if isinstance(status, str) else status
        return _get(f"/v1/hosts/{_seg(host)}/vms", _json, _params(status=statuses) + _page(limit, cursor))

    @staticmethod
    def create_vm(
        name: str, vcpus: int, memory_mib: int, tdx: bool, options: VmOptions, idempotency_key: str | None
    ) -> _Call[Vm]:
        key = idempotency_key or str(uuid.uuid4())
        body = _vm_body(name, vcpus, memory_mib, tdx, options)
        return _Call("POST", "/v1/vms", _json, body=body, headers={"Idempotency-Key": key}, idempotent=True)

    @staticmethod
    def list_vms(filters: VmFilter, limit: int | None, cursor: str | None) -> _Call[Page[Vm]]:
        status = filters.get("status")
        statuses = None if status is None else [status] if isinstance(status, str) else list(status)
        params = _params(status=statuses, host=filters.get("host"), project=filters.get("project"),
                         tdx=filters.get("tdx"))
        return _get("/v1/vms", _json, params + _page(limit, cursor))

    @staticmethod
    def whoami() -> _Call[WhoAmI]:
        return _get("/v1/whoami", _json)

    @staticmethod
    def get_vm(vm_id: str | uuid.UUID) -> _Call[Vm]:
        return _get(f"/v1/vms/{_seg(vm_id)}", _json)

    @staticmethod
    def delete_vm(vm_id: str | uuid.UUID) -> _Call[Vm]:
        return _Call("DELETE", f"/v1/vms/{_seg(vm_id)}", _json, idempotent=True)

    @staticmethod
    def report_vm_status(vm_id: str | uuid.UUID, status: str, detail: str | None) -> _Call[Vm]:
        # A repeated report of the status the VM already has changes nothing on the server.
        body = _options({"status": status, "detail": detail})
        return _Call("POST", f"/v1/vms/{_seg(vm_id)}/status", _json, body=body, idempotent=True)

    @staticmethod
    def preview(name: str, vcpus: int, memory_mib: int, tdx: bool, options: VmOptions) -> _Call[Preview]:
        body = _vm_body(name, vcpus, memory_mib, tdx, options)
        return _Call("POST", "/v1/schedule/preview", _json, body=body, idempotent=True)

    @staticmethod
    def capacity(vcpus: int | None, memory_mib: int | None, tdx: bool | None) -> _Call[Capacity]:
        return _get("/v1/capacity", _json, _params(vcpus=vcpus, memory_mib=memory_mib, tdx=tdx))

    @staticmethod
    def list_events(
        after: int | None, kind: str | Sequence[str] | None, subject: str | None, limit: int | None,
        wait: float | None,
    ) -> _Call[EventPage]:
        kinds = [kind] if isinstance(kind, str) else kind
        params = _params(after=after, kind=kinds, subject=subject, limit=limit, wait=wait)
        return _Call("GET", "/v1/events", _json, params, idempotent=True, extra_timeout=wait or 0.0)

    @staticmethod
    def get_quota(project: str) -> _Call[Quota]:
        return _get(f"/v1/projects/{project}/quota", _json)

    @staticmethod
    def set_quota(project: str, limits: QuotaLimits, if_match: str | None) -> _Call[Quota]:
        # Without If-Match a repeated PUT leaves the same limits: safe to retry. With it, the first
        # attempt's success would make the retry fail, so it is not retried.
        headers = {"If-Match": if_match} if if_match is not None else {}
        return _Call(
            "PUT", f"/v1/projects/{project}/quota", _json, body=dict(limits), headers=headers,
            idempotent=if_match is None,
        )

    @staticmethod
    def list_projects(limit: int | None, cursor: str | None) -> _Call[Page[Quota]]:
        return _get("/v1/projects", _json, _page(limit, cursor))

    @staticmethod
    def get_policy() -> _Call[Policy]:
        return _get("/v1/policy", _json)

    @staticmethod
    def put_policy(update: PolicyUpdate) -> _Call[Policy]:
        return _Call("PUT", "/v1/policy", _json, body=dict(update), idempotent=True)

    @staticmethod
    def start_opt_in(host: str, timeout_s: int | None) -> _Call[Operation]:
        body = {"timeout_s": timeout_s} if timeout_s is not None else None
        return _Call("POST", f"/v1/hosts/{_seg(host)}/tdx-opt-in", _json, body=body)

    @staticmethod
    def get_operation(op_id: str | uuid.UUID) -> _Call[Operation]:
        return _get(f"/v1/operations/{_seg(op_id)}", _json)

    @staticmethod
    def list_operations(
        status: str | None, host: str | None, limit: int | None, cursor: str | None
    ) -> _Call[Page[Operation]]:
        return _get("/v1/operations", _json, _params(status=status, host=host) + _page(limit, cursor))

    @staticmethod
    def cancel_operation(op_id: str | uuid.UUID) -> _Call[Operation]:
        return _Call("POST", f"/v1/operations/{_seg(op_id)}/cancel", _json)

    @staticmethod
    def healthz() -> _Call[dict[str, str]]:
        return _get("/healthz", _json)


# ---- retries and the event stream: decisions shared by both clients ---------------------------

_RETRY_STATUSES = frozenset({502, 503, 504})


@dataclass
class _Retry:
    retries: int
    backoff: float
    attempt: int = 0

    def delay(self) -> float:
        base: float = self.backoff * (2 ** (self.attempt - 1))
        return float(min(base, 5.0) * random.uniform(0.5, 1.0))

    def after_error(self, call: _Call[Any], exc: httpx.TransportError) -> float:
        """The pause before the next attempt, or raise ``ConnectionFailed``."""
        self.attempt += 1
        never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
        if self.attempt > self.retries or not (never_sent or call.idempotent):
            raise ConnectionFailed(f"{call.method} {call.path}: {type(exc).__name__}: {exc}") from exc
        return self.delay()

    def after_answer(self, call: _Call[Any], response: httpx.Response) -> float | None:
        """The pause before another attempt, or None to take this answer."""
        if response.status_code not in _RETRY_STATUSES or not call.idempotent or self.attempt >= self.retries:
            return None
        self.attempt += 1
        return self.delay()


def _result(call: _Call[T], response: httpx.Response) -> T:
    if response.status_code >= 400:
        raise error_from_response(response)
    return call.parse(response)


class _SseParser:
    """Server-Sent Events, line by line (text/event-stream): dispatches on a blank line."""

    def __init__(self) -> None:
        self.event_id: str | None = None
        self.retry_ms: int | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.event_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Event | None:
        if not self._data:
            return None
        payload = "\n".join(self._data)
        self._data = []
        return cast(Event, json.loads(payload))


@dataclass
class _Watch:
    """Where a watch is in the log, and when to reconnect after its stream ends."""

    after: int
    kinds: list[str] | None
    subject: str | None
    retries: int
    backoff: float
    failures: int = 0
    retry_s: float = 1.0

    def request(self) -> tuple[tuple[tuple[str, str], ...], dict[str, str]]:
        params = tuple(_params(after=self.after, kind=self.kinds, subject=self.subject))
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(self.after)}
        return params, headers

    def connected(self) -> _SseParser:
        self.failures = 0
        return _SseParser()

    def accept(self, parser: _SseParser, line: str) -> Event | None:
        event = parser.feed(line)
        if parser.retry_ms is not None:
            self.retry_s = min(parser.retry_ms / 1000.0, 30.0)
        if event is None or event["id"] <= self.after:
            return None
        self.after = event["id"]
        return event

    def ended(self) -> float:
        return self.retry_s

    def failed(self, reason: str) -> float:
        self.failures += 1
        if self.failures > self.retries:
            raise ConnectionFailed(f"event stream: {reason}")
        return float(max(self.retry_s, self.backoff * 2 ** (self.failures - 1)))


def _kinds(kind: str | Sequence[str] | None) -> list[str] | None:
    return [kind] if isinstance(kind, str) else (list(kind) if kind is not None else None)


@dataclass(frozen=True)
class _Config:
    base_url: str
    headers: dict[str, str]
    timeout: float
    retries: int
    backoff: float
    stream_read_timeout: float

    @classmethod
    def make(cls, server: str, token: str, timeout: float, retries: int, backoff: float) -> _Config:
        headers = {"Authorization": f"Bearer {token}", "User-Agent": "tdx-client/1", "Accept": "application/json"}
        # The stream sends a keepalive every 15 s: silence far beyond that means the connection is gone.
        return cls(server.rstrip("/"), headers, timeout, retries, backoff, max(timeout, 45.0))

    def request_timeout(self, call: _Call[Any]) -> float:
        return self.timeout + call.extra_timeout

    def stream_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, read=self.stream_read_timeout)


# ---- the sync client --------------------------------------------------------------------------


class TdxClient:
    """Sync client. ``with TdxClient(server, token) as c: c.list_hosts()``."""

    def __init__(
        self,
        server: str,
        token: str,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.1,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._cfg = _Config.make(server, token, timeout, retries, backoff)
        self._http = httpx.Client(
            base_url=self._cfg.base_url, headers=self._cfg.headers, timeout=timeout, transport=transport
        )

    @property
    def server(self) -> str:
        return self._cfg.base_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, call: _Call[T]) -> T:
        retry = _Retry(self._cfg.retries, self._cfg.backoff)
        while True:
            try:
                response = self._http.request(
                    call.method, call.path, params=tuple(call.params), json=call.body, headers=call.headers,
                    timeout=self._cfg.request_timeout(call),
                )
            except httpx.TransportError as exc:
                time.sleep(retry.after_error(call, exc))
                continue
            pause = retry.after_answer(call, response)
            if pause is None:
                return _result(call, response)
            time.sleep(pause)

    def _pages(self, call: _Call[Page[T]]) -> Iterator[T]:
        while True:
            page = self._send(call)
            yield from page["items"]
            if not page["next"]:
                return
            call = call.with_cursor(page["next"])

    # tokens
    def create_token(
        self, role: Role | str, *, host: str | None = None, project: str | None = None, description: str | None = None
    ) -> TokenCreated:
        return self._send(_calls.create_token(role, host, project, description))

    def list_tokens(self, *, limit: int | None = None, cursor: str | None = None) -> Page[Token]:
        return self._send(_calls.list_tokens(limit, cursor))

    def iter_tokens(self, *, limit: int | None = None) -> Iterator[Token]:
        return self._pages(_calls.list_tokens(limit, None))

    def revoke_token(self, token_id: str | uuid.UUID) -> None:
        self._send(_calls.revoke_token(str(token_id)))

    # hosts
    def create_host(self, name: str, vcpus: int, memory_mib: int, **options: Unpack[HostOptions]) -> Host:
        return self._send(_calls.create_host(name, vcpus, memory_mib, options))

    def list_hosts(
        self, *, limit: int | None = None, cursor: str | None = None, **filters: Unpack[HostFilter]
    ) -> Page[Host]:
        return self._send(_calls.list_hosts(filters, limit, cursor))

    def iter_hosts(self, *, limit: int | None = None, **filters: Unpack[HostFilter]) -> Iterator[Host]:
        return self._pages(_calls.list_hosts(filters, limit, None))

    def get_host(self, name: str) -> TaggedHost:
        return self._send(_calls.get_host(name))

    def patch_host(self, name: str, *, if_match: str | None = None, **patch: Unpack[HostPatch]) -> Host:
        return self._send(_calls.patch_host(name, patch, if_match))

    def delete_host(self, name: str) -> None:
        self._send(_calls.delete_host(name))

    def drain_host(self, name: str) -> Host:
        return self._send(_calls.drain_host(name))

    def register_hosts(self, hosts: list[dict[str, Any]]) -> HostBatchResult:
        """Up to 1,000 host create bodies, each with an optional ``load`` report; all or nothing."""
        return self._send(_calls.register_hosts(hosts))

    def report_load(self, host: str, body: Mapping[str, Any]) -> Host:
        return self._send(_calls.report_load(host, body))

    def submit_load(self, host: str, body: Mapping[str, Any]) -> LoadReceipt:
        """Like ``report_load``, and says whether the report recorded a new load or was a replay."""
        return self._send(_calls.submit_load(host, body))

    def list_loads(self, host: str, *, limit: int | None = None, cursor: str | None = None) -> Page[Load]:
        return self._send(_calls.list_loads(host, limit, cursor))

    def iter_loads(self, host: str, *, limit: int | None = None) -> Iterator[Load]:
        return self._pages(_calls.list_loads(host, limit, None))

    def heartbeat(
        self,
        host: str,
        load_id: str | uuid.UUID,
        keyids_in_use: int | None = None,
        running_vms: Sequence[str | uuid.UUID] | None = None,
        **observations: Unpack[HeartbeatObservations],
    ) -> Host:
        return self._send(_calls.heartbeat(host, load_id, keyids_in_use, running_vms, observations))

    def host_vms(self, host: str, status: VmStatus | str | Sequence[str] | None = None) -> list[Vm]:
        """Every VM assigned to ``host`` (by default the active ones), all pages."""
        return list(self._pages(_calls.host_vms(host, status, None, None)))

    # VMs
    def create_vm(
        self, name: str, vcpus: int, memory_mib: int, tdx: bool, *, idempotency_key: str | None = None,
        **options: Unpack[VmOptions],
    ) -> Vm:
        return self._send(_calls.create_vm(name, vcpus, memory_mib, tdx, options, idempotency_key))

    def list_vms(
        self, *, limit: int | None = None, cursor: str | None = None, **filters: Unpack[VmFilter]
    ) -> Page[Vm]:
        return self._send(_calls.list_vms(filters, limit, cursor))

    def iter_vms(self, *, limit: int | None = None, **filters: Unpack[VmFilter]) -> Iterator[Vm]:
        return self._pages(_calls.list_vms(filters, limit, None))

    def get_vm(self, vm_id: str | uuid.UUID) -> Vm:
        return self._send(_calls.get_vm(vm_id))

    def delete_vm(self, vm_id: str | uuid.UUID) -> Vm:
        return self._send(_calls.delete_vm(vm_id))

    def report_vm_status(self, vm_id: str | uuid.UUID, status: str, detail: str | None = None) -> Vm:
        return self._send(_calls.report_vm_status(vm_id, status, detail))

    # scheduling insight
    def preview(self, name: str, vcpus: int, memory_mib: int, tdx: bool, **options: Unpack[VmOptions]) -> Preview:
        return self._send(_calls.preview(name, vcpus, memory_mib, tdx, options))

    def capacity(
        self, *, vcpus: int | None = None, memory_mib: int | None = None, tdx: bool | None = None
    ) -> Capacity:
        return self._send(_calls.capacity(vcpus, memory_mib, tdx))

    # events
    def list_events(
        self, *, after: int | None = None, kind: str | Sequence[str] | None = None, subject: str | None = None,
        limit: int | None = None, wait: float | None = None,
    ) -> EventPage:
        return self._send(_calls.list_events(after, kind, subject, limit, wait))

    def watch_events(
        self, *, after: int = 0, kind: str | Sequence[str] | None = None, subject: str | None = None
    ) -> Iterator[Event]:
        """Every event after ``after``, forever, each once: reconnects with ``Last-Event-ID``.

        Raises ``ConnectionFailed`` after ``retries`` reconnections in a row fail.
        """
        watch = _Watch(after, _kinds(kind), subject, self._cfg.retries, self._cfg.backoff)
        while True:
            params, headers = watch.request()
            try:
                with self._http.stream(
                    "GET", "/v1/events/stream", params=params, headers=headers, timeout=self._cfg.stream_timeout()
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        if response.status_code not in _RETRY_STATUSES:
                            raise error_from_response(response)
                        pause = watch.failed(f"HTTP {response.status_code}")
                    else:
                        parser = watch.connected()
                        for line in response.iter_lines():
                            event = watch.accept(parser, line)
                            if event is not None:
                                yield event
                        pause = watch.ended()
            except httpx.TransportError as exc:
                pause = watch.failed(f"{type(exc).__name__}: {exc}")
            time.sleep(pause)

    def whoami(self) -> WhoAmI:
        """The role of this client's token, and the host or project it is bound to."""
        return self._send(_calls.whoami())

    # projects and quotas
    def get_quota(self, project: str) -> Quota:
        return self._send(_calls.get_quota(project))

    def set_quota(
        self, project: str, *, vms: int | None = None, vcpus: int | None = None, memory_mib: int | None = None,
        tdx_vms: int | None = None, if_match: str | int | None = None,
    ) -> Quota:
        """Replace ``project``'s limits (None: no limit). ``if_match``: the quota's ``generation``
        the change is based on (412 ``precondition_failed`` if it moved)."""
        limits = QuotaLimits(vms=vms, vcpus=vcpus, memory_mib=memory_mib, tdx_vms=tdx_vms)
        return self._send(_calls.set_quota(project, limits, _etag(if_match)))

    def list_projects(self, *, limit: int | None = None, cursor: str | None = None) -> Page[Quota]:
        return self._send(_calls.list_projects(limit, cursor))

    def iter_projects(self, *, limit: int | None = None) -> Iterator[Quota]:
        return self._pages(_calls.list_projects(limit, None))

    # fleet policy and operations
    def get_policy(self) -> Policy:
        return self._send(_calls.get_policy())

    def put_policy(self, **update: Unpack[PolicyUpdate]) -> Policy:
        """Set the named policy fields; the others keep their values."""
        return self._send(_calls.put_policy(update))

    def start_opt_in(self, host: str, *, timeout_s: int | None = None) -> Operation:
        """Start the guided TDX opt-in of ``host`` (202): cordon, drain, new load, uncordon when ready."""
        return self._send(_calls.start_opt_in(host, timeout_s))

    def get_operation(self, op_id: str | uuid.UUID) -> Operation:
        return self._send(_calls.get_operation(op_id))

    def list_operations(
        self, *, status: str | None = None, host: str | None = None, limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Operation]:
        return self._send(_calls.list_operations(status, host, limit, cursor))

    def iter_operations(
        self, *, status: str | None = None, host: str | None = None, limit: int | None = None
    ) -> Iterator[Operation]:
        return self._pages(_calls.list_operations(status, host, limit, None))

    def cancel_operation(self, op_id: str | uuid.UUID) -> Operation:
        return self._send(_calls.cancel_operation(op_id))

    def healthz(self) -> dict[str, str]:
        return self._send(_calls.healthz())


# ---- the async client -------------------------------------------------------------------------


class AsyncTdxClient:
    """Async client: the same methods as ``TdxClient``, awaited; iterators are async iterators."""

    def __init__(
        self,
        server: str,
        token: str,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.1,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._cfg = _Config.make(server, token, timeout, retries, backoff)
        self._http = httpx.AsyncClient(
            base_url=self._cfg.base_url, headers=self._cfg.headers, timeout=timeout, transport=transport
        )

    @property
    def server(self) -> str:
        return self._cfg.base_url

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _send(self, call: _Call[T]) -> T:
        retry = _Retry(self._cfg.retries, self._cfg.backoff)
        while True:
            try:
                response = await self._http.request(
                    call.method, call.path, params=tuple(call.params), json=call.body, headers=call.headers,
                    timeout=self._cfg.request_timeout(call),
                )
            except httpx.TransportError as exc:
                await asyncio.sleep(retry.after_error(call, exc))
                continue
            pause = retry.after_answer(call, response)
            if pause is None:
                return _result(call, response)
            await asyncio.sleep(pause)

    async def _pages(self, call: _Call[Page[T]]) -> AsyncIterator[T]:
        while True:
            page = await self._send(call)
            for item in page["items"]:
                yield item
            if not page["next"]:
                return
            call = call.with_cursor(page["next"])

    # tokens
    async def create_token(
        self, role: Role | str, *, host: str | None = None, project: str | None = None, description: str | None = None
    ) -> TokenCreated:
        return await self._send(_calls.create_token(role, host, project, description))

    async def list_tokens(self, *, limit: int | None = None, cursor: str | None = None) -> Page[Token]:
        return await self._send(_calls.list_tokens(limit, cursor))

    def iter_tokens(self, *, limit: int | None = None) -> AsyncIterator[Token]:
        return self._pages(_calls.list_tokens(limit, None))

    async def revoke_token(self, token_id: str | uuid.UUID) -> None:
        await self._send(_calls.revoke_token(str(token_id)))

    # hosts
    async def create_host(self, name: str, vcpus: int, memory_mib: int, **options: Unpack[HostOptions]) -> Host:
        return await self._send(_calls.create_host(name, vcpus, memory_mib, options))

    async def list_hosts(
        self, *, limit: int | None = None, cursor: str | None = None, **filters: Unpack[HostFilter]
    ) -> Page[Host]:
        return await self._send(_calls.list_hosts(filters, limit, cursor))

    def iter_hosts(self, *, limit: int | None = None, **filters: Unpack[HostFilter]) -> AsyncIterator[Host]:
        return self._pages(_calls.list_hosts(filters, limit, None))

    async def get_host(self, name: str) -> TaggedHost:
        return await self._send(_calls.get_host(name))

    async def patch_host(self, name: str, *, if_match: str | None = None, **patch: Unpack[HostPatch]) -> Host:
        return await self._send(_calls.patch_host(name, patch, if_match))

    async def delete_host(self, name: str) -> None:
        await self._send(_calls.delete_host(name))

    async def drain_host(self, name: str) -> Host:
        return await self._send(_calls.drain_host(name))

    async def register_hosts(self, hosts: list[dict[str, Any]]) -> HostBatchResult:
        """Up to 1,000 host create bodies, each with an optional ``load`` report; all or nothing."""
        return await self._send(_calls.register_hosts(hosts))

    async def report_load(self, host: str, body: Mapping[str, Any]) -> Host:
        return await self._send(_calls.report_load(host, body))

    async def submit_load(self, host: str, body: Mapping[str, Any]) -> LoadReceipt:
        """Like ``report_load``, and says whether the report recorded a new load or was a replay."""
        return await self._send(_calls.submit_load(host, body))

    async def list_loads(self, host: str, *, limit: int | None = None, cursor: str | None = None) -> Page[Load]:
        return await self._send(_calls.list_loads(host, limit, cursor))

    def iter_loads(self, host: str, *, limit: int | None = None) -> AsyncIterator[Load]:
        return self._pages(_calls.list_loads(host, limit, None))

    async def heartbeat(
        self,
        host: str,
        load_id: str | uuid.UUID,
        keyids_in_use: int | None = None,
        running_vms: Sequence[str | uuid.UUID] | None = None,
        **observations: Unpack[HeartbeatObservations],
    ) -> Host:
        return await self._send(_calls.heartbeat(host, load_id, keyids_in_use, running_vms, observations))

    async def host_vms(self, host: str, status: VmStatus | str | Sequence[str] | None = None) -> list[Vm]:
        return [vm async for vm in self._pages(_calls.host_vms(host, status, None, None))]

    # VMs
    async def create_vm(
        self, name: str, vcpus: int, memory_mib: int, tdx: bool, *, idempotency_key: str | None = None,
        **options: Unpack[VmOptions],
    ) -> Vm:
        return await self._send(_calls.create_vm(name, vcpus, memory_mib, tdx, options, idempotency_key))

    async def list_vms(
        self, *, limit: int | None = None, cursor: str | None = None, **filters: Unpack[VmFilter]
    ) -> Page[Vm]:
        return await self._send(_calls.list_vms(filters, limit, cursor))

    def iter_vms(self, *, limit: int | None = None, **filters: Unpack[VmFilter]) -> AsyncIterator[Vm]:
        return self._pages(_calls.list_vms(filters, limit, None))

    async def get_vm(self, vm_id: str | uuid.UUID) -> Vm:
        return await self._send(_calls.get_vm(vm_id))

    async def delete_vm(self, vm_id: str | uuid.UUID) -> Vm:
        return await self._send(_calls.delete_vm(vm_id))

    async def report_vm_status(self, vm_id: str | uuid.UUID, status: str, detail: str | None = None) -> Vm:
        return await self._send(_calls.report_vm_status(vm_id, status, detail))

    # scheduling insight
    async def preview(
        self, name: str, vcpus: int, memory_mib: int, tdx: bool, **options: Unpack[VmOptions]
    ) -> Preview:
        return await self._send(_calls.preview(name, vcpus, memory_mib, tdx, options))

    async def capacity(
        self, *, vcpus: int | None = None, memory_mib: int | None = None, tdx: bool | None = None
    ) -> Capacity:
        return await self._send(_calls.capacity(vcpus, memory_mib, tdx))

    # events
    async def list_events(
        self, *, after: int | None = None, kind: str | Sequence[str] | None = None, subject: str | None = None,
        limit: int | None = None, wait: float | None = None,
    ) -> EventPage:
        return await self._send(_calls.list_events(after, kind, subject, limit, wait))

    async def watch_events(
        self, *, after: int = 0, kind: str | Sequence[str] | None = None, subject: str | None = None
    ) -> AsyncIterator[Event]:
        """Every event after ``after``, forever, each once (see ``TdxClient.watch_events``)."""
        watch = _Watch(after, _kinds(kind), subject, self._cfg.retries, self._cfg.backoff)
        while True:
            params, headers = watch.request()
            try:
                async with self._http.stream(
                    "GET", "/v1/events/stream", params=params, headers=headers, timeout=self._cfg.stream_timeout()
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        if response.status_code not in _RETRY_STATUSES:
                            raise error_from_response(response)
                        pause = watch.failed(f"HTTP {response.status_code}")
                    else:
                        parser = watch.connected()
                        async for line in response.aiter_lines():
                            event = watch.accept(parser, line)
                            if event is not None:
                                yield event
                        pause = watch.ended()
            except httpx.TransportError as exc:
                pause = watch.failed(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(pause)

    async def whoami(self) -> WhoAmI:
        return await self._send(_calls.whoami())

    # projects and quotas
    async def get_quota(self, project: str) -> Quota:
        return await self._send(_calls.get_quota(project))

    async def set_quota(
        self, project: str, *, vms: int | None = None, vcpus: int | None = None, memory_mib: int | None = None,
        tdx_vms: int | None = None, if_match: str | int | None = None,
    ) -> Quota:
        """Replace ``project``'s limits (see ``TdxClient.set_quota``)."""
        limits = QuotaLimits(vms=vms, vcpus=vcpus, memory_mib=memory_mib, tdx_vms=tdx_vms)
        return await self._send(_calls.set_quota(project, limits, _etag(if_match)))

    async def list_projects(self, *, limit: int | None = None, cursor: str | None = None) -> Page[Quota]:
        return await self._send(_calls.list_projects(limit, cursor))

    def iter_projects(self, *, limit: int | None = None) -> AsyncIterator[Quota]:
        return self._pages(_calls.list_projects(limit, None))

    # fleet policy and operations
    async def get_policy(self) -> Policy:
        return await self._send(_calls.get_policy())

    async def put_policy(self, **update: Unpack[PolicyUpdate]) -> Policy:
        return await self._send(_calls.put_policy(update))

    async def start_opt_in(self, host: str, *, timeout_s: int | None = None) -> Operation:
        return await self._send(_calls.start_opt_in(host, timeout_s))

    async def get_operation(self, op_id: str | uuid.UUID) -> Operation:
        return await self._send(_calls.get_operation(op_id))

    async def list_operations(
        self, *, status: str | None = None, host: str | None = None, limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Operation]:
        return await self._send(_calls.list_operations(status, host, limit, cursor))

    def iter_operations(
        self, *, status: str | None = None, host: str | None = None, limit: int | None = None
    ) -> AsyncIterator[Operation]:
        return self._pages(_calls.list_operations(status, host, limit, None))

    async def cancel_operation(self, op_id: str | uuid.UUID) -> Operation:
        return await self._send(_calls.cancel_operation(op_id))

    async def healthz(self) -> dict[str, str]:
        return await self._send(_calls.healthz())
