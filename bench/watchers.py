"""Scenario W (issue 9): what idle event watchers cost the writers.

A 200-host fleet; ``POST /v1/vms`` on 4 connections for a few seconds with no watcher, then the
same with 200 idle SSE streams open (a client token of a project that creates nothing: the streams
receive nothing, as in the report that 500 of them cut PostgreSQL writes from 149/s to 26/s), then
with 200 streams of a reader token that receive every event. On PostgreSQL, the same again with two
replicas: the writes on one, the watchers on the other. Reported per phase: the creates' rate,
p50 and p99, the server CPU per create, and the broadcaster's reads of the event log per create
(``tdx_event_fanout_reads_total`` of the watchers' replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench import fleet as fleetmod
from bench import scenarios, servers
from bench.load import Recorder, closed_loop, timed
from bench.scenarios import Row
from bench.wire import Connection

HOSTS = 200
WATCHERS = 200
CONNS = 4
STREAM_ENV = {"TDX_MAX_STREAMS_PER_PRINCIPAL": str(WATCHERS + 10)}


async def _metric(port: int, name: str) -> float | None:
    conn = Connection("127.0.0.1", port)
    try:
        _status, raw = await conn.request("GET", "/metrics")
    finally:
        conn.close()
    for line in raw.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def _token(port: int, headers: dict[str, str], body: dict[str, str]) -> str:
    conn = Connection("127.0.0.1", port, headers)
    try:
        status, raw = await conn.request("POST", "/v1/tokens", json.dumps(body).encode())
    finally:
        conn.close()
    if status != 201:
        raise RuntimeError(f"token: {status} {raw!r}")
    return str(json.loads(raw)["token"])


@contextlib.asynccontextmanager
async def _streams(port: int, token: str, count: int) -> AsyncIterator[None]:
    """``count`` SSE streams from now on, each drained by a task (a watcher that keeps up)."""
    writers: list[asyncio.StreamWriter] = []
    tasks: list[asyncio.Task[None]] = []

    async def drain(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while await reader.read(65536):
                pass

    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writers.append(writer)
            writer.write(
                f"GET /v1/events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                "Accept: text/event-stream\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"stream refused: {head[:200]!r}")
            tasks.append(asyncio.create_task(drain(reader)))
        deadline = time.monotonic() + 20
        while (seen := await _metric(port, "tdx_event_watchers")) not in (None, float(count)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{seen} watchers, expected {count}")
            await asyncio.sleep(0.05)
        yield
    finally:
        for w in writers:
            w.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _writes(write_port: int, watch_port: int, pids: list[int], headers: dict[str, str], prefix: str,
                  seconds: float) -> tuple[Recorder, float | None]:
    async def step(conn: Connection, i: int, rec: Recorder) -> None:
        status, raw, took = await timed(conn, "POST", "/v1/vms", scenarios.vm_body(i, False, prefix))
        if status == 201:
            rec.add("created", took)
        else:
            rec.error(f"create:{status}", raw.decode(errors="replace"))

    reads0 = await _metric(watch_port, "tdx_event_fanout_reads_total")
    cpu0 = scenarios.cpu_seconds(pids)
    rec = await closed_loop([write_port], CONNS, step, duration_s=seconds, headers=headers)
    rec.server_cpu_s = scenarios.cpu_seconds(pids) - cpu0
    reads1 = await _metric(watch_port, "tdx_event_fanout_reads_total")
    per_create = None
    if reads0 is not None and reads1 is not None and rec.count("created"):
        per_create = (reads1 - reads0) / rec.count("created")
    return rec, per_create


async def _phases(db: str, label: str, write: servers.Server, watch: servers.Server, replicas: int,
                  seconds: float) -> list[Row]:
    headers = {"Authorization": f"Bearer {servers.ADMIN_TOKEN}"}
    pids = sorted({write.pid, watch.pid})
    idle = await _token(watch.port, headers, {"role": "client", "project": "bench-watchers"})
    every = await _token(watch.port, headers, {"role": "reader"})
    rows: list[Row] = []
    base: Row | None = None
    for name, token, count in (("no watcher", None, 0), (f"{WATCHERS} idle watchers", idle, WATCHERS),
                               (f"{WATCHERS} watchers of every event", every, WATCHERS)):
        async with contextlib.AsyncExitStack() as stack:
            if token is not None:
                await stack.enter_async_context(_streams(watch.port, token, count))
            rec, reads = await _writes(write.port, watch.port, pids, headers, f"w{len(rows)}", seconds)
        s = rec.summary("created")
        extra: dict[str, Any] = {"watchers": count, "fanout_reads_per_create": reads}
        note = f"{label}; " + (f"{reads:.2f} reads of the log per create" if reads is not None else "")
        if base is not None:
            b = base.rec.summary("created")
            extra.update(
                p50_vs_none=s["p50_ms"] / b["p50_ms"], p99_vs_none=s["p99_ms"] / b["p99_ms"],
                rate_vs_none=s["per_s"] / b["per_s"],
            )
            note += (f"; vs no watcher: p50 x{extra['p50_vs_none']:.2f}, p99 x{extra['p99_vs_none']:.2f}, "
                     f"rate x{extra['rate_vs_none']:.2f}")
        row = Row(f"W creates with {name}", db, HOSTS, CONNS, replicas, rec, op="created", note=note, extra=extra)
        rows.append(row)
        base = base or row
    return rows


async def run(db: str, log_dir: Path, pg_url: str, seconds: float, api_hosts: int) -> list[Row]:
    headers = {"Authorization": f"Bearer {servers.ADMIN_TOKEN}"}
    rows: list[Row] = []
    backend_cm = servers.sqlite_backend() if db == "sqlite" else servers.postgres_backend(pg_url)
    with backend_cm as backend:
        first = await servers.start_service(backend, log_dir, name=f"{db}-w1", **STREAM_ENV)
        started = [first]
        try:
            await fleetmod.load_fleet([first.port], fleetmod.FleetSpec(HOSTS, api_hosts=api_hosts), headers,
                                      database_url=backend.url)
            rows += await _phases(db, "1 replica", first, first, 1, seconds)
            if db == "postgres":
                second = await servers.start_service(backend, log_dir, name=f"{db}-w2", **STREAM_ENV)
                started.append(second)
                rows += await _phases(db, "writes on replica 1, watchers on replica 2", first, second, 2, seconds)
        finally:
            for s in started:
                s.stop()
    return rows
