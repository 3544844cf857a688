"""The background loop that advances running operations, on every replica: woken with the pending
queue (VMs ending, loads reported) and on a slow tick; each operation in its own transaction under
its row lock (service.py), so replicas share the work without coordinating."""

from __future__ import annotations

import asyncio
import functools
import logging

from service.db import Database
from service.operations import service
from service.signals import Signal

log = logging.getLogger("tdx.operations")


async def run_pass(db: Database) -> dict[str, int]:
    outcome: dict[str, int] = {}
    for op_id in await db.run(service.running_ids, write=False):
        result = await db.run(functools.partial(service.advance, op_id=op_id))
        outcome[result] = outcome.get(result, 0) + 1
    return outcome


async def run_forever(db: Database, signal: Signal, tick_s: float) -> None:
    while True:
        seen = signal.version
        try:
            await run_pass(db)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("operations pass failed; retrying on the next tick")
        await signal.wait(seen, tick_s)
