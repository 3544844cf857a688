"""Per-principal rate limit on VM creation: a token bucket per API token, in each replica's memory.

A bucket holds up to ``burst`` tokens and refills at ``rate`` per second; a create takes one or is
refused with 429 ``rate_limited`` and ``Retry-After`` (whole seconds until a token is back).
Per replica: with N replicas behind a load balancer a principal may create up to N times the rate.
Keeping buckets in the database would add a write to every create for what is a guard against
runaway clients, not an accounting (quotas are the exact, shared limit).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from service.errors import ProblemError

# Buckets kept; the least recently used goes first (a full bucket and a forgotten one are the same).
MAX_BUCKETS = 10_000


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float  # capacity
    tokens: float
    at: float  # when ``tokens`` was last brought up to date

    def take(self, now: float) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def wait_needed(self, key: str) -> float:
        """Take a token for ``key``: 0.0 when allowed, else the seconds to wait."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = TokenBucket(self.rate, float(self.burst), float(self.burst), now)
                self._buckets[key] = bucket
                if len(self._buckets) > MAX_BUCKETS:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
            return bucket.take(now)

    def check(self, key: str, what: str) -> None:
        """Raise 429 ``rate_limited`` (with ``Retry-After``) when ``key`` is over its rate."""
        wait = self.wait_needed(key)
        if wait > 0:
            retry_after = max(1, math.ceil(wait))
            raise ProblemError(
                429,
                "rate_limited",
                f"too many {what}: at most {self.rate:g}/s with bursts of {self.burst}; retry in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
                retry_after_s=retry_after,
            )
