"""Every database test runs on SQLite and, when TDX_TEST_POSTGRES_URL is set, on PostgreSQL too.

Each test gets an empty, migrated database: on SQLite a copy of a migrated template file; on
PostgreSQL a schema of this test session's own (so runs never collide), truncated between tests.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from service.app import create_app
from service.config import Settings
from service.db import make_engine
from service.migrate import migrate
from service.models import Base

ADMIN_TOKEN = "tdx_test-admin-token-of-32-characters-or-more"
POSTGRES_URL = os.environ.get("TDX_TEST_POSTGRES_URL")

BACKENDS = ["sqlite"] + (["postgres"] if POSTGRES_URL else [])


def _with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    engine.dispose()
    return path


@pytest.fixture(scope="session")
def postgres_schema() -> Iterator[str]:
    if not POSTGRES_URL:
        pytest.skip("TDX_TEST_POSTGRES_URL is not set")
    schema = f"t_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # CI must fail loudly, never skip, when PostgreSQL is expected
        pytest.fail(f"PostgreSQL at TDX_TEST_POSTGRES_URL is unreachable: {exc}")
    url = _with_search_path(POSTGRES_URL, schema)
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def _truncate_postgres(url: str) -> None:
    engine = create_engine(url)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "tdx.db"
        shutil.copy(template, path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("postgres_schema")
    _truncate_postgres(url)
    return url


@pytest.fixture(params=BACKENDS)
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty, unmigrated database: a new SQLite file, or a new PostgreSQL schema dropped after."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    assert POSTGRES_URL
    schema = f"fresh_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield _with_search_path(POSTGRES_URL, schema)
    with admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "admin_token": ADMIN_TOKEN,
        "heartbeat_timeout_s": 40,
        "queue_tick_s": 0.2,
        "token_cache_ttl_s": 0,
        "log_requests": False,
        "sqlite_synchronous": "NORMAL",
        # The CI machine is shared and often overloaded: tests not about outages must not see one
        # (tests/test_outages.py sets small timeouts of its own).
        "db_pool_timeout_s": 60,
        "db_statement_timeout_s": 60,
        "sqlite_busy_timeout_s": 30,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Override in a test module to change the service's settings."""
    return {}


@pytest.fixture
def app_client(database_url: str, settings_overrides: dict[str, Any]) -> Iterator[TestClient]:
    app = create_app(make_settings(database_url, **settings_overrides))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client
    app.state.ctx.db.dispose()


class Api:
    """A thin test helper over the real app: one client, tokens by role."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def token(self, role: str, **binding: str) -> dict[str, str]:
        r = self.client.post("/v1/tokens", json={"role": role, **binding}, headers=self.admin)
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['token']}"}

    def create_host(self, name: str, vcpus: int = 32, memory_mib: int = 65536, **extra: Any) -> dict[str, Any]:
        r = self.client.post(
            "/v1/hosts", json={"name": name, "vcpus": vcpus, "memory_mib": memory_mib, **extra}, headers=self.admin
        )
        assert r.status_code == 201, r.text
        return dict(r.json())

    def report_load(self, host: str, state: str = "ready", keyids: int = 15, **facts: Any) -> dict[str, Any]:
        body = load_body(state, keyids, **facts)
        r = self.client.post(f"/v1/hosts/{host}/loads", json=body, headers=self.admin)
        assert r.status_code == 201, r.text
        return body

    def ready_host(self, name: str, state: str = "ready", keyids: int = 15, **extra: Any) -> dict[str, Any]:
        """A registered host with a load report of the given TDX state (alive: a load is a heartbeat)."""
        self.create_host(name, **extra)
        return self.report_load(name, state, keyids)

    def create_vm(self, headers: dict[str, str] | None = None, **body: Any) -> Any:
        payload = {"name": "vm", "vcpus": 2, "memory_mib": 2048, "tdx": True, **body}
        return self.client.post("/v1/vms", json=payload, headers=headers or self.admin)


def load_body(state: str = "ready", keyids: int = 15, **facts: Any) -> dict[str, Any]:
    """A load report whose facts derive the given TDX state."""
    base: dict[str, Any] = {
        "load_id": str(uuid.uuid4()),
        "boot_id": str(uuid.uuid4()),
        "kernel": "6.16.0-tdx",
        "kvm_intel_loaded": True,
        "tdx_platform": True,
        "tdx_requested": True,
        "tdx_effective": True,
        "keyids_total": keyids,
        "module_version": "1.5.06",
        "errors": [],
    }
    if state == "unsupported":
        base.update(tdx_platform=False, tdx_requested=False, tdx_effective=False, keyids_total=0)
    elif state == "disabled":
        base.update(tdx_requested=False, tdx_effective=False)
    elif state == "failed":
        base.update(tdx_effective=False, errors=["kvm_intel: APICv is required for TDX"])
    elif state == "no_kvm":
        base.update(kvm_intel_loaded=False, tdx_effective=False, keyids_total=0)
    base.update(facts)
    return base


@pytest.fixture
def api(app_client: TestClient) -> Api:
    return Api(app_client)
