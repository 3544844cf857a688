"""Per-token rate limit on VM creation: the token bucket, and 429 with Retry-After through the API."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.ratelimit import RateLimiter
from tests.conftest import Api
from tests.helpers import assert_problem, snapshot


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_a_burst_then_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.wait_needed("t") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait_needed("t") == pytest.approx(0.5)
    assert limiter.wait_needed("other") == 0.0  # one bucket per principal
    clock.now = 0.5
    assert limiter.wait_needed("t") == 0.0
    assert limiter.wait_needed("t") == pytest.approx(0.5)
    clock.now = 100.0  # refills up to the burst, no further
    assert [limiter.wait_needed("t") for _ in range(4)][-1] > 0


def test_rate_zero_means_no_limit() -> None:
    limiter = RateLimiter(rate=0.0, burst=1)
    assert not limiter.enabled
    assert all(limiter.wait_needed("t") == 0.0 for _ in range(1000))


@given(
    rate=st.floats(0.1, 100), burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=200),
)
def test_grants_never_exceed_burst_plus_rate_times_elapsed(rate: float, burst: int, gaps: list[float]) -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=rate, burst=burst, clock=clock)
    granted = 0
    for gap in gaps:
        clock.now += gap
        if limiter.wait_needed("t") == 0.0:
            granted += 1
        assert granted <= burst + rate * clock.now + 1e-9


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"vm_create_rate_per_s": 0.01, "vm_create_burst": 2}


def test_a_client_over_its_rate_gets_429_with_retry_after_and_nothing_is_written(api: Api) -> None:
    api.ready_host("h")
    client = api.token("client", project="p")
    assert api.create_vm(client, name="a").status_code == 201
    assert api.create_vm(client, name="b").status_code == 201
    before = snapshot(api)
    r = api.create_vm(client, name="c")
    body = assert_problem(r, 429, "rate_limited")
    assert int(r.headers["retry-after"]) >= 1
    assert body["retry_after_s"] == int(r.headers["retry-after"])
    assert snapshot(api) == before
    # Another token has a bucket of its own; admins are not limited by default.
    other = api.token("client", project="p")
    assert api.create_vm(other, name="d").status_code == 201
    for i in range(5):
        assert api.create_vm(name=f"admin-{i}").status_code == 201
    # Only creates are limited.
    assert api.client.get("/v1/vms", headers=client).status_code == 200


@pytest.mark.parametrize("settings_overrides", [{"vm_create_rate_per_s": 0.01, "vm_create_burst": 1,
                                                 "rate_limit_admin": True}])
def test_admins_can_be_limited_too(api: Api) -> None:
    assert api.create_vm(name="a").status_code == 201
    assert_problem(api.create_vm(name="b"), 429, "rate_limited")
