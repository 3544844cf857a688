"""``tdxctl``: the operator CLI, built on ``service.client``.

Server and token come from ``--server/--token`` or ``TDX_SERVER``/``TDX_TOKEN``. Reads print a
table (default) or JSON (``-o json``). Errors print one line on stderr, the problem's detail and
code, and exit 1 (the server refused) or 3 (no answer from the server); usage errors exit 2.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from service.client import (
    ApiError,
    Capacity,
    ConnectionFailed,
    Event,
    Host,
    HostFilter,
    Load,
    Preview,
    TdxClient,
    Token,
    Vm,
    VmFilter,
    VmOptions,
)

DEFAULT_SERVER = "http://127.0.0.1:8080"
EXIT_API_ERROR = 1
EXIT_NO_ANSWER = 3

TDX_STYLES = {"ready": "green", "disabled": "yellow", "failed": "red", "unsupported": "dim", "unknown": "magenta"}
VM_STYLES = {
    "running": "green", "scheduled": "cyan", "pending": "yellow", "deleting": "yellow",
    "deleted": "dim", "failed": "red", "lost": "red",
}


class Output(StrEnum):
    table = "table"
    json = "json"


OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table or json")]


@dataclass(frozen=True)
class Target:
    server: str
    token: str | None


app = typer.Typer(
    name="tdxctl", help="Operate the TDX control plane.", no_args_is_help=True, pretty_exceptions_enable=False
)
hosts_app = typer.Typer(help="Physical hosts and their TDX readiness.", no_args_is_help=True)
vms_app = typer.Typer(help="VM requests and their placement.", no_args_is_help=True)
schedule_app = typer.Typer(help="Scheduling insight.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens (admin).", no_args_is_help=True)
app.add_typer(hosts_app, name="hosts")
app.add_typer(vms_app, name="vms")
app.add_typer(schedule_app, name="schedule")
app.add_typer(tokens_app, name="tokens")


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


@contextlib.contextmanager
def _client(ctx: typer.Context) -> Iterator[TdxClient]:
    target: Target = ctx.obj
    if not target.token:
        _fail("no token: give --token or set TDX_TOKEN", 2)
    try:
        with TdxClient(target.server, target.token) as client:
            yield client
    except ApiError as exc:
        _fail(f"{' '.join(exc.detail.split())} ({exc.code}, HTTP {exc.status})", EXIT_API_ERROR)
    except ConnectionFailed as exc:
        _fail(f"no answer from {target.server}: {exc}", EXIT_NO_ANSWER)


def _console() -> Console:
    # Created per call: the console binds to whatever sys.stdout is now (tests swap it). Piped
    # output is not cut to 80 columns: rows stay whole for grep and friends.
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))
    return console


def _when(timestamp: str | None) -> str:
    """An API timestamp to the second, for tables."""
    return timestamp[:19].replace("T", " ") if timestamp else "-"


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True))


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


# ---- hosts ------------------------------------------------------------------------------------


def _keyids(host: Host) -> str:
    return f"{host['tdx']['keyids_used']}/{host['tdx']['keyids_total']}"


def _scheduling(host: Host) -> Text:
    if host["draining"]:
        return Text("draining", style="yellow")
    if not host["schedulable"]:
        return Text("cordoned", style="yellow")
    return Text("yes", style="green")


def _hosts_table(hosts: Iterable[Host]) -> Table:
    table = _table("NAME", "TDX", "KEYIDS", "VCPUS", "MEMORY MIB", "VMS", "SCHEDULABLE", "ALIVE", "LABELS")
    for h in hosts:
        table.add_row(
            h["name"], _tdx(h["tdx"]["state"]), _keyids(h), f"{h['usage']['vcpus']}/{h['vcpus']}",
            f"{h['usage']['memory_mib']}/{h['memory_mib']}", str(h["usage"]["vms"]), _scheduling(h),
            _yes(h["alive"]), _labels(h["labels"]),
        )
    return table


def _host_details(h: Host) -> Table:
    tdx, load, usage = h["tdx"], h["load"], h["usage"]
    observed = tdx["keyids_observed_in_use"]
    keyids = _keyids(h) + (f" (agent sees {observed} in use)" if observed is not None else "")
    rows: list[tuple[str, str | Text]] = [
        ("name", h["name"]),
        ("id", h["id"]),
        ("tdx state", _tdx(tdx["state"])),
        ("reason", _or_dash(tdx["reason"])),
        ("keyids used/total", keyids),
        ("module version", _or_dash(tdx["module_version"])),
        ("load", _or_dash(load and load["id"])),
        ("boot id", _or_dash(load and load["boot_id"])),
        ("kernel", _or_dash(load and load["kernel"])),
        ("reported at", _or_dash(load and load["reported_at"])),
        ("vcpus used/total", f"{usage['vcpus']}/{h['vcpus']} (reserved {h['reserved_vcpus']})"),
        ("memory used/total", f"{usage['memory_mib']}/{h['memory_mib']} MiB (reserved {h['reserved_memory_mib']})"),
        ("vms", str(usage["vms"])),
        ("schedulable", _scheduling(h)),
        ("alive", _yes(h["alive"])),
        ("last heartbeat", _or_dash(h["last_heartbeat_at"])),
        ("labels", _labels(h["labels"])),
        ("generation", str(h["generation"])),
    ]
    return _details(rows)


def _show_host(host: Host, output: Output) -> None:
    if output is Output.json:
        _print_json(host)
    else:
        _console().print(_host_details(host))


@hosts_app.command("list")
def hosts_list(
    ctx: typer.Context,
    tdx_state: Annotated[str | None, typer.Option(help="ready, disabled, failed, unsupported or unknown")] = None,
    schedulable: Annotated[bool | None, typer.Option("--schedulable/--cordoned", show_default=False)] = None,
    label: Annotated[list[str] | None, typer.Option(help="k=v, repeatable")] = None,
    output: OutputOpt = Output.table,
) -> None:
    """List hosts with their TDX state and KeyIDs."""
    filters = HostFilter(label=_pairs(label, "--label"))
    if tdx_state is not None:
        filters["tdx_state"] = tdx_state
    if schedulable is not None:
        filters["schedulable"] = schedulable
    with _client(ctx) as c:
        hosts = list(c.iter_hosts(**filters))
    if output is Output.json:
        _print_json(hosts)
    else:
        _console().print(_hosts_table(hosts))


@hosts_app.command("show")
def hosts_show(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
    """A host's TDX state and reason, KeyIDs, current load, usage and liveness."""
    with _client(ctx) as c:
        host = c.get_host(name).host
    _show_host(host, output)


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


