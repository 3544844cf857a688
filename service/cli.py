"""``tdxctl``: the operator CLI, built on ``service.client``.

Server and token come from ``--server/--token`` or ``TDX_SERVER``/``TDX_TOKEN``. Every list and
show prints a table (default), a wider table (``-o wide``) or JSON (``-o json``: the API's objects,
one JSON document, a list as a JSON array; never styled or wrapped). Errors print one line on
stderr and exit 1 (the server refused; "no VM x" when the thing does not exist) or 3 (no answer
from the server); usage errors exit 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, NoReturn, cast

import typer
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from service.client import (
    NOT_ENDED_VM_STATUSES,
    ApiError,
    Capacity,
    ConnectionFailed,
    Event,
    Host,
    HostFilter,
    Load,
    Operation,
    Policy,
    PolicyUpdate,
    Preview,
    Quota,
    TdxClient,
    Token,
    Vm,
    VmFilter,
    VmOptions,
)
from service.host_figures import memory_limit_mib, scheduling, vcpu_limit, whole_vcpus

DEFAULT_SERVER = "http://127.0.0.1:8080"
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_ANSWER = 3
NATURAL_WIDTH_CAP = 4096  # columns: past that a table row folds after all

TDX_STYLES = {"ready": "green", "disabled": "yellow", "failed": "red", "unsupported": "dim", "unknown": "magenta"}
VM_STYLES = {
    "running": "green", "scheduled": "cyan", "pending": "yellow", "deleting": "yellow",
    "deleted": "dim", "failed": "red", "lost": "red",
}
SCHEDULING_STYLES = {"schedulable": "green", "cordoned": "yellow", "draining": "yellow", "stale": "red"}


class Output(StrEnum):
    table = "table"
    wide = "wide"
    json = "json"


class TdxStateChoice(StrEnum):
    ready = "ready"
    disabled = "disabled"
    failed = "failed"
    unsupported = "unsupported"
    unknown = "unknown"


class VmStatusChoice(StrEnum):
    pending = "pending"
    scheduled = "scheduled"
    running = "running"
    deleting = "deleting"
    deleted = "deleted"
    failed = "failed"
    lost = "lost"


OutputOpt = Annotated[
    Output, typer.Option("--output", "-o", help="table, wide (more columns) or json (the API objects)")
]


@dataclass(frozen=True)
class Target:
    server: str
    token: str | None


@dataclass(frozen=True)
class Subject:
    """What a command is about, to say "no VM x" when the server does not know it."""

    kind: str
    ident: str


app = typer.Typer(
    name="tdxctl", help="Operate the TDX control plane.", no_args_is_help=True, pretty_exceptions_enable=False
)
hosts_app = typer.Typer(help="Physical hosts and their TDX readiness.", no_args_is_help=True)
vms_app = typer.Typer(help="VM requests and their placement.", no_args_is_help=True)
schedule_app = typer.Typer(help="Scheduling insight.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens (admin).", no_args_is_help=True)
quota_app = typer.Typer(help="Project quotas and usage.", no_args_is_help=True)
policy_app = typer.Typer(help="The fleet's TDX policy.", no_args_is_help=True)
operations_app = typer.Typer(help="Long-running operations (the guided TDX opt-in).", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
app.add_typer(operations_app, name="operations")
app.add_typer(hosts_app, name="hosts")
app.add_typer(vms_app, name="vms")
app.add_typer(schedule_app, name="schedule")
app.add_typer(tokens_app, name="tokens")
app.add_typer(quota_app, name="quota")


@app.callback()
def _global(
    ctx: typer.Context,
    server: Annotated[str, typer.Option(envvar="TDX_SERVER", help="Control plane URL.")] = DEFAULT_SERVER,
    token: Annotated[
        str | None, typer.Option(envvar="TDX_TOKEN", help="API token.", show_default=False)
    ] = None,
) -> None:
    ctx.obj = Target(server, token)


# ---- plumbing ---------------------------------------------------------------------------------


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _is_unknown(exc: ApiError) -> bool:
    """The server does not know the thing named in the path: 404, or a path value it cannot parse
    (a VM id that is no UUID, a host name that is no DNS label): no such thing can exist."""
    if exc.status == 404:
        return True
    errors = exc.problem.get("errors")
    if exc.status != 422 or not isinstance(errors, list) or not errors:
        return False
    return all(isinstance(e, dict) and (e.get("loc") or [None])[0] == "path" for e in errors)


def _field(loc: Sequence[object]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or "request"


def _describe(exc: ApiError) -> str:
    """One line: what the server said, with the field-level reasons of a validation error."""
    errors = exc.problem.get("errors")
    if exc.code == "validation_error" and isinstance(errors, list) and errors:
        reasons = [
            f"{_field(e.get('loc') or [])}: {e.get('msg', '')}" for e in errors[:5] if isinstance(e, dict)
        ]
        detail = "request is not valid: " + "; ".join(reasons)
    else:
        detail = exc.detail
    return f"{' '.join(detail.split())} ({exc.code}, HTTP {exc.status})"


@contextlib.contextmanager
def _client(ctx: typer.Context, about: Subject | None = None) -> Iterator[TdxClient]:
    target: Target = ctx.obj
    if not target.token:
        _fail("no token: give --token or set TDX_TOKEN", EXIT_USAGE)
    if about is not None and "/" in about.ident:
        # Never a name or id, and the server would route it to another resource.
        _fail(f"no {about.kind} {about.ident}", EXIT_API_ERROR)
    try:
        with TdxClient(target.server, target.token) as client:
            yield client
    except ApiError as exc:
        if about is not None and _is_unknown(exc):
            _fail(f"no {about.kind} {about.ident}", EXIT_API_ERROR)
        _fail(_describe(exc), EXIT_API_ERROR)
    except ConnectionFailed as exc:
        _fail(f"no answer from {target.server}: {exc}", EXIT_NO_ANSWER)


def _console() -> Console:
    # Created per call: the console binds to whatever sys.stdout is now (tests swap it).
    return Console()


def _show(*parts: RenderableType) -> None:
    """Print tables and details at their natural width, like kubectl: a narrow terminal wraps the
    long lines, but no cell is cut or folded into a column of single letters, and piped output
    keeps every row on one line for grep and friends."""
    console = _console()
    for part in parts:
        if isinstance(part, str):
            console.print(part, soft_wrap=True)
            continue
        need = console.measure(part, options=console.options.update_width(NATURAL_WIDTH_CAP)).maximum
        wide = console if need <= console.width else Console(width=need)
        wide.print(part)


def _nothing(what: str) -> None:
    """An empty list: the table's header on stdout, and a word on stderr (as kubectl does)."""
    typer.echo(f"no {what}", err=True)


