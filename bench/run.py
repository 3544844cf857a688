"""``python -m bench [--quick]``: ceilings, scenarios, table, JSON. See bench/README.md."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import dbceiling, fair_queue, report, scenarios, servers, watchers
from bench import fleet as fleetmod
from bench.checks import Ledger
from bench.load import Recorder, closed_loop, timed
from bench.scenarios import Driver, Row
from bench.wire import Connection

RESULTS = Path(__file__).resolve().parent / "results"
ALL = ("B", "S1", "S2", "S4", "S5", "S7", "S8", "Q", "W")


@dataclass(frozen=True)
class Plan:
    mode: str
    fleet_sizes: dict[str, tuple[int, ...]]  # per db, the fleets S1 runs on (S2/S5/S8 reuse them)
    s2_sizes: tuple[int, ...]
    s8_size: int
    s5_size: int
    latency_s: float
    sustained_s: float
    churn_s: float
    ceiling_s: float
    s4_hosts: int
    s4_keyids: int
    s4_no_host: int
    s7_hosts: int
    s7_replicas: tuple[int, ...]
    s7_seconds: float
    api_hosts: int  # at most this many hosts of a fleet are registered through the API; the rest seeded
    batch_hosts: int = 100_000  # B: a whole fleet registered through POST /v1/hosts:batch
    watch_s: float = 8.0  # W: each phase's writes (no watcher, 200 idle, 200 of every event)


QUICK = Plan(
    mode="quick",
    fleet_sizes={"sqlite": (1_000, 10_000), "postgres": (1_000,)},
    s2_sizes=(1_000, 10_000), s8_size=10_000, s5_size=1_000,
    latency_s=1.5, sustained_s=3.0, churn_s=2.0, ceiling_s=1.5,
    s4_hosts=200, s4_keyids=2, s4_no_host=200,
    s7_hosts=1_000, s7_replicas=(1, 2), s7_seconds=3.0, api_hosts=200, batch_hosts=10_000, watch_s=2.0,
)
FULL = Plan(
    mode="full",
    fleet_sizes={"sqlite": (1_000, 10_000, 100_000), "postgres": (1_000, 10_000, 100_000)},
    s2_sizes=(1_000, 10_000), s8_size=10_000, s5_size=1_000,
    latency_s=6.0, sustained_s=15.0, churn_s=10.0, ceiling_s=6.0,
    s4_hosts=1_000, s4_keyids=4, s4_no_host=1_500,
    s7_hosts=1_000, s7_replicas=(1, 2, 4), s7_seconds=12.0, api_hosts=2_000,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg(),
    }


# ---- ceilings --------------------------------------------------------------------------------


async def http_ceiling(log_dir: Path, seconds: float) -> dict[int, dict[str, float]]:
    server = await servers.start_ceiling(log_dir)
    try:
        out = {}
        for conns in (1, 16):

            async def step(conn: Connection, i: int, rec: Recorder) -> None:
                status, raw, took = await timed(conn, "POST", "/v1/vms", scenarios.vm_body(i, i % 2 == 1))
                if status == 201:
                    rec.add("ok", took)
                else:
                    rec.error(str(status), raw.decode(errors="replace"))

            cpu0 = scenarios.cpu_seconds([server.pid])
            rec = await closed_loop([server.port], conns, step, duration_s=seconds)
            out[conns] = rec.summary("ok")
            out[conns]["server_cpu_ms_per_request"] = (
                (scenarios.cpu_seconds([server.pid]) - cpu0) / max(rec.count("ok"), 1) * 1000
            )
        return out
    finally:
        server.stop()


def db_ceiling(db: str, seconds: float, pg_url: str) -> float:
    if db == "sqlite":
        tmp = Path(tempfile.mkdtemp(prefix="tdx-bench-ceiling-"))
        try:
            return dbceiling.sqlite_commits_per_s(tmp, seconds)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    with servers.postgres_backend(pg_url) as backend:
        return dbceiling.postgres_commits_per_s(backend.url, seconds)


# ---- scenarios ---------------------------------------------------------------------------------


def backend_for(db: str, pg_url: str) -> contextlib.AbstractContextManager[servers.Backend]:
    return servers.sqlite_backend() if db == "sqlite" else servers.postgres_backend(pg_url)


@contextlib.asynccontextmanager
async def serving(backend: servers.Backend, log_dir: Path, name: str) -> AsyncIterator[servers.Server]:
    server = await servers.start_service(backend, log_dir, name=name)
    try:
        yield server
    finally:
        server.stop()


HEADERS = {"Authorization": f"Bearer {servers.ADMIN_TOKEN}"}


def load_row(db: str, fl: fleetmod.Fleet, cpu_s: float) -> Row:
    rec = Recorder()
    rec.started, rec.ended = 0.0, fl.seconds
    rec.latencies["hosts"] = [float("nan")] * fl.api_hosts
    rec.server_cpu_s = cpu_s / 2  # two requests per host; the column is per request
    seeded = f"{fl.spec.seeded:,} seeded first, " if fl.spec.seeded else ""
    return Row("load fleet via API (POST host + load)", db, fl.spec.hosts, 16, 1, rec, op="hosts",
               note=f"{seeded}{fl.api_hosts:,} via API in {fl.seconds:.1f} s; 100k would take "
               f"{100_000 / fl.hosts_per_s:.0f} s")


async def fleet_scenarios(db: str, hosts: int, plan: Plan, wanted: set[str], pg_url: str, log_dir: Path,
                          verifications: list[dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    with backend_for(db, pg_url) as backend:
        async with serving(backend, log_dir, f"{db}-{hosts}") as server:
            log(f"{db}: registering {hosts:,} hosts" + (
                f" ({max(hosts - plan.api_hosts, 0):,} seeded, then {min(hosts, plan.api_hosts):,} through the API)"
                if hosts > plan.api_hosts else " through the API"))
            spec = fleetmod.FleetSpec(hosts, api_hosts=plan.api_hosts)
            cpu0 = scenarios.cpu_seconds([server.pid])
            fl = await fleetmod.load_fleet([server.port], spec, HEADERS, database_url=backend.url)
            log(f"{db}: {fl.api_hosts:,} hosts through the API in {fl.seconds:.1f} s ({fl.hosts_per_s:,.0f} hosts/s)"
                + (f", {spec.seeded:,} seeded" if spec.seeded else ""))
            rows.append(load_row(db, fl, scenarios.cpu_seconds([server.pid]) - cpu0))
            ledger = Ledger(fl.states)
            driver = Driver([server.port], HEADERS, ledger, prefix=f"n{hosts}", pids=[server.pid])
            if "S1" in wanted:
                log(f"{db}: S1 at {hosts:,} hosts")
                rows += await scenarios.s1_latency(driver, db, hosts, plan.latency_s)
            s2: Row | None = None
            if hosts in plan.s2_sizes and ({"S2", "S8"} & wanted):
                log(f"{db}: S2 at {hosts:,} hosts")
                s2 = await scenarios.s2_sustained(driver, db, hosts, plan.sustained_s)
                rows.append(s2)
            if hosts == plan.s8_size and "S8" in wanted and s2 is not None:
                log(f"{db}: S8 at {hosts:,} hosts")
                rows.append(await scenarios.s8_heartbeats(driver, db, fl, plan.sustained_s, s2))
            if hosts == plan.s5_size and "S5" in wanted:
                log(f"{db}: S5 at {hosts:,} hosts")
                rows += await scenarios.s5_churn(driver, db, hosts, plan.churn_s)
            log(f"{db}: checking {hosts:,} hosts for over-commits")
            mine = [r for r in rows if r.hosts == hosts]
            v = await scenarios.verify(mine, server.port, HEADERS, ledger)
            verifications.append({"db": db, "hosts": hosts, "scenarios": "S1/S2/S5/S8", **v})
    return rows


async def bulk_load(db: str, plan: Plan, pg_url: str, log_dir: Path) -> list[Row]:
    with backend_for(db, pg_url) as backend:
        async with serving(backend, log_dir, f"{db}-batch") as server:
            log(f"{db}: B, {plan.batch_hosts:,} hosts through POST /v1/hosts:batch")
            cpu0 = scenarios.cpu_seconds([server.pid])
            rec = await fleetmod.load_fleet_batched(server.port, plan.batch_hosts, HEADERS)
            rec.server_cpu_s = scenarios.cpu_seconds([server.pid]) - cpu0
            seconds = rec.elapsed
            return [Row("B load fleet via POST /v1/hosts:batch (with loads)", db, plan.batch_hosts, 2, 1, rec,
                        op="hosts", note=f"{rec.count('hosts'):,} hosts in {seconds:.1f} s, batches of "
                        f"{fleetmod.BATCH:,}; latencies are per batch")]


async def s4(db: str, plan: Plan, pg_url: str, log_dir: Path, verifications: list[dict[str, Any]]) -> list[Row]:
    with backend_for(db, pg_url) as backend:
        async with serving(backend, log_dir, f"{db}-s4") as server:
            spec = fleetmod.FleetSpec(plan.s4_hosts, keyids=plan.s4_keyids)
            fl = await fleetmod.load_fleet([server.port], spec, HEADERS, database_url=backend.url)
            ledger = Ledger(fl.states)
            driver = Driver([server.port], HEADERS, ledger, prefix="s4", pids=[server.pid])
            log(f"{db}: S4 on {plan.s4_hosts:,} hosts with {plan.s4_keyids} KeyIDs each")
            rows = await scenarios.s4_scarce(driver, db, fl, plan.s4_no_host)
            v = await scenarios.verify(rows, server.port, HEADERS, ledger)
            verifications.append({"db": db, "hosts": plan.s4_hosts, "scenarios": "S4", **v})
            return rows


def _pin_replicas(pids: list[int]) -> str:
    """Each replica on a core of its own (as ``taskset -cp``), the driver (this process) on the
    cores left, if any; PostgreSQL is not pinned. Returns the note the S7 rows carry."""
    try:
        cores = sorted(os.sched_getaffinity(0) | set().union(*(os.sched_getaffinity(p) for p in pids)))
    except (AttributeError, OSError):
        return "not pinned (no sched_setaffinity)"
    for i, pid in enumerate(pids):
        os.sched_setaffinity(pid, {cores[i % len(cores)]})
    left = cores[len(pids):]
    replicas = ", ".join(f"replica {i + 1} on CPU {cores[i % len(cores)]}" for i in range(len(pids)))
    if left:
        os.sched_setaffinity(0, set(left))
        return f"{replicas}; driver on CPU {','.join(map(str, left))}; PostgreSQL unpinned"
    os.sched_setaffinity(0, set(cores))
    return f"{replicas}; driver and PostgreSQL unpinned ({len(cores)} CPUs: none left apart)"


async def s7(plan: Plan, pg_url: str, log_dir: Path, verifications: list[dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    with servers.postgres_backend(pg_url) as backend:
        first = await servers.start_service(backend, log_dir, name="pg-replica-1")
        replicas = [first]
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        try:
            fl = await fleetmod.load_fleet([first.port], fleetmod.FleetSpec(plan.s7_hosts), HEADERS)
            ledger = Ledger(fl.states)
            for n in plan.s7_replicas:
                while len(replicas) < n:
                    replicas.append(
                        await servers.start_service(backend, log_dir, name=f"pg-replica-{len(replicas) + 1}")
                    )
                log(f"postgres: S7 with {n} replica(s)")
                pinning = _pin_replicas([r.pid for r in replicas])
                driver = Driver([r.port for r in replicas], HEADERS, ledger, prefix=f"r{n}",
                                pids=[r.pid for r in replicas])
                rec, conflicts, placed = await scenarios.measured(
                    driver, lambda d=driver: d.creates(16, plan.s7_seconds)
                )
                rows.append(Row("S7 replicas", "postgres", plan.s7_hosts, 16, n, rec,
                                conflicts=conflicts, successes=placed, note=pinning))
            v = await scenarios.verify(rows, first.port, HEADERS, ledger)
            verifications.append({"db": "postgres", "hosts": plan.s7_hosts, "scenarios": "S7", **v})
        finally:
            for r in replicas:
                r.stop()
            if affinity is not None:
                os.sched_setaffinity(0, affinity)
    return rows


# ---- targets ---------------------------------------------------------------------------------


def _find(rows: list[dict[str, Any]], scenario: str, db: str, **kw: Any) -> dict[str, Any] | None:
    for r in rows:
        if r["scenario"].startswith(scenario) and r["db"] == db and all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def targets(rows: list[dict[str, Any]], http16: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: str, met: bool | None) -> None:
        out.append({"target": name, "measured": value, "goal": goal, "met": met})

    for hosts in (1_000, 10_000):
        r = _find(rows, "S2", "sqlite", hosts=hosts)
        if r:
            ratio = r["per_s"] / http16 if http16 else None
            add(f"S2 SQLite {hosts:,} hosts: placements/s / HTTP ceiling", ratio, ">= 0.5",
                None if ratio is None else ratio >= 0.5)
    for conns in (1, 16):
        a = _find(rows, "S1", "sqlite", hosts=1_000, conns=conns)
        b = _find(rows, "S1", "sqlite", hosts=100_000, conns=conns) or _find(rows, "S1", "sqlite", hosts=10_000,
                                                                              conns=conns)
        if a and b:
            ratio = b["p99_ms"] / a["p99_ms"]
            add(f"S1 SQLite {conns} conn: p99 at {b['hosts']:,} / p99 at 1,000 hosts", ratio, "<= 2", ratio <= 2)
    one = _find(rows, "S7", "postgres", replicas=1)
    two = _find(rows, "S7", "postgres", replicas=2)
    if one and two:
        ratio = two["per_s"] / one["per_s"]
        add("S7 PostgreSQL: 2 replicas / 1 replica", ratio, ">= 1.6", ratio >= 1.6)
        worst = max(r["retries_per_success"] for r in rows if r["scenario"].startswith("S7"))
        add("S7 PostgreSQL: retries per success (worst)", worst, "<= 0.05", worst <= 0.05)
        oc = max((r["overcommits"] or 0) for r in rows if r["scenario"].startswith("S7"))
        add("S7 PostgreSQL: over-commits", oc, "== 0", oc == 0)
    for db in ("sqlite", "postgres"):
        r = _find(rows, "S8", db)
        if r:
            cost = r["extra"]["s2_throughput_cost"]
            add(f"S8 {db}: S2 throughput lost to heartbeats", cost, "<= 0.20", cost <= 0.20)
        fill = _find(rows, "S4 scarce KeyIDs: fill", db)
        none = _find(rows, "S4 scarce KeyIDs: no host", db)
        if fill and none:
            ratio = none["p99_ms"] / fill["p99_ms"]
            add(f"S4 {db}: no-host p99 / placement p99", ratio, "<= 1", ratio <= 1)
            ratio50 = none["p50_ms"] / fill["p50_ms"]
            add(f"S4 {db}: no-host p50 / placement p50", ratio50, "<= 1", ratio50 <= 1)
        bulk = [r for r in rows if r["scenario"].startswith("B load fleet") and r["db"] == db]
        if bulk:
            seconds = 100_000 / bulk[0]["per_s"]
            add(f"{db}: seconds to load 100k hosts through POST /v1/hosts:batch (rate at {bulk[0]['hosts']:,})",
                seconds, "< 120", seconds < 120)
        loads = [r for r in rows if r["scenario"].startswith("load fleet") and r["db"] == db]
        if loads:
            biggest = max(loads, key=lambda r: (r["count"], r["hosts"]))
            seconds = 100_000 / biggest["per_s"]
            add(f"{db}: seconds to load 100k hosts one request at a time (rate at {biggest['hosts']:,})",
                seconds, "< 120", seconds < 120)
    for r in rows:
        if r["scenario"].startswith(f"W creates with {watchers.WATCHERS} idle"):
            where = f"W {r['db']}" + (f", {r['replicas']} replicas" if r["replicas"] > 1 else "")
            p99 = r["extra"]["p99_vs_none"]
            add(f"{where}: create p99 with {watchers.WATCHERS} idle watchers / without", p99, "<= 3", p99 <= 3)
            rate = r["extra"]["rate_vs_none"]
            add(f"{where}: create rate with {watchers.WATCHERS} idle watchers / without", rate, ">= 0.5", rate >= 0.5)
    total_oc = sum((r["overcommits"] or 0) for r in rows)
    add("over-commits, all scenarios", total_oc, "== 0", total_oc == 0)
    return out


# ---- main --------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    if args.fleets:
        sizes = tuple(int(x) for x in args.fleets.split(","))
        plan = replace(plan, fleet_sizes={db: sizes for db in plan.fleet_sizes}, s2_sizes=sizes,
                       s8_size=max(sizes), s5_size=min(sizes), s4_hosts=min(sizes), s7_hosts=min(sizes))
    wanted = set(args.scenarios)
    dbs = list(args.db)
    if "postgres" in dbs and not servers.postgres_reachable(args.postgres_url):
        log(f"PostgreSQL at {args.postgres_url} is not reachable: running SQLite only")
        dbs = [d for d in dbs if d != "postgres"]
    started = time.time()
    log_dir = Path(tempfile.mkdtemp(prefix="tdx-bench-logs-"))
    doc: dict[str, Any] = {
        "command": " ".join(["python", "-m", "bench", *sys.argv[1:]]),
        "mode": plan.mode,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": "tdx-service serve, 1 process per replica, TDX_SQLITE_SYNCHRONOUS=FULL (WAL), request "
        "logging on, TDX_HEARTBEAT_TIMEOUT_S=86400 (fleets do not heartbeat except in S8)",
    }
    log(f"mode {plan.mode}; databases {dbs}; scenarios {sorted(wanted)}; server logs in {log_dir}")
    rows: list[Row] = []
    verifications: list[dict[str, Any]] = []
    try:
        log("HTTP ceiling (trivial FastAPI endpoint, same body)")
        ceiling_before = await http_ceiling(log_dir, plan.ceiling_s)
        db_ceilings = {}
        for db in dbs:
            log(f"database ceiling: {db}")
            db_ceilings[db] = db_ceiling(db, plan.ceiling_s, args.postgres_url)
        for db in dbs:
            if wanted & {"S1", "S2", "S5", "S8"}:
                for hosts in plan.fleet_sizes[db]:
                    rows += await fleet_scenarios(db, hosts, plan, wanted, args.postgres_url, log_dir, verifications)
            if "S4" in wanted:
                rows += await s4(db, plan, args.postgres_url, log_dir, verifications)
            if "B" in wanted:
                rows += await bulk_load(db, plan, args.postgres_url, log_dir)
            if "Q" in wanted:
                log(f"{db}: Q, the pending queue with {fair_queue.PROJECTS * fair_queue.PER_PROJECT:,} pending VMs")
                rows += await fair_queue.run(db, log_dir, args.postgres_url, plan.api_hosts)
            if "W" in wanted:
                log(f"{db}: W, creates with 0 and {watchers.WATCHERS} event watchers")
                rows += await watchers.run(db, log_dir, args.postgres_url, plan.watch_s, plan.api_hosts)
        if "S7" in wanted and "postgres" in dbs:
            rows += await s7(plan, args.postgres_url, log_dir, verifications)
        log("HTTP ceiling again (the machine is shared: the ratios use the mean of both)")
        ceiling_after = await http_ceiling(log_dir, plan.ceiling_s)
    finally:
        if not args.keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)
    http = {c: (ceiling_before[c]["per_s"] + ceiling_after[c]["per_s"]) / 2 for c in (1, 16)}
    out_rows = [report.row_dict(r, http, db_ceilings) for r in rows]
    doc.update(
        http_ceiling={"before": ceiling_before, "after": ceiling_after, "mean_per_s": http},
        db_ceiling_commits_per_s=db_ceilings,
        rows=out_rows,
        verifications=verifications,
        targets=targets(out_rows, http[16]),
        seconds=round(time.time() - started, 1),
    )
    text = report.table(out_rows)
    print()
    cpu = [c[16]["server_cpu_ms_per_request"] for c in (ceiling_before, ceiling_after)]
    print(f"HTTP ceiling (trivial FastAPI POST, same body): {http[1]:,.0f} req/s with 1 connection, "
          f"{http[16]:,.0f} req/s with 16 (server CPU {sum(cpu) / 2:.2f} ms/req)")
    print("DB ceiling (one-row INSERT + COMMIT loop): "
          + ", ".join(f"{db} {v:,.0f} commits/s" for db, v in db_ceilings.items()))
    print()
    print(text)
    print()
    for t in doc["targets"]:
        mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        value = t["measured"]
        shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
        print(f"  [{mark:>6}] {t['target']}: {shown} (goal {t['goal']})")
    bad = [v for v in verifications if v["overcommits"] or not v["accounting_ok"] or v["misplaced"]]
    for v in verifications:
        print(f"  checked {v['hosts']:,} hosts ({v['db']}, {v['scenarios']}): over-commits {v['overcommits']}, "
              f"VMs on hosts {v['vms_on_hosts']:,} vs acknowledged {v['vms_acknowledged']:,}, "
              f"TDX VMs on non-ready hosts {v['misplaced']}")
    name = f"bench-{plan.mode}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path = Path(args.out) if args.out else RESULTS / name
    report.write_json(path, doc)
    print(f"\nwrote {path} ({doc['seconds']:.0f} s)")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small fleets and short runs (under 3 minutes)")
    parser.add_argument("--db", nargs="+", choices=("sqlite", "postgres"), default=["sqlite", "postgres"])
    parser.add_argument("--scenarios", nargs="+", choices=ALL, default=list(ALL), metavar="S",
                        help=f"any of {' '.join(ALL)}")
    parser.add_argument("--postgres-url", default=os.environ.get("TDX_BENCH_POSTGRES_URL",
                                                                 servers.DEFAULT_POSTGRES_URL))
    parser.add_argument("--fleets", help="comma-separated fleet sizes instead of the mode's (for trying things)")
    parser.add_argument("--out", help="JSON path (default bench/results/bench-<mode>-<time>.json)")
    parser.add_argument("--profile", metavar="DIR",
                        help="record every service process with py-spy into DIR (see bench/profile.py)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (temp dir)")
    args = parser.parse_args(argv)
    if args.profile:
        from bench import profile

        if profile.executable() is None:
            parser.error("--profile needs py-spy (pip install py-spy, part of the bench extra)")
        servers.PROFILE_DIR = Path(args.profile).resolve()
    try:
        import uvloop

        return uvloop.run(main_async(args))
    except ImportError:
        return asyncio.run(main_async(args))