@hosts_app.command("cordon")
def hosts_cordon(ctx: typer.Context, name: str) -> None:
    """No new placements on the host (schedulable=false)."""
    with _client(ctx) as c:
        c.patch_host(name, schedulable=False)
    typer.echo(f"host {name} cordoned")


@hosts_app.command("uncordon")
def hosts_uncordon(ctx: typer.Context, name: str) -> None:
    """Placements allowed again (schedulable, not draining)."""
    with _client(ctx) as c:
        c.patch_host(name, schedulable=True, draining=False)
    typer.echo(f"host {name} uncordoned")


@hosts_app.command("drain")
def hosts_drain(ctx: typer.Context, name: str) -> None:
    """No new placements; the host is marked draining."""
    with _client(ctx) as c:
        host = c.drain_host(name)
    typer.echo(f"host {name} draining ({host['usage']['vms']} active VMs)")


@hosts_app.command("delete")
def hosts_delete(ctx: typer.Context, name: str) -> None:
    """Remove a host without active VMs."""
    with _client(ctx) as c:
        c.delete_host(name)
    typer.echo(f"host {name} deleted")


def _loads_table(loads: Iterable[Load]) -> Table:
    table = _table("REPORTED", "LOAD", "BOOT ID", "KERNEL", "TDX", "KEYIDS", "MODULE", "CURRENT", "REASON")
    for x in loads:
        table.add_row(
            _when(x["reported_at"]), x["id"][:8], x["boot_id"], x["kernel"], _tdx(x["tdx_state"]),
            str(x["keyids_total"]), _or_dash(x["module_version"]), "*" if x["current"] else "",
            _or_dash(x["tdx_reason"]),
        )
    return table


@hosts_app.command("loads")
def hosts_loads(
    ctx: typer.Context,
    name: str,
    limit: Annotated[int, typer.Option(help="newest N loads")] = 20,
    output: OutputOpt = Output.table,
) -> None:
    """A host's kvm_intel load history, newest first."""
    with _client(ctx) as c:
        loads = c.list_loads(name, limit=limit)["items"]
    if output is Output.json:
        _print_json(loads)
    else:
        _console().print(_loads_table(loads))


# ---- VMs --------------------------------------------------------------------------------------


def _reasons(reasons: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())) or "-"


def _vms_table(vms: Iterable[Vm]) -> Table:
    table = _table("ID", "NAME", "PROJECT", "STATUS", "TDX", "VCPUS", "MEMORY MIB", "HOST", "EXPLANATION")
    for v in vms:
        table.add_row(
            v["id"], v["name"], v["project"], _status(v["status"]), "yes" if v["tdx"] else "no", str(v["vcpus"]),
            str(v["memory_mib"]), _or_dash(v["host"]), _or_dash(v["explanation"]),
        )
    return table


def _show_vm(v: Vm, output: Output) -> None:
    if output is Output.json:
        _print_json(v)
        return
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
    ]
    _console().print(_details(rows))


@vms_app.command("list")
def vms_list(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option()] = None,
    host: Annotated[str | None, typer.Option()] = None,
    project: Annotated[str | None, typer.Option()] = None,
    tdx: Annotated[bool | None, typer.Option("--tdx/--no-tdx", show_default=False)] = None,
    output: OutputOpt = Output.table,
) -> None:
    """List VMs."""
    filters = VmFilter()
    if status is not None:
        filters["status"] = status
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
    else:
        _console().print(_vms_table(vms))


