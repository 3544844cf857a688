"""What one running service holds: settings, database, signals, caches, metrics."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from service.auth import TokenCache
from service.config import Settings
from service.db import Database
from service.fanout import Broadcaster, StreamLimit
from service.metrics import Metrics
from service.ratelimit import RateLimiter
from service.scheduler.engine import InFlight
from service.signals import Signal

if TYPE_CHECKING:
    from service.events import Published
    from service.vms.service import PlacementSettings


@dataclass
class AppContext:
    settings: Settings
    db: Database
    token_cache: TokenCache
    metrics: Metrics
    placement: PlacementSettings
    create_limiter: RateLimiter
    # Fired after any event commits (here or, on PostgreSQL, in another replica).
    events_signal: Signal
    # The one reader of new events for every SSE stream and long-poll of this process.
    fanout: Broadcaster[Published]
    # Open streams and waiting long-polls per token (in this process).
    stream_limit: StreamLimit
    admin_token_hash: str | None = None
    # Fired when capacity may have grown, so pending VMs are retried at once.
    capacity_signal: Signal = field(default_factory=Signal)
    rng: random.Random = field(default_factory=random.Random)
    # Hosts with a claim of this process in flight: placements rank them last (scheduler/engine.py).
    in_flight: InFlight = field(default_factory=InFlight)


def get_context(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx
