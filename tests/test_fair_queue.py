"""The pending queue shares placements fairly across projects; priority orders VMs within one.

Each test waits on the events the queue writes (long-poll, generous timeout), never on a clock.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tests.conftest import Api
from tests.helpers import all_pages, head_id

# More than the 500 VMs the queue used to look at per pass, at the highest priority there is.
FLOOD = 600
TOP = 1_000_000


def _wait_scheduled(api: Api, vm_id: str, after: int, timeout_s: float = 60) -> dict[str, Any]:
    waited = 0.0
    while waited < timeout_s:
        page = api.client.get(
            "/v1/events", params={"after": after, "kind": "vm.scheduled", "subject": vm_id, "wait": 10},
            headers=api.admin,
        ).json()
        if page["items"]:
            return dict(page["items"][0])
        after = page["last_id"]
        waited += 10
    raise AssertionError(f"VM {vm_id} was not placed within {timeout_s} s")


def _flood(api: Api, project: str, distinct: bool) -> None:
    """Pending VMs that fit on no host there will be: each in its own anti-affinity group when
    ``distinct`` (no two alike, so no memo can skip them), else all of one shape."""
    for i in range(FLOOD):
        extra = {"anti_affinity_group": f"g-{i}"} if distinct else {}
        r = api.create_vm(name=f"huge-{i}", project=project, memory_mib=10**7, priority=TOP, **extra)
        assert r.status_code == 201 and r.json()["status"] == "pending", r.text


@pytest.mark.parametrize("distinct", [False, True], ids=["one-shape", "all-distinct"])
def test_a_flood_of_one_project_does_not_delay_another_projects_vm(api: Api, distinct: bool) -> None:
    _flood(api, "flood", distinct)
    small = api.create_vm(name="small", project="other", priority=-TOP).json()
    assert small["status"] == "pending"  # no host at all yet
    head = head_id(api)
    api.ready_host("h")  # fits the small VM, none of the flood
    event = _wait_scheduled(api, small["id"], head)
    assert event["data"]["host"] == "h"
    assert Counter(v["status"] for v in all_pages(api, "/v1/vms", project="flood", limit=500)) == {"pending": FLOOD}


def test_freed_capacity_is_shared_round_robin_across_projects(api: Api) -> None:
    for project, priority in (("rich", 100), ("poor", 0)):
        for i in range(5):
            vm = api.create_vm(name=f"{project}-{i}", project=project, priority=priority).json()
            assert vm["status"] == "pending"
    # Room for four TDX VMs appears in one step (uncordoning a ready host).
    api.create_host("h")
    api.client.patch("/v1/hosts/h", json={"schedulable": False}, headers=api.admin)
    api.report_load("h", keyids=4)
    head = head_id(api)
    api.client.patch("/v1/hosts/h", json={"schedulable": True}, headers=api.admin)
    events: list[dict[str, Any]] = []
    after = head
    for _ in range(6):
        if len(events) == 4:
            break
        page = api.client.get("/v1/events", params={"after": after, "kind": "vm.scheduled", "wait": 10},
                              headers=api.admin).json()
        events += page["items"]
        after = page["last_id"]
    assert len(events) == 4
    placed = Counter(v["project"] for v in all_pages(api, "/v1/vms", status="scheduled"))
    assert placed == {"rich": 2, "poor": 2}


def test_priority_orders_vms_within_a_project(api: Api) -> None:
    low = api.create_vm(name="low", project="p", priority=1).json()
    high = api.create_vm(name="high", project="p", priority=9).json()
    older_mid = api.create_vm(name="mid-a", project="p", priority=5).json()
    newer_mid = api.create_vm(name="mid-b", project="p", priority=5).json()
    head = head_id(api)
    api.ready_host("h", keyids=3)
    for vm in (high, older_mid, newer_mid):
        _wait_scheduled(api, vm["id"], head)
    assert api.client.get(f"/v1/vms/{low['id']}", headers=api.admin).json()["status"] == "pending"


def test_a_smaller_vm_behind_a_larger_one_of_its_project_is_still_placed(api: Api) -> None:
    """Priority orders attempts, it does not block: what fits is placed (the memo skips only
    shapes at least as large as one that did not fit)."""
    big = api.create_vm(name="big", project="p", priority=10, vcpus=100).json()
    small = api.create_vm(name="small", project="p", priority=0, vcpus=1).json()
    head = head_id(api)
    api.ready_host("h", vcpus=8)
    _wait_scheduled(api, small["id"], head)
    assert api.client.get(f"/v1/vms/{big['id']}", headers=api.admin).json()["status"] == "pending"
