"""The scenarios of issue 5. Each drives a real server over HTTP and returns result rows."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Any

from bench import fleet as fleetmod
from bench.checks import Ledger, check_fleet, conflicts_and_placements
from bench.load import Recorder, closed_loop, timed
from bench.wire import Connection

VM_VCPUS = 2
VM_MEMORY_MIB = 2048


def vm_body(i: int, tdx: bool, prefix: str = "vm") -> bytes:
    return b'{"name":"%s-%d","vcpus":%d,"memory_mib":%d,"tdx":%s}' % (
        prefix.encode(), i, VM_VCPUS, VM_MEMORY_MIB, b"true" if tdx else b"false"
    )


@dataclass
class Row:
    """One line of the results table."""

    scenario: str
    db: str
    hosts: int
    conns: int
    replicas: int
    rec: Recorder
    op: str = "scheduled"  # the outcome whose rate and latency the row reports
    conflicts: float = 0.0
    successes: float = 0.0
    overcommits: int | None = None
    misplaced: int = 0
    note: str = ""
    extra: dict[str, Any] | None = None

    @property
    def per_s(self) -> float:
        return self.rec.rate(self.op)

    @property
    def cpu_ms_per_request(self) -> float:
        requests = sum(len(v) for v in self.rec.latencies.values())
        return self.rec.server_cpu_s / requests * 1000 if requests and self.rec.server_cpu_s else float("nan")

    @property
    def retries_per_success(self) -> float:
        return self.conflicts / self.successes if self.successes else 0.0


class Driver:
    """Issues the scenario requests on a server (or several replicas) and keeps the ledger."""

    def __init__(
        self, ports: list[int], headers: dict[str, str], ledger: Ledger, prefix: str, pids: list[int] | None = None
    ) -> None:
        self.ports = ports
        self.pids = pids or []
        self.headers = headers
        self.ledger = ledger
        self.prefix = prefix

    async def create(self, conn: Connection, i: int, rec: Recorder, tdx: bool | None = None) -> None:
        tdx = (i % 2 == 1) if tdx is None else tdx
        status, raw, dt = await timed(conn, "POST", "/v1/vms", vm_body(i, tdx, self.prefix))
        if status != 201:
            rec.error(f"create:{status}", raw.decode(errors="replace"))
            return
        vm = json.loads(raw)
        if vm["status"] == "scheduled":
            rec.add("scheduled", dt)
            self.ledger.placed(vm, tdx)
        else:
            rec.add("no_host", dt)

    async def delete(self, conn: Connection, rec: Recorder) -> bool:
        vm_id = self.ledger.pop_any()
        if vm_id is None:
            return False
        status, raw, dt = await timed(conn, "DELETE", f"/v1/vms/{vm_id}")
        if status != 202:
            rec.error(f"delete:{status}", raw.decode(errors="replace"))
            return True
        self.ledger.deleted += 1
        rec.add("deleted", dt)
        return True

    async def preview(self, conn: Connection, i: int, rec: Recorder) -> None:
        status, raw, dt = await timed(conn, "POST", "/v1/schedule/preview", vm_body(i, i % 2 == 1, self.prefix))
        if status != 200:
            rec.error(f"preview:{status}", raw.decode(errors="replace"))
            return
        rec.add("preview", dt)

    async def creates(self, conns: int, seconds: float, tdx: bool | None = None) -> Recorder:
        async def step(conn: Connection, i: int, rec: Recorder) -> None:
            await self.create(conn, i, rec, tdx)

        return await closed_loop(self.ports, conns, step, duration_s=seconds, headers=self.headers)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the server processes: on a shared machine, the cost per request
    that other load does not distort (unlike throughput)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def measured(driver: Driver, run: Any) -> tuple[Recorder, float, float]:
    """Runs ``run()`` and returns its recorder with the claim conflicts and placements the
    servers counted meanwhile; the servers' CPU time goes into ``rec.server_cpu_s``."""
    c0, p0 = await conflicts_and_placements(driver.ports)
    cpu0 = cpu_seconds(driver.pids)
    rec: Recorder = await run()
    rec.server_cpu_s = cpu_seconds(driver.pids) - cpu0
    c1, p1 = await conflicts_and_placements(driver.ports)
    return rec, c1 - c0, p1 - p0


# ---- S1 / S2 / S8 / S5 share a loaded fleet --------------------------------------------------


async def s1_latency(driver: Driver, db: str, hosts: int, seconds: float) -> list[Row]:
    rows = []
    for conns in (1, 16):
        rec, conflicts, placed = await measured(driver, lambda c=conns: driver.creates(c, seconds))
        rows.append(Row("S1 latency", db, hosts, conns, 1, rec, conflicts=conflicts, successes=placed))
    return rows


async def s2_sustained(driver: Driver, db: str, hosts: int, seconds: float) -> Row:
    rec, conflicts, placed = await measured(driver, lambda: driver.creates(16, seconds))
    return Row("S2 sustained creates", db, hosts, 16, 1, rec, conflicts=conflicts, successes=placed)


