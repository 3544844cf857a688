"""The pending queue's reads on a real database: projects with pending VMs, and a project's walk in
queue order (priority, then age), leaving out what the memo excludes and resuming where it stopped."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from service.db import Database
from service.models import Vm
from service.scheduler import queue
from service.scheduler.queue import ProjectWalk, next_page, pending_projects
from tests.conftest import Api


def _db(api: Api) -> Database:
    db: Database = api.client.app.state.ctx.db  # type: ignore[attr-defined]
    return db


def _walk_all(db: Database, walk: ProjectWalk, exclusions: list[tuple[str, int, int]]) -> list[str]:
    ids: list[str] = []
    while True:
        db.run_sync(lambda s: next_page(s, walk, exclusions), write=False)
        if not walk.page:
            assert walk.exhausted
            return ids
        ids += [str(c.id) for c in walk.page]
        walk.page = []


def test_projects_with_pending_vms(api: Api) -> None:
    api.ready_host("h", keyids=1)
    api.create_vm(name="placed", project="zeta")  # takes the only KeyID: not pending
    for project in ("beta", "alpha", "beta", "gamma"):
        assert api.create_vm(name="w", project=project).json()["status"] == "pending"
    assert _db(api).run_sync(pending_projects, write=False) == ["alpha", "beta", "gamma"]


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(queue, "PAGE", 3)
    queue._page_statements.clear()  # they carry the page size
    yield
    queue._page_statements.clear()


def _queue_order(vms: list[dict[str, Any]]) -> list[str]:
    return [v["id"] for v in sorted(vms, key=lambda v: (-v["priority"], v["created_at"], v["id"]))]


@pytest.mark.usefixtures("small_pages")
def test_a_walk_goes_by_priority_then_age_and_resumes(api: Api) -> None:
    made = []
    for i, priority in enumerate([0, 5, 0, 9, 5, -1, 0]):
        vm = api.create_vm(name=f"v{i}", project="p", priority=priority, vcpus=1 + i % 2).json()
        assert vm["status"] == "pending"
        made.append(vm)
    db = _db(api)
    walk = ProjectWalk("p")
    assert _walk_all(db, walk, []) == _queue_order(made)
    # Nothing new: the next pass reads nothing; a VM created since, after the position, is found.
    walk.exhausted = False
    assert _walk_all(db, walk, []) == []
    late = api.create_vm(name="late", project="p", priority=-5).json()
    walk.exhausted = False
    assert _walk_all(db, walk, []) == [late["id"]]
    # The memo's exclusions leave out every VM of the class at least as large as the entry.
    with db.session(write=False) as s:
        vm_row = s.get(Vm, uuid.UUID(made[0]["id"]))
        assert vm_row is not None and vm_row.placement_class is not None
        cls = vm_row.placement_class
    small = [v for v in [*made, late] if v["vcpus"] < 2]
    assert _walk_all(db, ProjectWalk("p"), [(cls, 2, 1)]) == _queue_order(small)
