"""In-process micro-benchmark of the placement path, for iterating on its cost (not a result).

``python -m bench.micro [--hosts 1000] [--n 2000] [--profile]``: a fresh SQLite database (WAL,
``synchronous=FULL`` as in production), the fleet seeded as the benchmark seeds it, the real app
(every middleware, request logging to a null handler) driven through ASGI without a socket by 16
concurrent tasks; prints the process CPU time per ``POST /v1/vms`` next to the same driver's cost
against the HTTP ceiling app. With ``--profile``, the cProfile of the creates (cumulative).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import os
import pstats
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

ADMIN = "tdx_micro_admin_token"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _call(app: App, method: str, path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"localhost"), (b"content-length", str(len(body)).encode()), *headers],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }
    sent = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


def _vm_body(i: int) -> bytes:
    return json.dumps(
        {"name": f"vm-{i}", "vcpus": 2, "memory_mib": 2048, "tdx": i % 2 == 0}, separators=(",", ":")
    ).encode()


async def _drive(app: App, n: int, conc: int, path: str = "/v1/vms") -> tuple[float, float, dict[int, int]]:
    headers = [(b"authorization", f"Bearer {ADMIN}".encode()), (b"content-type", b"application/json")]
    counter = iter(range(n))
    codes: dict[int, int] = {}

    async def worker() -> None:
        for i in counter:
            status, _ = await _call(app, "POST", path, _vm_body(i), headers)
            codes[status] = codes.get(status, 0) + 1

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(conc)])
    return time.process_time() - cpu, time.perf_counter() - wall, codes


async def _lifespan(app: Any) -> None:
    await app.router.startup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--conc", type=int, default=16)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--sort", default="cumulative", help="cProfile sort key (cumulative, tottime)")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="tdx-micro-")
    url = f"sqlite:///{tmp}/tdx.db"
    os.environ.update(
        TDX_DATABASE_URL=url, TDX_ADMIN_TOKEN=ADMIN, TDX_HEARTBEAT_TIMEOUT_S="86400",
        TDX_MAX_TD_BUILDS_PER_HOST="10000", TDX_RUN_BACKGROUND_TASKS="false",
    )
    logging.basicConfig(level=logging.INFO, handlers=[logging.NullHandler()])

    from bench.ceiling_app import create_app as ceiling_app
    from bench.seed import seed_hosts
    from service.app import create_app
    from service.config import Settings
    from service.db import make_engine
    from service.migrate import migrate

    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    seed_hosts(url, 0, args.hosts, 63)
    app = create_app(Settings())
    ceiling = ceiling_app()

    async def run() -> None:
        await _drive(ceiling, 200, args.conc)
        c_cpu, _, _ = await _drive(ceiling, args.n, args.conc)
        await _drive(app, 200, args.conc)  # warm-up: statement caches, imports
        prof = cProfile.Profile() if args.profile else None
        if prof:
            prof.enable()
        cpu, wall, codes = await _drive(app, args.n, args.conc)
        if prof:
            prof.disable()
            pstats.Stats(prof).sort_stats(args.sort).print_stats(args.top)
        print(f"ceiling: {c_cpu / args.n * 1000:.3f} ms CPU/req")
        print(f"creates: {cpu / args.n * 1000:.3f} ms CPU/req, {args.n / wall:.0f}/s wall, codes {codes}")
        print(f"ratio (ceiling CPU / create CPU): {c_cpu / cpu:.3f}")

    asyncio.run(run())


if __name__ == "__main__":
    main()
