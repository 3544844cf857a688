"""Closed-loop load: C connections, each sending its next request as soon as the last one answered.

A step is one request (or a few) made by one worker; it records how long it took under an outcome
label (``scheduled``, ``no_host``, ``deleted``, ``error:500``...). Throughput and latency
percentiles are computed per label afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.wire import Connection


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


@dataclass
class Recorder:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str | None = None
    started: float = 0.0
    ended: float = 0.0
    stop: bool = False
    server_cpu_s: float = 0.0

    def add(self, label: str, seconds: float) -> None:
        self.latencies.setdefault(label, []).append(seconds)

    def error(self, label: str, detail: str) -> None:
        self.errors[label] = self.errors.get(label, 0) + 1
        if self.first_error is None:
            self.first_error = f"{label}: {detail[:300]}"

    @property
    def elapsed(self) -> float:
        return max(self.ended - self.started, 1e-9)

    def count(self, label: str) -> int:
        return len(self.latencies.get(label, ()))

    def rate(self, label: str) -> float:
        return self.count(label) / self.elapsed

    def summary(self, label: str) -> dict[str, float]:
        values = sorted(self.latencies.get(label, ()))
        return {
            "count": len(values),
            "per_s": len(values) / self.elapsed,
            "p50_ms": percentile(values, 0.50) * 1000,
            "p99_ms": percentile(values, 0.99) * 1000,
            "max_ms": (values[-1] if values else float("nan")) * 1000,
        }

    def all_summaries(self) -> dict[str, dict[str, float]]:
        return {label: self.summary(label) for label in sorted(self.latencies)}


Step = Callable[[Connection, int, Recorder], Awaitable[None]]


async def closed_loop(
    ports: Sequence[int],
    connections: int,
    step: Step,
    *,
    duration_s: float | None = None,
    max_steps: int | None = None,
    headers: dict[str, str] | None = None,
    until: Callable[[Recorder], bool] | None = None,
) -> Recorder:
    """Run ``step`` on ``connections`` keep-alive connections (spread over ``ports``) until the
    duration passes, ``max_steps`` steps ran, or ``until(recorder)`` holds."""
    rec = Recorder()
    counter = itertools.count()
    deadline = None if duration_s is None else time.perf_counter() + duration_s

    def more() -> bool:
        if rec.stop or (deadline is not None and time.perf_counter() >= deadline):
            return False
        return not (until is not None and until(rec))

    async def worker(i: int) -> None:
        conn = Connection("127.0.0.1", ports[i % len(ports)], headers)
        try:
            while more():
                n = next(counter)
                if max_steps is not None and n >= max_steps:
                    return
                try:
                    await step(conn, n, rec)
                except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
                    rec.error("connection", repr(exc))
                    conn.close()
                    await asyncio.sleep(0.01)
        finally:
            conn.close()

    rec.started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(connections)))
    rec.ended = time.perf_counter()
    return rec


async def timed(conn: Connection, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, float]:
    t0 = time.perf_counter()
    status, raw = await conn.request(method, path, body)
    return status, raw, time.perf_counter() - t0


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)
