"""Scenario Q (issue 10): the pending queue with 10,000 pending VMs from 10 projects.

A 1,000-host fleet; 10 projects each create 1,000 VMs that fit on no host (more memory than any
host has; four placement classes: TDX or not, with or without a zone selector; five sizes; random
priorities up to the maximum). Then, measured from the server's own counters:

- **wake-up**: 30 capacity changes (a host's labels patched, which wakes every replica's queue and
  clears its memo), 0.3 s apart: the queue's passes, their time, the placement attempts and the
  VMs skipped per wake-up, and the server CPU per wake-up;
- **idle**: 11 s without changes (two ticks of the queue): what a pass costs when nothing changed;
- **probe**: 20 times, an eleventh project's VM at the lowest priority, pending because it asks
  for a label no host has, then that label is put on one host: the time from the PATCH answer to
  the probe's ``vm.scheduled`` event (long-poll).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

from bench import fleet as fleetmod
from bench import scenarios, servers
from bench.load import Recorder, closed_loop, timed
from bench.scenarios import Row
from bench.wire import Connection

HOSTS = 1_000
PROJECTS = 10
PER_PROJECT = 1_000
WAKEUPS = 30
WAKEUP_GAP_S = 0.3
IDLE_S = 11.0
PROBES = 20
PROBE_TIMEOUT_S = 30.0
_QUEUE_METRICS = (
    "tdx_queue_passes_total", "tdx_queue_attempts_total", "tdx_queue_skipped_total",
    "tdx_queue_pass_seconds_sum", "tdx_queue_pass_seconds_count",
)


def flood_body(i: int) -> bytes:
    rng = random.Random(i)
    body: dict[str, Any] = {
        "name": f"flood-{i}",
        "project": f"team-{i % PROJECTS}",
        "vcpus": rng.choice([4, 8, 16, 32, 64]),
        "memory_mib": rng.choice([600, 700, 800]) * 1024,  # hosts have at most 512 GiB
        "tdx": rng.random() < 0.5,
        "priority": rng.randint(-1_000_000, 1_000_000),
    }
    if rng.random() < 0.5:
        body["selector"] = {"zone": f"z{rng.randrange(3)}"}
    return json.dumps(body, separators=(",", ":")).encode()


async def queue_metrics(port: int) -> dict[str, float]:
    conn = Connection("127.0.0.1", port)
    try:
        status, raw = await conn.request("GET", "/metrics")
    finally:
        conn.close()
    if status != 200:
        raise RuntimeError(f"GET /metrics -> {status}")
    out: dict[str, float] = {}
    for line in raw.decode().splitlines():
        if line.startswith(_QUEUE_METRICS):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in _QUEUE_METRICS}


def _per(d: dict[str, float], n: float) -> dict[str, float]:
    passes = d["tdx_queue_passes_total"]
    return {
        "passes": passes,
        "passes_per_wakeup": passes / n,
        "pass_ms_mean": d["tdx_queue_pass_seconds_sum"] / passes * 1000 if passes else float("nan"),
        "queue_ms_per_wakeup": d["tdx_queue_pass_seconds_sum"] / n * 1000,
        "attempts_per_wakeup": d["tdx_queue_attempts_total"] / n,
        "skipped_per_wakeup": d["tdx_queue_skipped_total"] / n,
    }


async def _patch_labels(conn: Connection, host: str, labels: dict[str, str]) -> float:
    body = json.dumps({"labels": labels}).encode()
    status, raw, took = await timed(conn, "PATCH", f"/v1/hosts/{host}", body)
    if status != 200:
        raise RuntimeError(f"PATCH {host} -> {status}: {raw[:300]!r}")
    return took


async def _wait_scheduled(conn: Connection, vm_id: str, after: int) -> bool:
    deadline = time.perf_counter() + PROBE_TIMEOUT_S
    while time.perf_counter() < deadline:
        status, raw = await conn.request(
            "GET", f"/v1/events?after={after}&kind=vm.scheduled&subject={vm_id}&wait=10"
        )
        if status != 200:
            raise RuntimeError(f"GET /v1/events -> {status}")
        page = json.loads(raw)
        if page["items"]:
            return True
        after = page["last_id"]
    return False


async def run(db: str, log_dir: Path, pg_url: str, api_hosts: int) -> list[Row]:
    headers = {"Authorization": f"Bearer {servers.ADMIN_TOKEN}"}
    backend_cm = servers.sqlite_backend() if db == "sqlite" else servers.postgres_backend(pg_url)
    with backend_cm as backend:
        server = await servers.start_service(backend, log_dir, name=f"{db}-q")
        try:
            return await _scenario(db, server, backend, headers, api_hosts)
        finally:
            server.stop()


async def _scenario(
    db: str, server: servers.Server, backend: servers.Backend, headers: dict[str, str], api_hosts: int
) -> list[Row]:
    fl = await fleetmod.load_fleet([server.port], fleetmod.FleetSpec(HOSTS, api_hosts=api_hosts), headers,
                                   database_url=backend.url)
    hosts = sorted(name for name, state in fl.states.items() if state == "ready")

    async def create(conn: Connection, i: int, rec: Recorder) -> None:
        status, raw, took = await timed(conn, "POST", "/v1/vms", flood_body(i))
        if status == 201 and json.loads(raw)["status"] == "pending":
            rec.add("pending", took)
        else:
            rec.error(f"flood:{status}", raw.decode(errors="replace"))

    cpu0 = scenarios.cpu_seconds([server.pid])
    flood = await closed_loop([server.port], 16, create, max_steps=PROJECTS * PER_PROJECT, headers=headers)
    flood.server_cpu_s = scenarios.cpu_seconds([server.pid]) - cpu0
    rows = [Row(f"Q flood: {PROJECTS * PER_PROJECT:,} pending VMs from {PROJECTS} projects", db, HOSTS, 16, 1,
                flood, op="pending", note="creates that fit nowhere (explained over every host)")]
    conn = Connection("127.0.0.1", server.port, headers)
    try:
        await asyncio.sleep(1.0)  # the queue settles (its memo fills) after the flood

        # Wake-ups: each a capacity change that clears the memo and restarts every walk.
        m0, c0 = await queue_metrics(server.port), scenarios.cpu_seconds([server.pid])
        wake = Recorder()
        wake.started = time.perf_counter()
        for i in range(WAKEUPS):
            wake.add("wakeup", await _patch_labels(conn, hosts[i % len(hosts)], {"bench": f"w{i}"}))
            await asyncio.sleep(WAKEUP_GAP_S)
        await asyncio.sleep(1.0)
        wake.ended = time.perf_counter()
        m1, c1 = await queue_metrics(server.port), scenarios.cpu_seconds([server.pid])
        wake.server_cpu_s = c1 - c0
        per_wake = _per(_delta(m0, m1), WAKEUPS)
        rows.append(Row(
            f"Q wake-up with {PROJECTS * PER_PROJECT:,} pending", db, HOSTS, 1, 1, wake, op="wakeup",
            note=(f"queue {per_wake['queue_ms_per_wakeup']:.1f} ms/wake-up in {per_wake['passes_per_wakeup']:.1f} "
                  f"pass(es); {per_wake['attempts_per_wakeup']:.1f} placement attempts and "
                  f"{per_wake['skipped_per_wakeup']:.0f} VMs skipped by the memo per wake-up; "
                  f"server CPU {(c1 - c0) / WAKEUPS * 1000:.1f} ms/wake-up (PATCH included)"),
            extra={"queue_per_wakeup": per_wake, "server_cpu_ms_per_wakeup": (c1 - c0) / WAKEUPS * 1000},
        ))

        # Idle: passes on the queue's tick with nothing changed.
        m2, c2 = await queue_metrics(server.port), scenarios.cpu_seconds([server.pid])
        await asyncio.sleep(IDLE_S)
        m3, c3 = await queue_metrics(server.port), scenarios.cpu_seconds([server.pid])
        idle = _per(_delta(m2, m3), 1)
        idle_rec = Recorder()
        idle_rec.started, idle_rec.ended = 0.0, IDLE_S
        rows.append(Row(
            f"Q idle tick with {PROJECTS * PER_PROJECT:,} pending", db, HOSTS, 0, 1, idle_rec, op="-",
            note=(f"{idle['passes']:.0f} pass(es) in {IDLE_S:.0f} s, {idle['pass_ms_mean']:.2f} ms each, "
                  f"{idle['attempts_per_wakeup']:.0f} attempts; server CPU {(c3 - c2) * 1000:.0f} ms in all"),
            extra={"idle": idle, "server_cpu_ms": (c3 - c2) * 1000},
        ))

        # Probes: another project's VM placed once a host can take it, however many are pending.
        probe = Recorder()
        probe.started = time.perf_counter()
        for i in range(PROBES):
            body = json.dumps({"name": f"probe-{i}", "project": "probe", "vcpus": 2, "memory_mib": 2048,
                               "tdx": True, "priority": -1_000_000, "selector": {"pool": f"p{i}"}}).encode()
            status, raw = await conn.request("POST", "/v1/vms", body)
            vm = json.loads(raw)
            if status != 201 or vm["status"] != "pending":
                probe.error(f"probe:{status}", raw.decode(errors="replace"))
                continue
            status, raw = await conn.request("GET", "/v1/events?after=0&limit=1")
            head = json.loads(raw)["head_id"]
            t0 = time.perf_counter()
            await _patch_labels(conn, hosts[(7 * i) % len(hosts)], {"pool": f"p{i}"})
            if await _wait_scheduled(conn, vm["id"], head):
                probe.add("placed", time.perf_counter() - t0)
            else:
                probe.error("probe:not-placed", f"probe-{i} not placed within {PROBE_TIMEOUT_S} s")
        probe.ended = time.perf_counter()
        s = probe.summary("placed")
        rows.append(Row(
            "Q probe: other project's VM placed after a host can take it", db, HOSTS, 1, 1, probe, op="placed",
            note=f"{s['count']:.0f}/{PROBES} placed; max {s['max_ms']:.0f} ms from the PATCH answer to vm.scheduled",
        ))
    finally:
        conn.close()
    return rows
