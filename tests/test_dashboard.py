"""The read-only dashboard: a static page and its assets, served without a token and holding no data,
that reads the API with the operator's token through GET calls only.

Rendering in a real browser is checked by hand (headless chromium screenshot, see the report);
here: what is served, what the page may do, and that the API answers what the page reads.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from service.dashboard import CONTENT_TYPES
from tests.conftest import Api

STATIC = Path(__file__).resolve().parent.parent / "service" / "static"
STATES = {"ready", "disabled", "failed", "unsupported", "unknown"}


def page(api: Api) -> str:
    r = api.client.get("/dashboard")
    assert r.status_code == 200, r.text
    return r.text


def referenced_assets(html: str) -> list[str]:
    return [u for u in re.findall(r'(?:src|href)="([^"]+)"', html) if not u.startswith("data:")]


def served(api: Api, path: str) -> tuple[str, str]:
    r = api.client.get(path)
    assert r.status_code == 200, (path, r.text)
    return r.headers["content-type"], r.text


def test_the_page_is_served_without_a_token_and_holds_no_data(api: Api) -> None:
    api.ready_host("secret-host-1", labels={"zone": "hidden-zone"})
    r = api.client.get("/dashboard")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "secret-host-1" not in r.text and "hidden-zone" not in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "default-src 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert api.client.head("/dashboard").status_code == 200


def test_the_assets_the_page_references_are_served_with_their_content_types(api: Api) -> None:
    assets = referenced_assets(page(api))
    assert {Path(a).suffix for a in assets} == {".css", ".js"}
    for asset in assets:
        assert asset.startswith("/dashboard/static/")
        content_type, body = served(api, asset)
        expected = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}[Path(asset).suffix]
        assert content_type == expected
        assert body == (STATIC / Path(asset).name).read_text()
    served_names = {Path(a).name for a in assets} | {"index.html"}
    assert served_names == {p.name for p in STATIC.iterdir() if p.suffix in CONTENT_TYPES}


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/static/missing.js",
        "/dashboard/static/..%2Fdashboard.py",
        "/dashboard/static/%2E%2E%2F__init__.py",
        "/dashboard/static/..%2F..%2Fpyproject.toml",
        "/dashboard/static/",
    ],
)
def test_only_the_dashboards_own_files_are_served(api: Api, path: str) -> None:
    assert api.client.get(path).status_code == 404


def test_no_asset_points_to_another_origin() -> None:
    for file in STATIC.iterdir():
        text = file.read_text()
        assert not re.search(r"(?:https?:)?//[A-Za-z0-9\[]", text), file.name
        assert "@import" not in text, file.name
    html = (STATIC / "index.html").read_text()
    assert all(url.startswith("/dashboard/static/") for url in referenced_assets(html))


def test_the_page_only_reads_and_never_inserts_markup() -> None:
    js = (STATIC / "dashboard.js").read_text()
    html = (STATIC / "index.html").read_text()
    # One fetch helper, and it sends GET.
    assert js.count("fetch(") == 1
    assert re.search(r'fetch\(url, \{\s*method: "GET",', js)
    for verb in ("POST", "PUT", "PATCH", "DELETE"):
        assert not re.search(rf"\b{verb}\b", js, re.IGNORECASE), verb
    for forbidden in (
        "XMLHttpRequest", "new EventSource", "WebSocket", "sendBeacon", "innerHTML", "outerHTML",
        "insertAdjacentHTML", "document.write", "eval(", "new Function",
    ):
        assert forbidden not in js, forbidden
    # No inline script or handler (the CSP would block them anyway), no form that submits anywhere.
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/dashboard/static/dashboard.js" defer>']
    assert not re.search(r"\son[a-z]+=", html)
    assert not re.search(r"<form[^>]*(action|method)=", html)


def test_every_element_the_script_uses_is_on_the_page() -> None:
    js = (STATIC / "dashboard.js").read_text()
    html = (STATIC / "index.html").read_text()
    used = set(re.findall(r'\$\("([a-z-]+)"\)', js))
    present = set(re.findall(r'\sid="([a-z-]+)"', html))
    assert used and used <= present, used - present


def test_the_script_reads_what_the_page_shows() -> None:
    js = (STATIC / "dashboard.js").read_text()
    for needle in ('"/v1/capacity"', '"/v1/hosts"', '"/v1/vms", { status: "pending" }', '"/v1/events"', "wait:"):
        assert needle in js, needle
    assert "next" in js and "head_id" in js and "last_id" in js  # pages followed, feed resumed
    assert 'params.has("token")' in js and "history.replaceState" in js and "sessionStorage" in js


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_script_parses() -> None:
    result = subprocess.run(["node", "--check", str(STATIC / "dashboard.js")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_reader_token_reads_everything_the_dashboard_asks_for(api: Api) -> None:
    api.ready_host("h-ready", labels={"zone": "a"})
    api.ready_host("h-failed", state="failed")
    api.create_host("h-new")
    assert api.create_vm(name="waits", vcpus=1000).status_code == 201
    reader = api.token("reader")

    def get(path: str, **params: object) -> dict[str, object]:
        r = api.client.get(path, params=params, headers=reader)
        assert r.status_code == 200, (path, r.text)
        body: dict[str, object] = r.json()
        return body

    cap = get("/v1/capacity")
    by_state = cap["by_tdx_state"]
    assert isinstance(by_state, dict) and set(by_state) == STATES
    assert isinstance(cap["totals"], dict)
    for entry in [*by_state.values(), cap["totals"]]:
        assert {
            "hosts", "hosts_alive", "vcpus_free", "memory_mib_free", "keyids_total", "keyids_used", "keyids_free",
            "keyids_stranded",
        } <= set(entry)

    hosts = get("/v1/hosts", limit=500)
    assert hosts["next"] is None
    items = hosts["items"]
    assert isinstance(items, list) and {h["name"] for h in items} == {"h-ready", "h-failed", "h-new"}
    for h in items:
        assert {
            "id", "name", "labels", "vcpus", "memory_mib", "reserved_vcpus", "reserved_memory_mib",
            "cpu_allocation_ratio", "schedulable", "draining", "alive", "last_heartbeat_at", "usage",
        } <= set(h)
        assert {"state", "reason", "keyids_total", "keyids_used", "keyids_observed_in_use", "module_version"} <= set(
            h["tdx"]
        )

    pending = get("/v1/vms", status="pending", limit=500)
    (vm,) = pending["items"]
    assert vm["name"] == "waits" and vm["explanation"] and vm["reasons"]
    assert {"id", "project", "vcpus", "memory_mib", "tdx", "created_at", "deadline"} <= set(vm)

    head = get("/v1/events", after=0, limit=1)
    assert isinstance(head["head_id"], int) and head["head_id"] > 0
    feed = get("/v1/events", after=max(0, head["head_id"] - 30), limit=100, wait=0)
    items = feed["items"]
    assert isinstance(items, list) and items
    assert feed["last_id"] == items[-1]["id"] == head["head_id"]
    assert {"id", "at", "kind", "subject", "data"} <= set(items[0])
