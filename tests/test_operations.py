"""Operations (API.md, Operations): health, readiness, metrics, OpenAPI, request ids, first start."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import service.main
from service.app import create_app
from service.config import Settings
from service.signals import Signal
from tests.conftest import POSTGRES_URL, Api, make_settings
from tests.helpers import assert_problem


def test_healthz(api: Api) -> None:
    r = api.client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_readyz_when_the_database_answers(api: Api) -> None:
    r = api.client.get("/readyz")
    assert r.status_code == 200
    assert r.json()["status"] == "ready"


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens there once the socket is closed


def _unreachable_urls(tmp: Path) -> list[str]:
    urls = [f"sqlite:///{tmp / 'missing-dir' / 'nested' / 'tdx.db'}"]
    if POSTGRES_URL:
        urls.append(f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/test?connect_timeout=2")
    return urls


@pytest.fixture(params=["sqlite", "postgres"])
def unreachable_client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestClient]:
    if request.param == "postgres" and not POSTGRES_URL:
        pytest.skip("TDX_TEST_POSTGRES_URL is not set")
    url = _unreachable_urls(tmp_path)[0 if request.param == "sqlite" else 1]
    app = create_app(make_settings(url, run_background_tasks=False))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client
    app.state.ctx.db.dispose()


def test_readyz_is_503_when_the_database_is_unreachable(unreachable_client: TestClient) -> None:
    r = unreachable_client.get("/readyz")
    assert_problem(r, 503, "database_unavailable")
    # The process itself is up.
    assert unreachable_client.get("/healthz").status_code == 200


def test_metrics_are_prometheus_text_with_tdx_metrics(api: Api) -> None:
    api.ready_host("node-1", keyids=15)
    api.ready_host("node-2", "disabled")
    assert api.create_vm(name="td-1").json()["status"] == "scheduled"
    assert api.create_vm(name="big", vcpus=4096).json()["status"] == "pending"
    r = api.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("tdx_hosts", "tdx_vms_pending", "tdx_keyids_total", "tdx_keyids_used", "tdx_http_requests_total",
                 "tdx_placements_total", "tdx_placement_seconds_bucket"):
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    assert re.search(r'^tdx_hosts\{tdx_state="ready"\} 1\.0$', text, re.M)
    assert re.search(r'^tdx_hosts\{tdx_state="disabled"\} 1\.0$', text, re.M)
    assert re.search(r"^tdx_keyids_total 30\.0$", text, re.M)  # disabled hosts also report KeyIDs
    assert re.search(r"^tdx_keyids_used 1\.0$", text, re.M)
    assert re.search(r"^tdx_vms_pending 1\.0$", text, re.M)
    assert re.search(r'^tdx_placements_total\{result="scheduled"\} 1\.0$', text, re.M)
    for line in text.splitlines():
        assert line.startswith("#") or re.match(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})? \S+$", line), line


def test_openapi_and_docs(api: Api) -> None:
    r = api.client.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    assert spec["openapi"].startswith("3.")
    paths = spec["paths"]
    for path, methods in {
        "/v1/hosts": {"get", "post"},
        "/v1/hosts/{name}": {"get", "patch", "delete"},
        "/v1/hosts/{name}/drain": {"post"},
        "/v1/hosts/{name}/loads": {"get", "post"},
        "/v1/hosts/{name}/heartbeat": {"post"},
        "/v1/tokens": {"get", "post"},
        "/v1/tokens/{token_id}": {"delete"},
        "/v1/events": {"get"},
        "/v1/events/stream": {"get"},
        "/healthz": {"get"},
        "/readyz": {"get"},
    }.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, set(paths[path]))
    assert api.client.get("/docs").status_code == 200


def test_request_id_is_echoed(api: Api) -> None:
    for path, headers in (("/healthz", {}), ("/v1/hosts", api.admin), ("/v1/hosts/ghost", api.admin),
                          ("/v1/hosts", {})):
        r = api.client.get(path, headers={**headers, "X-Request-ID": "req-42.abc:1"})
        assert r.headers["x-request-id"] == "req-42.abc:1", path


def test_request_id_is_generated_when_absent_or_unusable(api: Api) -> None:
    seen = set()
    for value in (None, "", "has spaces", "x" * 200, "quote\"s"):
        headers = {} if value is None else {"X-Request-ID": value}
        r = api.client.get("/healthz", headers=headers)
        rid = r.headers.get("x-request-id")
        assert rid and rid != value and re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", rid)
        seen.add(rid)
    assert len(seen) == 5


def test_request_id_on_a_refused_body(api: Api) -> None:
    r = api.client.post("/v1/hosts", content=b"x" * (1024 * 1024 + 1),
                        headers={**api.admin, "X-Request-ID": "big-one"})
    assert r.status_code == 413
    assert r.headers["x-request-id"] == "big-one"


# ---- first start: the bootstrap admin token --------------------------------------------------


def test_serve_prints_the_admin_token_only_at_first_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'fresh.db'}", admin_token=None)
    service.main._prepare(settings)
    first = capsys.readouterr().out
    tokens = re.findall(r"\btdx_[A-Za-z0-9_-]{20,}", first)
    assert len(tokens) == 1, first
    service.main._prepare(settings)
    second = capsys.readouterr().out
    assert tokens[0] not in second
    assert "tdx_" not in second

    # The printed token is an admin token of that database.
    app = create_app(make_settings(settings.database_url, admin_token=None))
    with TestClient(app) as client:
        r = client.get("/v1/tokens", headers={"Authorization": f"Bearer {tokens[0]}"})
        assert r.status_code == 200, r.text
        assert [t["role"] for t in r.json()["items"]] == ["admin"]
        assert client.get("/v1/tokens", headers={"Authorization": "Bearer tdx_guess"}).status_code == 401
    app.state.ctx.db.dispose()


def test_serve_with_an_admin_token_prints_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'fresh.db'}", admin_token="tdx_from-the-environment-of-32-chars"
    )
    service.main._prepare(settings)
    assert "tdx_" not in capsys.readouterr().out


# ---- shutdown --------------------------------------------------------------------------------


def test_a_wake_up_racing_a_cancel_does_not_swallow_the_cancel() -> None:
    """The lifespan stops the pending-queue task by cancelling it and awaiting it. If the task's
    signal fires in the same loop iteration as the cancel, the cancel must still end the task, or
    shutdown hangs for ever (on PostgreSQL, other replicas' NOTIFYs fire the signal at any time)."""

    async def scenario() -> bool:
        signal = Signal()
        signal.bind(asyncio.get_running_loop())

        async def waiter() -> None:
            while True:
                await signal.wait(signal.version, 30)

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0.05)  # the task is now waiting on the signal
        signal.fire()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return bool(done) and task.cancelled()

    assert asyncio.run(scenario()), "the cancelled task kept running: shutdown would hang"


@pytest.mark.parametrize("token", ["x", "tdx_" + "a" * 27, " " + "a" * 40])
def test_a_weak_admin_token_refuses_to_start(tmp_path: Path, token: str) -> None:
    """A one-character TDX_ADMIN_TOKEN was accepted: an admin password anyone could guess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TDX_")}
    env.update(TDX_DATABASE_URL=f"sqlite:///{tmp_path / 'weak.db'}", TDX_ADMIN_TOKEN=token)
    r = subprocess.run([sys.executable, "-m", "service.main", "migrate"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert "refusing to start: TDX_ADMIN_TOKEN" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "weak.db").exists()
    with pytest.raises(ValueError, match="admin token"):
        Settings(database_url="sqlite://", admin_token=token)


def test_an_admin_token_of_32_characters_starts(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TDX_")}
    env.update(TDX_DATABASE_URL=f"sqlite:///{tmp_path / 'ok.db'}", TDX_ADMIN_TOKEN="a" * 32)
    r = subprocess.run([sys.executable, "-m", "service.main", "migrate"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