async def heartbeats(
    port: int, headers: dict[str, str], fl: fleetmod.Fleet, period_s: float, stop: asyncio.Event, rec: Recorder
) -> None:
    """Every host with a load heartbeats once per ``period_s``, spread evenly over the period."""
    names = list(fl.load_ids)
    random.Random(7).shuffle(names)
    interval = period_s / max(len(names), 1)
    conns = [Connection("127.0.0.1", port, headers) for _ in range(8)]
    queue: asyncio.Queue[str] = asyncio.Queue()

    async def sender(conn: Connection) -> None:
        while not stop.is_set():
            try:
                name = await asyncio.wait_for(queue.get(), 0.2)
            except TimeoutError:
                continue
            body = b'{"load_id":"%s"}' % fl.load_ids[name].encode()
            status, raw, dt = await timed(conn, "POST", f"/v1/hosts/{name}/heartbeat", body)
            if status == 200:
                rec.add("heartbeat", dt)
            else:
                rec.error(f"heartbeat:{status}", raw.decode(errors="replace"))

    senders = [asyncio.create_task(sender(c)) for c in conns]
    rec.started = time.perf_counter()
    i = 0
    try:
        while not stop.is_set():
            due = rec.started + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if queue.qsize() < 1000:  # a server that falls behind is not buried in a backlog
                queue.put_nowait(names[i % len(names)])
            else:
                rec.error("heartbeat:behind", "the server fell behind the heartbeat schedule")
            i += 1
    finally:
        rec.ended = time.perf_counter()
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        for c in conns:
            c.close()


async def s8_heartbeats(
    driver: Driver, db: str, fl: fleetmod.Fleet, seconds: float, baseline: Row, period_s: float = 10.0
) -> Row:
    stop = asyncio.Event()
    hb = Recorder()
    # The heartbeats start a full period early, so that the whole S2 run sees their steady rate.
    warm = min(period_s, 3.0)
    task = asyncio.create_task(heartbeats(driver.ports[0], driver.headers, fl, period_s, stop, hb))
    await asyncio.sleep(warm)
    rec, conflicts, placed = await measured(driver, lambda: driver.creates(16, seconds))
    stop.set()
    await task
    hb_summary = hb.summary("heartbeat")
    cost = 1 - (rec.rate("scheduled") / baseline.per_s) if baseline.per_s else float("nan")
    return Row(
        "S8 S2 + heartbeats", db, fl.spec.hosts, 16, 1, rec, conflicts=conflicts, successes=placed,
        note=f"{hb_summary['per_s']:.0f} heartbeats/s (p99 {hb_summary['p99_ms']:.1f} ms); S2 cost {cost:.0%}",
        extra={"heartbeats": hb_summary, "heartbeat_errors": hb.errors, "s2_throughput_cost": cost},
    )


async def s5_churn(driver: Driver, db: str, hosts: int, seconds: float) -> list[Row]:
    async def step(conn: Connection, i: int, rec: Recorder) -> None:
        r = i % 10
        if r < 6:
            await driver.create(conn, i, rec)
        elif r < 9:
            if not await driver.delete(conn, rec):
                await driver.create(conn, i, rec)
        else:
            await driver.preview(conn, i, rec)

    async def run() -> Recorder:
        return await closed_loop(driver.ports, 16, step, duration_s=seconds, headers=driver.headers)

    rec, conflicts, placed = await measured(driver, run)
    return [
        Row("S5 churn 60/30/10", db, hosts, 16, 1, rec, op=op, conflicts=conflicts, successes=placed)
        for op in ("scheduled", "deleted", "preview")
    ]


# ---- S4: scarce KeyIDs ---------------------------------------------------------------------


async def s4_scarce(driver: Driver, db: str, fl: fleetmod.Fleet, no_host_requests: int) -> list[Row]:
    keyids = sum(1 for s in fl.states.values() if s == "ready") * fl.spec.keyids

    def full(rec: Recorder) -> bool:
        return rec.count("scheduled") >= keyids or rec.count("no_host") > 0

    async def step(conn: Connection, i: int, rec: Recorder) -> None:
        await driver.create(conn, i, rec, tdx=True)

    async def fill() -> Recorder:
        return await closed_loop(driver.ports, 16, step, headers=driver.headers, until=full)

    rec, conflicts, placed = await measured(driver, fill)

    async def exhausted() -> Recorder:
        return await closed_loop(
            driver.ports, 16, lambda c, i, r: step(c, 10_000_000 + i, r),
            max_steps=no_host_requests, headers=driver.headers,
        )

    rec2, c2, p2 = await measured(driver, exhausted)
    taken = driver.ledger.scheduled
    return [
        Row("S4 scarce KeyIDs: fill", db, fl.spec.hosts, 16, 1, rec, conflicts=conflicts, successes=placed,
            note=f"{taken}/{keyids} KeyIDs taken", extra={"keyids_total": keyids, "keyids_taken": taken}),
        Row("S4 scarce KeyIDs: no host", db, fl.spec.hosts, 16, 1, rec2, op="no_host", conflicts=c2,
            successes=p2, note=f"{rec2.count('scheduled')} placed after exhaustion"),
    ]


async def verify(rows: list[Row], port: int, headers: dict[str, str], ledger: Ledger) -> dict[str, Any]:
    """Over-commits (must be 0) and that the hosts' usage adds up to what the driver was told."""
    check = await check_fleet(port, headers)
    expected = ledger.scheduled - ledger.deleted
    for row in rows:
        row.overcommits = len(check.overcommitted)
        row.misplaced = ledger.misplaced
    out = check.as_dict()
    out.update(vms_acknowledged=expected, accounting_ok=check.vms_on_hosts == expected, misplaced=ledger.misplaced)
    return out