def _when(timestamp: str | None) -> str:
    """An API timestamp to the second, for tables."""
    return timestamp[:19].replace("T", " ") if timestamp else "-"


def _print_json(value: Any) -> None:
    # Plain text on stdout, never through rich: nothing wraps, styles or highlights it.
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def _pairs(items: Sequence[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not key=value", param_hint=what)
        out[key] = value
    return out


def _tdx(state: str) -> Text:
    return Text(state, style=TDX_STYLES.get(state, ""))


def _status(status: str) -> Text:
    return Text(status, style=VM_STYLES.get(status, ""))


def _yes(flag: bool) -> Text:
    return Text("yes", style="green") if flag else Text("no", style="red")


def _labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _or_dash(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _table(*columns: str) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _details(rows: Iterable[tuple[str, str | Text]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(key, value)
    return grid


def _heading(title: str) -> Text:
    return Text("\n" + title, style="bold")


# ---- hosts ------------------------------------------------------------------------------------


def _keyids(host: Host) -> str:
    return f"{host['tdx']['keyids_used']}/{host['tdx']['keyids_total']}"


def _vcpus(host: Host) -> str:
    return f"{host['usage']['vcpus']}/{vcpu_limit(host)}"


def _memory(host: Host) -> str:
    return f"{host['usage']['memory_mib']}/{memory_limit_mib(host)}"


def _scheduling(host: Host) -> Text:
    word = scheduling(host)
    return Text(word, style=SCHEDULING_STYLES[word])


def _alive(host: Host) -> Text:
    if host["alive"]:
        return Text("yes", style="green")
    return Text("never" if host["last_heartbeat_at"] is None else "stale", style="red")


def _reason_code(host: Host) -> str:
    return _or_dash(host["tdx"].get("reason_code"))


def _hosts_table(hosts: Iterable[Host], wide: bool) -> Table:
    columns = ["NAME", "TDX", "KEYIDS", "VCPUS", "MEMORY MIB", "VMS", "SCHEDULING", "ALIVE", "LABELS"]
    if wide:
        columns += ["REASON", "MODULE", "KERNEL", "RESERVED VCPUS/MIB", "RATIO", "LAST HEARTBEAT", "GENERATION"]
    table = _table(*columns)
    for h in hosts:
        row: list[str | Text] = [
            h["name"], _tdx(h["tdx"]["state"]), _keyids(h), _vcpus(h), _memory(h), str(h["usage"]["vms"]),
            _scheduling(h), _alive(h), _labels(h["labels"]),
        ]
        if wide:
            load = h["load"]
            row += [
                _or_dash(h["tdx"].get("reason_code") or h["tdx"]["reason"]), _or_dash(h["tdx"]["module_version"]),
                _or_dash(load and load["kernel"]), f"{h['reserved_vcpus']}/{h['reserved_memory_mib']}",
                f"{h.get('cpu_allocation_ratio', 1.0):g}", _when(h["last_heartbeat_at"]), str(h["generation"]),
            ]
        table.add_row(*row)
    return table


def _host_details(h: Host) -> Table:
    tdx, load, usage = h["tdx"], h["load"], h["usage"]
    observed = tdx["keyids_observed_in_use"]
    keyids = _keyids(h) + (f" (agent sees {observed} in use)" if observed is not None else "")
    ratio = h.get("cpu_allocation_ratio", 1.0)
    rows: list[tuple[str, str | Text]] = [
        ("name", h["name"]),
        ("id", h["id"]),
        ("tdx state", _tdx(tdx["state"])),
        ("reason", _or_dash(tdx["reason"])),
    ]
    if tdx.get("reason_code"):
        rows.append(("reason code", _reason_code(h)))
    if tdx.get("remedy"):
        rows.append(("remedy", _or_dash(tdx.get("remedy"))))
    rows += [
        ("keyids used/total", keyids),
        ("module version", _or_dash(tdx["module_version"])),
        ("load", _or_dash(load and load["id"])),
        ("boot id", _or_dash(load and load["boot_id"])),
        ("kernel", _or_dash(load and load["kernel"])),
        ("reported at", _or_dash(load and load["reported_at"])),
        ("vcpus used/total", f"{_vcpus(h)} ({h['vcpus']} physical, {h['reserved_vcpus']} reserved, "
                             f"allocation ratio {ratio:g})"),
        ("memory used/total", f"{_memory(h)} MiB ({h['memory_mib']} physical, {h['reserved_memory_mib']} reserved)"),
        ("vms", str(usage["vms"])),
        ("tds building", str(tdx.get("tds_building", 0))),
        ("pamt", f"{tdx.get('pamt_mib', 0)} MiB"),
        ("attestation", _attestation(tdx.get("attestation_ready"))),
        ("vmm", _or_dash(tdx.get("vmm") and f"{tdx.get('vmm')}: {tdx.get('vmm_detail') or ''}".rstrip(": "))),
        ("scheduling", _scheduling(h)),
        ("alive", _alive(h)),
        ("last heartbeat", _or_dash(h["last_heartbeat_at"])),
        ("labels", _labels(h["labels"])),
        ("generation", str(h["generation"])),
    ]
    return _details(rows)


def _attestation(ready: bool | None) -> str:
    if ready is None:
        return "not checked"
    return "quote generation service answers" if ready else "quote generation service not answering"


def _show_host(host: Host, output: Output) -> None:
    if output is Output.json:
        _print_json(host)
    else:
        _show(_host_details(host))


@hosts_app.command("list")
def hosts_list(
    ctx: typer.Context,
    tdx_state: Annotated[TdxStateChoice | None, typer.Option(help="only hosts in this TDX state")] = None,
    schedulable: Annotated[bool | None, typer.Option("--schedulable/--cordoned", show_default=False)] = None,
    label: Annotated[list[str] | None, typer.Option(help="k=v, repeatable")] = None,
    tdx_module_below: Annotated[
        str | None, typer.Option(help="only hosts whose TDX module version is lower (hosts to update)")
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """List hosts with their TDX state, KeyIDs and placement capacity (used/allocatable)."""
    filters = HostFilter(label=_pairs(label, "--label"))
    if tdx_module_below is not None:
        filters["tdx_module_below"] = tdx_module_below
    if tdx_state is not None:
        filters["tdx_state"] = tdx_state.value
    if schedulable is not None:
        filters["schedulable"] = schedulable
    with _client(ctx) as c:
        hosts = list(c.iter_hosts(**filters))
    if output is Output.json:
        _print_json(hosts)
        return
    _show(_hosts_table(hosts, output is Output.wide))
    if not hosts:
        _nothing("hosts")


@hosts_app.command("show")
def hosts_show(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
    """A host's TDX state and reason, KeyIDs, current load, usage and liveness (-o wide: its VMs and loads)."""
    with _client(ctx, Subject("host", name)) as c:
        host = c.get_host(name).host
        if output is not Output.wide:
            _show_host(host, output)
            return
        vms = c.host_vms(name)
        loads = c.list_loads(name, limit=5)["items"]
    _show(
        _host_details(host), _heading(f"Active VMs ({len(vms)})"), _vms_table(vms, wide=False),
        _heading("Latest loads"), _loads_table(loads, wide=False),
    )


@hosts_app.command("create")
def hosts_create(
    ctx: typer.Context,
    name: str,
    vcpus: Annotated[int, typer.Option(help="physical vCPUs")],
    memory_mib: Annotated[int, typer.Option(help="memory in MiB")],
    label: Annotated[list[str] | None, typer.Option(help="k=v, repeatable")] = None,
    reserved_vcpus: Annotated[int, typer.Option()] = 0,
    reserved_memory_mib: Annotated[int, typer.Option()] = 0,
    output: OutputOpt = Output.table,
) -> None:
    """Register a host (TDX state unknown until its agent reports a load)."""
    labels = _pairs(label, "--label")
    with _client(ctx) as c:
        host = c.create_host(
            name, vcpus, memory_mib, labels=labels, reserved_vcpus=reserved_vcpus,
            reserved_memory_mib=reserved_memory_mib,
        )
    _show_host(host, output)


def _host_changed(host: Host, message: str, output: Output) -> None:
    if output is Output.json:
        _print_json(host)
    else:
        typer.echo(message)


@hosts_app.command("cordon")
def hosts_cordon(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
    """No new placements on the host (schedulable=false)."""
    with _client(ctx, Subject("host", name)) as c:
        host = c.patch_host(name, schedulable=False)
    _host_changed(host, f"host {name} cordoned", output)


@hosts_app.command("uncordon")
def hosts_uncordon(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
    """Placements allowed again (schedulable, not draining)."""
    with _client(ctx, Subject("host", name)) as c:
        host = c.patch_host(name, schedulable=True, draining=False)
    _host_changed(host, f"host {name} uncordoned", output)


@hosts_app.command("drain")
def hosts_drain(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
    """No new placements; the host is marked draining."""
    with _client(ctx, Subject("host", name)) as c:
        host = c.drain_host(name)
    _host_changed(host, f"host {name} draining ({host['usage']['vms']} active VMs)", output)


@hosts_app.command("delete")
def hosts_delete(ctx: typer.Context, name: str) -> None:
    """Remove a host without active VMs."""
    with _client(ctx, Subject("host", name)) as c:
        c.delete_host(name)
    typer.echo(f"host {name} deleted")


def _loads_table(loads: Iterable[Load], wide: bool) -> Table:
    columns = ["REPORTED", "LOAD", "BOOT ID", "KERNEL", "TDX", "KEYIDS", "MODULE", "CURRENT", "REASON"]
    if wide:
        columns += ["KVM_INTEL", "PLATFORM", "REQUESTED", "EFFECTIVE", "VCPUS", "MEMORY MIB", "ERRORS"]
    table = _table(*columns)
    for x in loads:
        row: list[str | Text] = [
            _when(x["reported_at"]), x["id"] if wide else x["id"][:8], x["boot_id"], x["kernel"],
            _tdx(x["tdx_state"]), str(x["keyids_total"]), _or_dash(x["module_version"]),
            "*" if x["current"] else "", _or_dash(x["tdx_reason"]),
        ]
        if wide:
            row += [
                _yes(x["kvm_intel_loaded"]), _yes(x["tdx_platform"]), _yes(x["tdx_requested"]),
                _yes(x["tdx_effective"]), _or_dash(x["vcpus"]), _or_dash(x["memory_mib"]),
                " | ".join(x["errors"]) or "-",
            ]
        table.add_row(*row)
    return table


@hosts_app.command("loads")
def hosts_loads(
    ctx: typer.Context,
    name: str,
    limit: Annotated[int, typer.Option(min=1, max=500, help="newest N loads")] = 20,
    output: OutputOpt = Output.table,
) -> None:
    """A host's kvm_intel load history, newest first."""
    with _client(ctx, Subject("host", name)) as c:
        loads = c.list_loads(name, limit=limit)["items"]
    if output is Output.json:
        _print_json(loads)
        return
    _show(_loads_table(loads, output is Output.wide))
    if not loads:
        _nothing(f"loads reported for host {name}")


# ---- VMs --------------------------------------------------------------------------------------


def _reasons(reasons: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())) or "-"


def _vms_table(vms: Iterable[Vm], wide: bool) -> Table:
    columns = ["ID", "NAME", "PROJECT", "STATUS", "TDX", "VCPUS", "MEMORY MIB", "HOST", "EXPLANATION"]
    if wide:
        columns += ["PRIORITY", "SELECTOR", "GROUP", "REASONS", "CREATED", "UPDATED"]
    table = _table(*columns)
    for v in vms:
        row: list[str | Text] = [
            v["id"], v["name"], v["project"], _status(v["status"]), "yes" if v["tdx"] else "no", str(v["vcpus"]),
            str(v["memory_mib"]), _or_dash(v["host"]), _or_dash(v["explanation"]),
        ]
        if wide:
            row += [
                str(v["priority"]), _labels(v["selector"]), _or_dash(v["anti_affinity_group"]),
                _reasons(v["reasons"]), _when(v["created_at"]), _when(v["updated_at"]),
            ]
        table.add_row(*row)
    return table


def _vm_details(v: Vm) -> Table:
    rows: list[tuple[str, str | Text]] = [
        ("id", v["id"]),
        ("name", v["name"]),
        ("project", v["project"]),
        ("status", _status(v["status"])),
        ("detail", _or_dash(v.get("status_detail"))),
        ("host", _or_dash(v["host"])),
        ("tdx", "yes" if v["tdx"] else "no"),
        ("size", f"{v['vcpus']} vCPUs, {v['memory_mib']} MiB"),
        ("selector", _labels(v["selector"])),
        ("anti-affinity group", _or_dash(v["anti_affinity_group"])),
        ("priority", str(v["priority"])),
        ("explanation", _or_dash(v["explanation"])),
        ("reasons", _reasons(v["reasons"])),
        ("deadline", v["deadline"]),
        ("created", v["created_at"]),
        ("updated", v["updated_at"]),
    ]
    return _details(rows)


def _show_vm(v: Vm, output: Output) -> None:
    if output is Output.json:
        _print_json(v)
    else:
        _show(_vm_details(v))


@vms_app.command("list")
def vms_list(
    ctx: typer.Context,
    status: Annotated[
        list[VmStatusChoice] | None, typer.Option(help="only VMs in this status (repeatable: any of them)")
    ] = None,
    host: Annotated[str | None, typer.Option()] = None,
    project: Annotated[str | None, typer.Option()] = None,
    tdx: Annotated[bool | None, typer.Option("--tdx/--no-tdx", show_default=False)] = None,
    all_: Annotated[
        bool, typer.Option("--all", "-A", help="ended VMs too (deleted, failed, lost); hidden by default")
    ] = False,
    output: OutputOpt = Output.table,
) -> None:
    """List VMs: those not ended (pending, scheduled, running, deleting) unless --all or --status."""
    filters = VmFilter()
    if status:
        filters["status"] = [s.value for s in status]
    elif not all_:
        filters["status"] = list(NOT_ENDED_VM_STATUSES)
    if host is not None:
        filters["host"] = host
    if project is not None:
        filters["project"] = project
    if tdx is not None:
        filters["tdx"] = tdx
    with _client(ctx) as c:
        vms = list(c.iter_vms(**filters))
    if output is Output.json:
        _print_json(vms)
        return
    _show(_vms_table(vms, output is Output.wide))
    if not vms:
        _nothing("VMs" if status or all_ else "VMs (ended VMs are hidden: --all shows them)")


def _vm_events_table(events: Iterable[Event]) -> Table:
    table = _table("EVENT", "AT", "KIND", "DATA")
    for e in events:
        data = {k: v for k, v in e["data"].items() if k != "id"}
        table.add_row(str(e["id"]), _when(e["at"]), e["kind"], json.dumps(data, sort_keys=True) if data else "-")
    return table


@vms_app.command("show")
def vms_show(
    ctx: typer.Context, vm_id: Annotated[str, typer.Argument(metavar="ID")], output: OutputOpt = Output.table
) -> None:
    """A VM, where it runs, or why it is pending (-o wide: its events too)."""
    with _client(ctx, Subject("VM", vm_id)) as c:
        vm = c.get_vm(vm_id)
        if output is not Output.wide:
            _show_vm(vm, output)
            return
        events = c.list_events(after=0, subject=vm["id"], limit=500)["items"]
    _show(_vm_details(vm), _heading("Events"), _vm_events_table(events))


NameOpt = Annotated[str, typer.Option(help="VM name (DNS label)")]
VcpusOpt = Annotated[int, typer.Option(help="vCPUs")]
MemoryOpt = Annotated[int, typer.Option(help="memory in MiB")]
TdxOpt = Annotated[bool, typer.Option("--tdx/--no-tdx", help="a TDX confidential VM")]
ProjectOpt = Annotated[str | None, typer.Option(help="project (admin only; a client token has its own)")]
SelectorOpt = Annotated[list[str] | None, typer.Option(help="host label k=v, repeatable")]
GroupOpt = Annotated[str | None, typer.Option(help="never two VMs of one group on one host")]
PriorityOpt = Annotated[int | None, typer.Option(help="higher is placed first")]


def _vm_options(
    project: str | None, selector: list[str] | None, group: str | None, priority: int | None, timeout: int | None
) -> VmOptions:
    options = VmOptions(selector=_pairs(selector, "--selector"))
    if project is not None:
        options["project"] = project
    if group is not None:
        options["anti_affinity_group"] = group
    if priority is not None:
        options["priority"] = priority
    if timeout is not None:
        options["schedule_timeout_s"] = timeout
    return options


@vms_app.command("create")
def vms_create(
    ctx: typer.Context,
    name: NameOpt,
    vcpus: VcpusOpt,
    memory_mib: MemoryOpt,
    tdx: TdxOpt = True,
    project: ProjectOpt = None,
    selector: SelectorOpt = None,
    anti_affinity_group: GroupOpt = None,
    priority: PriorityOpt = None,
    timeout: Annotated[int | None, typer.Option(help="seconds to stay pending before failing")] = None,
    attestation: Annotated[
        bool, typer.Option("--attestation", help="only hosts whose quote generation service answers (a TD)")
    ] = False,
    output: OutputOpt = Output.table,
) -> None:
    """Request a VM: scheduled at once, or pending with an explanation."""
    options = _vm_options(project, selector, anti_affinity_group, priority, timeout)
    if attestation:
        options["attestation"] = True
    with _client(ctx) as c:
        vm = c.create_vm(name, vcpus, memory_mib, tdx, **options)
    _show_vm(vm, output)


@vms_app.command("delete")
def vms_delete(
    ctx: typer.Context, vm_id: Annotated[str, typer.Argument(metavar="ID")], output: OutputOpt = Output.table
) -> None:
    """Delete a VM (deleting until its agent confirms, or deleted at once if it never started)."""
    with _client(ctx, Subject("VM", vm_id)) as c:
        vm = c.delete_vm(vm_id)
    if output is Output.json:
        _print_json(vm)
    else:
        typer.echo(f"vm {vm['id']} {vm['status']}")


# ---- scheduling insight -----------------------------------------------------------------------


def _show_preview(p: Preview) -> None:
    parts: list[RenderableType] = [_details([
        ("would land on", Text(p["host"], style="green") if p["host"] else Text("nowhere", style="red")),
        ("explanation", p["explanation"]),
        ("rejections", _reasons(p["reasons"])),
    ])]
    if p["candidates"]:
        table = _table("CANDIDATE", "SCORE")
        for cand in p["candidates"]:
            table.add_row(cand["host"], f"{cand['score']:.4f}")
        parts.append(table)
    _show(*parts)


@schedule_app.command("preview")
def schedule_preview(
    ctx: typer.Context,
    vcpus: VcpusOpt,
    memory_mib: MemoryOpt,
    name: NameOpt = "preview",
    tdx: TdxOpt = True,
    project: ProjectOpt = None,
    selector: SelectorOpt = None,
    anti_affinity_group: GroupOpt = None,
    priority: PriorityOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Where such a VM would land now and why not elsewhere; changes nothing."""
    options = _vm_options(project, selector, anti_affinity_group, priority, None)
    with _client(ctx) as c:
        preview = c.preview(name, vcpus, memory_mib, tdx, **options)
    if output is Output.json:
        _print_json(preview)
    else:
        _show_preview(preview)


def _show_capacity(cap: Capacity) -> None:
    table = _table("TDX STATE", "HOSTS", "ALIVE", "VCPUS FREE", "MEMORY MIB FREE", "KEYIDS", "KEYIDS FREE",
                   "KEYIDS STRANDED")
    rows = [(Text(state, style=TDX_STYLES.get(state, "")), entry) for state, entry in cap["by_tdx_state"].items()]
    rows.append((Text("total", style="bold"), cap["totals"]))
    for label, e in rows:
        table.add_row(
            label, str(e["hosts"]), str(e["hosts_alive"]), str(whole_vcpus(e["vcpus_free"])),
            str(e["memory_mib_free"]), f"{e['keyids_used']}/{e['keyids_total']}", str(e["keyids_free"]),
            str(e["keyids_stranded"]),
        )
    parts: list[RenderableType] = [table]
    fit = cap["fit"]
    if fit is not None:
        kind = "TDX" if fit["tdx"] else "non-TDX"
        charged = fit.get("memory_mib_charged", fit["memory_mib"])
        overhead = f" (+{charged - fit['memory_mib']} MiB TD overhead)" if charged != fit["memory_mib"] else ""
        parts.append(
            f"{fit['fits_now']} {kind} VMs of {fit['vcpus']} vCPUs / {fit['memory_mib']} MiB{overhead} fit now"
        )
    _show(*parts)


@app.command("capacity")
def capacity(
    ctx: typer.Context,
    vcpus: Annotated[int | None, typer.Option(help="with --memory-mib: how many such VMs fit")] = None,
    memory_mib: Annotated[int | None, typer.Option()] = None,
    tdx: Annotated[bool, typer.Option("--tdx/--no-tdx")] = True,
    output: OutputOpt = Output.table,
) -> None:
    """Free capacity and KeyIDs per TDX state."""
    with _client(ctx) as c:
        cap = c.capacity(vcpus=vcpus, memory_mib=memory_mib, tdx=tdx if vcpus is not None else None)
    if output is Output.json:
        _print_json(cap)
    else:
        _show_capacity(cap)


# ---- events -----------------------------------------------------------------------------------


def _event_line(e: Event, wide: bool) -> Text:
    line = Text(f"{e['id']:>8}  {e['at'] if wide else _when(e['at'])}  ")
    line.append(e["kind"], style="cyan")
    line.append(f"  {e['subject']}")
    if e["data"]:
        line.append(f"  {json.dumps(e['data'], sort_keys=True)}", style="dim")
    return line


def _print_event(console: Console, e: Event, output: Output) -> None:
    if output is Output.json:
        sys.stdout.write(json.dumps(e, sort_keys=True) + "\n")
        sys.stdout.flush()
    else:
        # One event, one line, whatever the width: rich would otherwise wrap inside the JSON.
        console.print(_event_line(e, output is Output.wide), soft_wrap=True)


@app.command("events")
def events(
    ctx: typer.Context,
    after: Annotated[
        int | None, typer.Option(help="events after this id (default: from the start; from now with --follow)")
    ] = None,
    kind: Annotated[list[str] | None, typer.Option(help="kind or prefix* (repeatable)")] = None,
    subject: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="at most this many (without --follow)")] = 100,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="stream new events until interrupted")] = False,
    output: OutputOpt = Output.table,
) -> None:
    """The event log, one event per line (-o wide: full timestamps); with --follow, a live stream
    (-o json: a JSON array, or with --follow one JSON object per line)."""
    with _client(ctx) as c:
        if not follow:
            page = c.list_events(after=after or 0, kind=kind, subject=subject, limit=limit)
            if output is Output.json:
                _print_json(page["items"])
                return
            console = _console()
            for e in page["items"]:
                _print_event(console, e, output)
            return
        start = after if after is not None else c.list_events(limit=1, after=0)["head_id"]
        console = _console()
        try:
            for e in c.watch_events(after=start, kind=kind, subject=subject):
                _print_event(console, e, output)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


# ---- tokens and identity ----------------------------------------------------------------------


def _tokens_table(tokens: Iterable[Token], wide: bool) -> Table:
    columns = ["ID", "ROLE", "HOST", "PROJECT", "DESCRIPTION", "CREATED", "REVOKED"]
    table = _table(*columns)
    # -o wide: times in full (nothing else to add: a token's secret is never listed).
    when = _or_dash if wide else _when
    for t in tokens:
        table.add_row(
            t["id"], t["role"], _or_dash(t["host"]), _or_dash(t["project"]), _or_dash(t["description"]),
            when(t["created_at"]), when(t["revoked_at"]),
        )
    return table


@tokens_app.command("create")
def tokens_create(
    ctx: typer.Context,
    role: Annotated[str, typer.Option(help="admin, reader, agent (with --host) or client (with --project)")],
    host: Annotated[str | None, typer.Option(help="the host an agent token is bound to")] = None,
    project: Annotated[str | None, typer.Option(help="the project a client token is bound to")] = None,
    description: Annotated[str | None, typer.Option()] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Create a token; its secret is shown only now."""
    with _client(ctx) as c:
        created = c.create_token(role, host=host, project=project, description=description)
    if output is Output.json:
        _print_json(created)
        return
    _show(_tokens_table([created], output is Output.wide), Text.assemble(
        ("secret (shown only now): ", "bold"), created["token"]
    ))


@tokens_app.command("list")
def tokens_list(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """List tokens (no secrets)."""
    with _client(ctx) as c:
        tokens = list(c.iter_tokens())
    if output is Output.json:
        _print_json(tokens)
        return
    _show(_tokens_table(tokens, output is Output.wide))
    if not tokens:
        _nothing("tokens")


@tokens_app.command("revoke")
def tokens_revoke(ctx: typer.Context, token_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Revoke a token: it is refused (401) from now on."""
    with _client(ctx, Subject("token", token_id)) as c:
        c.revoke_token(token_id)
    typer.echo(f"token {token_id} revoked")


@app.command("whoami")
def whoami(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """The role of this token, and the host or project it is bound to."""
    with _client(ctx) as c:
        me = c.whoami()
    if output is Output.json:
        _print_json(me)
        return
    _show(_details([
        ("role", me["role"]), ("token", me["token_id"]), ("host", _or_dash(me["host"])),
        ("project", _or_dash(me["project"])), ("server", c.server),
    ]))

# ---- projects and quotas ----------------------------------------------------------------------

QUOTA_RESOURCES = ("vms", "vcpus", "memory_mib", "tdx_vms")


def _usage(q: Quota, resource: str) -> tuple[int, int | None]:
    """Used and limit (None: no limit) of one resource."""
    limits = cast(Mapping[str, int | None], q["limits"])
    usage = cast(Mapping[str, int], q["usage"])
    return usage[resource], limits[resource]


def _used_text(q: Quota, resource: str) -> Text:
    used, limit = _usage(q, resource)
    style = "red" if limit is not None and used >= limit else ""
    return Text(f"{used}/{'-' if limit is None else limit}", style=style)


def _quotas_table(quotas: Iterable[Quota], wide: bool) -> Table:
    table = _table("PROJECT", "VMS", "VCPUS", "MEMORY MIB", "TDX VMS", *(["GENERATION"] if wide else []))
    for q in quotas:
        table.add_row(
            q["project"], *(_used_text(q, r) for r in QUOTA_RESOURCES), *([str(q["generation"])] if wide else [])
        )
    return table


def _quota_details(q: Quota) -> Table:
    table = _table("RESOURCE", "USED", "LIMIT", "FREE")
    for r in QUOTA_RESOURCES:
        used, limit = _usage(q, r)
        free = "-" if limit is None else str(max(limit - used, 0))
        table.add_row(r, Text(str(used), style="red" if limit is not None and used >= limit else ""),
                      _or_dash(limit), free)
    return table


def _show_quota(q: Quota, output: Output) -> None:
    if output is Output.json:
        _print_json(q)
        return
    heading = f"project {q['project']}" + (f" (quota generation {q['generation']})" if output is Output.wide else "")
    _show(Text(heading, style="bold"), _quota_details(q))


def _limit(value: str, option: str) -> int | None:
    """``none`` (no limit) or an integer >= 0."""
    if value.lower() in ("none", "null", "unlimited"):
        return None
    if not value.isdigit():
        raise typer.BadParameter(f"{value!r} is neither an integer >= 0 nor 'none'", param_hint=option)
    return int(value)


LimitOpt = Annotated[str | None, typer.Option(metavar="N|none", show_default=False)]


@quota_app.command("show")
def quota_show(ctx: typer.Context, project: str, output: OutputOpt = Output.table) -> None:
    """A project's limits and usage (VMs not yet ended: pending, scheduled, running, deleting)."""
    with _client(ctx, Subject("project", project)) as c:
        q = c.get_quota(project)
    _show_quota(q, output)


@quota_app.command("set")
def quota_set(
    ctx: typer.Context,
    project: str,
    vms: LimitOpt = None,
    vcpus: LimitOpt = None,
    memory_mib: LimitOpt = None,
    tdx_vms: LimitOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Change some of a project's limits ('none': no limit); the others stay as they are. A limit
    below the current usage refuses new VMs and touches none of the existing ones."""
    given = {"vms": vms, "vcpus": vcpus, "memory_mib": memory_mib, "tdx_vms": tdx_vms}
    changes = {k: _limit(v, f"--{k.replace('_', '-')}") for k, v in given.items() if v is not None}
    if not changes:
        _fail("nothing to set: give at least one of --vms, --vcpus, --memory-mib, --tdx-vms", 2)
    with _client(ctx, Subject("project", project)) as c:
        current = c.get_quota(project)
        limits = {**cast(Mapping[str, int | None], current["limits"]), **changes}
        # If-Match: a concurrent change between the read and the write is refused, not overwritten.
        q = c.set_quota(
            project, vms=limits["vms"], vcpus=limits["vcpus"], memory_mib=limits["memory_mib"],
            tdx_vms=limits["tdx_vms"], if_match=current["generation"],
        )
    _show_quota(q, output)


@quota_app.command("list")
def quota_list(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """Every project with its usage/limit per resource ('-': no limit)."""
    with _client(ctx) as c:
        quotas = list(c.iter_projects())
    if output is Output.json:
        _print_json(quotas)
        return
    _show(_quotas_table(quotas, output is Output.wide))
    if not quotas:
        _nothing("projects")


# ---- fleet policy and operations ---------------------------------------------------------------


def _show_policy(p: Policy, output: Output) -> None:
    if output is Output.json:
        _print_json(p)
        return
    d = p["defaults"]
    _show(_details([
        ("tdx min module version", _or_dash(p["tdx_min_module_version"])),
        ("max td builds per host", f"{p['max_td_builds_per_host']} (default {d['max_td_builds_per_host']})"),
        ("td memory overhead", f"{p['td_memory_overhead_mib']} MiB (default {d['td_memory_overhead_mib']})"),
        ("generation", str(p["generation"])),
        ("updated at", _or_dash(p["updated_at"])),
    ]))


@policy_app.command("show")
def policy_show(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """The fleet's TDX policy: module floor, TD build bursts, per-TD memory overhead."""
    with _client(ctx) as c:
        _show_policy(c.get_policy(), output)


def _optional_int(value: str | None, option: str) -> int | None:
    if value is None or value == "default":
        return None
    try:
        return int(value)
    except ValueError:
        _fail(f"{option} takes a number or 'default', not {value!r}", EXIT_USAGE)


@policy_app.command("set")
def policy_set(
    ctx: typer.Context,
    min_module_version: Annotated[
        str | None, typer.Option(help="TDX VMs only on hosts with this TDX module version or newer; 'none': no floor")
    ] = None,
    max_td_builds: Annotated[
        str | None, typer.Option(help="TDs per host placed and not yet running; 'default': the server's")
    ] = None,
    td_overhead_mib: Annotated[
        str | None, typer.Option(help="memory charged per TD besides its own; 'default': the server's")
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Change the fleet's TDX policy (the options given; the others keep their values). Pending VMs are
    re-explained and retried; placed VMs never move."""
    update = PolicyUpdate()
    if min_module_version is not None:
        update["tdx_min_module_version"] = None if min_module_version == "none" else min_module_version
    if max_td_builds is not None:
        update["max_td_builds_per_host"] = _optional_int(max_td_builds, "--max-td-builds")
    if td_overhead_mib is not None:
        update["td_memory_overhead_mib"] = _optional_int(td_overhead_mib, "--td-overhead-mib")
    if not update:
        _fail("nothing to set: give --min-module-version, --max-td-builds or --td-overhead-mib", EXIT_USAGE)
    with _client(ctx) as c:
        _show_policy(c.put_policy(**update), output)


def _operation_details(op: Operation) -> Table:
    rows: list[tuple[str, str | Text]] = [
        ("id", op["id"]), ("kind", op["kind"]), ("host", op["host"]),
        ("status", _status(op["status"])), ("step", op["step"]), ("detail", _or_dash(op["detail"])),
    ]
    if op["blocking_vms_total"]:
        names = ", ".join(f"{v['name']} ({v['status']})" for v in op["blocking_vms"])
        rows.append(("blocking vms", f"{op['blocking_vms_total']}: {names}"))
    if op["reason_code"] or op["reason"]:
        rows += [("reason code", _or_dash(op["reason_code"])), ("reason", _or_dash(op["reason"])),
                 ("remedy", _or_dash(op["remedy"]))]
    rows += [("started", op["created_at"]), ("deadline", op["deadline"]), ("finished", _or_dash(op["finished_at"]))]
    for entry in op["history"]:
        rows.append((f"  {_when(entry['at'])}", f"{entry['step']}: {entry['message']}"))
    return _details(rows)


def _operations_table(ops: Iterable[Operation]) -> Table:
    table = _table("ID", "KIND", "HOST", "STATUS", "STEP", "STARTED", "DETAIL")
    for op in ops:
        table.add_row(op["id"], op["kind"], op["host"], _status(op["status"]), op["step"], _when(op["created_at"]),
                      _or_dash(op["detail"]))
    return table


def _follow(c: TdxClient, op: Operation, after: int) -> Operation:
    """Print the operation's events as they come, until it ends."""
    console = _console()
    while op["status"] == "running":
        page = c.list_events(after=after, subject=op["id"], wait=20)
        for e in page["items"]:
            detail = e["data"].get("detail") or e["kind"].removeprefix("operation.")
            console.print(f"{_when(e['at'])}  {e['data'].get('step', '')}: {detail}", soft_wrap=True, highlight=False)
        after = page["last_id"]
        op = c.get_operation(op["id"])
    return op


@hosts_app.command("opt-in")
def hosts_opt_in(
    ctx: typer.Context,
    name: str,
    wait: Annotated[bool, typer.Option("--wait", help="follow the operation until it ends (exit 1 unless it succeeds)")]
    = False,
    timeout: Annotated[int | None, typer.Option(help="seconds the operation may wait for the host")] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Opt a host in to TDX: cordon it, wait until no VM is active, wait for a new kvm_intel load (reload
    it with tdx=1 on the host), uncordon it when it is TDX-ready, or stop with the reason and remedy."""
    with _client(ctx, Subject("host", name)) as c:
        after = c.list_events(limit=1)["head_id"]
        op = c.start_opt_in(name, timeout_s=timeout)
        if output is not Output.json:
            typer.echo(f"operation {op['id']}: TDX opt-in of {name} started")
        if wait:
            op = _follow(c, op, after)
    if output is Output.json:
        _print_json(op)
    elif wait:
        _show(_operation_details(op))
    else:
        typer.echo(f"{op['step']}: {op['detail']}")
    if wait and op["status"] != "succeeded":
        raise typer.Exit(EXIT_API_ERROR)


@operations_app.command("list")
def operations_list(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="running, succeeded, failed or canceled")] = None,
    host: Annotated[str | None, typer.Option()] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Operations, newest first."""
    with _client(ctx) as c:
        ops = list(c.iter_operations(status=status, host=host))
    if output is Output.json:
        _print_json(ops)
        return
    _show(_operations_table(ops))
    if not ops:
        _nothing("operations")


@operations_app.command("show")
def operations_show(
    ctx: typer.Context, op_id: Annotated[str, typer.Argument(metavar="ID")], output: OutputOpt = Output.table
) -> None:
    """An operation's step, history, and how it ended."""
    with _client(ctx, Subject("operation", op_id)) as c:
        op = c.get_operation(op_id)
    if output is Output.json:
        _print_json(op)
    else:
        _show(_operation_details(op))


@operations_app.command("cancel")
def operations_cancel(
    ctx: typer.Context, op_id: Annotated[str, typer.Argument(metavar="ID")], output: OutputOpt = Output.table
) -> None:
    """Stop a running operation (a host it cordoned is uncordoned)."""
    with _client(ctx, Subject("operation", op_id)) as c:
        op = c.cancel_operation(op_id)
    if output is Output.json:
        _print_json(op)
    else:
        typer.echo(f"operation {op_id} canceled: {op['detail']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