@vms_app.command("show")
def vms_show(
    ctx: typer.Context, vm_id: Annotated[str, typer.Argument(metavar="ID")], output: OutputOpt = Output.table
) -> None:
    """A VM, where it runs, or why it is pending."""
    with _client(ctx) as c:
        vm = c.get_vm(vm_id)
    _show_vm(vm, output)


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
    output: OutputOpt = Output.table,
) -> None:
    """Request a VM: scheduled at once, or pending with an explanation."""
    options = _vm_options(project, selector, anti_affinity_group, priority, timeout)
    with _client(ctx) as c:
        vm = c.create_vm(name, vcpus, memory_mib, tdx, **options)
    _show_vm(vm, output)


@vms_app.command("delete")
def vms_delete(ctx: typer.Context, vm_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Delete a VM (deleting until its agent confirms, or deleted at once if it never started)."""
    with _client(ctx) as c:
        vm = c.delete_vm(vm_id)
    typer.echo(f"vm {vm['id']} {vm['status']}")


# ---- scheduling insight -----------------------------------------------------------------------


def _show_preview(p: Preview) -> None:
    console = _console()
    console.print(_details([
        ("would land on", Text(p["host"], style="green") if p["host"] else Text("nowhere", style="red")),
        ("explanation", p["explanation"]),
        ("rejections", _reasons(p["reasons"])),
    ]))
    if p["candidates"]:
        table = _table("CANDIDATE", "SCORE")
        for cand in p["candidates"]:
            table.add_row(cand["host"], f"{cand['score']:.4f}")
        console.print(table)


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
            label, str(e["hosts"]), str(e["hosts_alive"]), f"{e['vcpus_free']:g}", str(e["memory_mib_free"]),
            f"{e['keyids_used']}/{e['keyids_total']}", str(e["keyids_free"]), str(e["keyids_stranded"]),
        )
    console = _console()
    console.print(table)
    fit = cap["fit"]
    if fit is not None:
        kind = "TDX" if fit["tdx"] else "non-TDX"
        console.print(f"{fit['fits_now']} {kind} VMs of {fit['vcpus']} vCPUs / {fit['memory_mib']} MiB fit now")


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


def _event_line(e: Event) -> Text:
    line = Text(f"{e['id']:>8}  {_when(e['at'])}  ")
    line.append(e["kind"], style="cyan")
    line.append(f"  {e['subject']}")
    if e["data"]:
        line.append(f"  {json.dumps(e['data'], sort_keys=True)}", style="dim")
    return line


@app.command("events")
def events(
    ctx: typer.Context,
    after: Annotated[
        int | None, typer.Option(help="events after this id (default: from the start; from now with --follow)")
    ] = None,
    kind: Annotated[list[str] | None, typer.Option(help="kind or prefix* (repeatable)")] = None,
    subject: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option(help="at most this many (without --follow)")] = 100,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="stream new events until interrupted")] = False,
    output: OutputOpt = Output.table,
) -> None:
    """The event log; with --follow, a live stream (one JSON object per line with -o json)."""
    with _client(ctx) as c:
        if not follow:
            page = c.list_events(after=after or 0, kind=kind, subject=subject, limit=limit)
            if output is Output.json:
                _print_json(page["items"])
            else:
                console = _console()
                for e in page["items"]:
                    console.print(_event_line(e))
            return
        start = after if after is not None else c.list_events(limit=1, after=0)["head_id"]
        console = _console()
        try:
            for e in c.watch_events(after=start, kind=kind, subject=subject):
                if output is Output.json:
                    typer.echo(json.dumps(e, sort_keys=True))
                else:
                    console.print(_event_line(e))
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


# ---- tokens -----------------------------------------------------------------------------------


def _tokens_table(tokens: Iterable[Token]) -> Table:
    table = _table("ID", "ROLE", "HOST", "PROJECT", "DESCRIPTION", "CREATED", "REVOKED")
    for t in tokens:
        table.add_row(
            t["id"], t["role"], _or_dash(t["host"]), _or_dash(t["project"]), _or_dash(t["description"]),
            _when(t["created_at"]), _when(t["revoked_at"]),
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
    console = _console()
    console.print(_tokens_table([created]))
    console.print(Text("secret (shown only now): ", style="bold"), Text(created["token"]), soft_wrap=True)


@tokens_app.command("list")
def tokens_list(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """List tokens (no secrets)."""
    with _client(ctx) as c:
        tokens = list(c.iter_tokens())
    if output is Output.json:
        _print_json(tokens)
    else:
        _console().print(_tokens_table(tokens))


@tokens_app.command("revoke")
def tokens_revoke(ctx: typer.Context, token_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Revoke a token: it is refused (401) from now on."""
    with _client(ctx) as c:
        c.revoke_token(token_id)
    typer.echo(f"token {token_id} revoked")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
