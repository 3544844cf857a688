"""The read-only dashboard: a static page and its assets, served without a token and holding no data,
that reads the API with the operator's token through GET calls only.

What a user sees and does is checked in a real browser (tests/test_dashboard_browser.py); here:
what is served, what the page may do, and that the API answers what the page reads.
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
    # In-page links (#/vms) are routes of the page itself, not files.
    return [u for u in re.findall(r'(?:src|href)="([^"]+)"', html) if not u.startswith(("data:", "#"))]


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


def imported_modules(js: str) -> list[str]:
    return re.findall(r'^import [^;]*?from "\./([a-z-]+\.js)";', js, re.MULTILINE | re.DOTALL)


def reachable_assets(api: Api) -> set[str]:
    """Every file the page loads: what index.html references and, from there, every module import."""
    assets = referenced_assets(page(api))
    names = {Path(a).name for a in assets}
    todo = [n for n in names if n.endswith(".js")]
    while todo:
        _, body = served(api, f"/dashboard/static/{todo.pop()}")
        for module in imported_modules(body):
            if module not in names:
                names.add(module)
                todo.append(module)
    return names


def test_the_assets_the_page_references_are_served_with_their_content_types(api: Api) -> None:
    assets = referenced_assets(page(api))
    assert {Path(a).suffix for a in assets} == {".css", ".js"}
    assert all(asset.startswith("/dashboard/static/") for asset in assets)
    expected = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
    names = reachable_assets(api)
    for name in names:
        content_type, body = served(api, f"/dashboard/static/{name}")
        assert content_type == expected[Path(name).suffix]
        assert body == (STATIC / name).read_text()
    # Nothing shipped that the page does not use, nothing used that is not shipped.
    assert names | {"index.html"} == {p.name for p in STATIC.iterdir() if p.suffix in CONTENT_TYPES}


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


def scripts() -> dict[str, str]:
    return {p.name: p.read_text() for p in STATIC.glob("*.js")}


def test_the_page_reads_and_only_patches_hosts_and_never_inserts_markup() -> None:
    js = scripts()
    html = (STATIC / "index.html").read_text()
    # One fetch, in api.js; it sends GET, and PATCH for the admin's host actions.
    assert [name for name, text in js.items() if "fetch(" in text] == ["api.js"]
    assert js["api.js"].count("fetch(") == 1
    methods = set(re.findall(r'\bcall\("([A-Z]+)"', js["api.js"]))
    assert methods == {"GET", "PATCH"}
    for name, text in js.items():
        for verb in ("POST", "PUT", "DELETE"):
            assert not re.search(rf"\b{verb}\b", text), (name, verb)
        for forbidden in (
            "XMLHttpRequest", "new EventSource", "WebSocket", "sendBeacon", "innerHTML", "outerHTML",
            "insertAdjacentHTML", "document.write", "eval(", "new Function", "setAttribute(\"on",
        ):
            assert forbidden not in text, (name, forbidden)
    assert "patch(hostPath(name)" in js["host-page.js"] and "If-Match" in js["api.js"]
    # No inline script or handler (the CSP would block them anyway), no form that submits anywhere.
    assert re.findall(r"<script[^>]*>", html) == ['<script type="module" src="/dashboard/static/dashboard.js">']
    assert not re.search(r"\son[a-z]+=", html)
    assert not re.search(r"<form[^>]*(action|method)=", html)


def test_every_element_the_scripts_use_is_on_the_page() -> None:
    html = (STATIC / "index.html").read_text()
    present = set(re.findall(r'\sid="([a-z-]+)"', html))
    refs = set(re.findall(r'\sdata-ref="([A-Za-z]+)"', html))
    templates = set(re.findall(r'<template id="tpl-([a-z]+)"', html))
    used_ids: set[str] = set()
    used_templates: set[str] = set()
    for text in scripts().values():
        used_ids |= set(re.findall(r'\$\("([a-z-]+)"\)', text))
        used_templates |= set(re.findall(r'fromTemplate\("([a-z]+)"\)', text))
    assert used_ids and used_ids <= present, used_ids - present
    assert used_templates == templates
    for name in ("overview.js", "host-page.js", "vm-list.js", "events.js"):
        used_refs = set(re.findall(r"\bview\.([A-Za-z]+)\b", scripts()[name])) - {"root"}
        assert used_refs <= refs, (name, used_refs - refs)


def test_the_scripts_read_what_the_pages_show() -> None:
    js = "\n".join(scripts().values())
    for needle in ('"/v1/capacity"', '"/v1/hosts"', '"/v1/vms", { status: "pending" }', '"/v1/events"', "wait:",
                   '"/v1/whoami"', "/loads`", "getTagged(hostPath(name)"):
        assert needle in js, needle
    assert "next" in js and "head_id" in js and "last_id" in js  # pages followed, feed resumed
    assert 'params.has("token")' in js and "history.replaceState" in js and "sessionStorage" in js


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("name", sorted(p.name for p in STATIC.glob("*.js")))
def test_each_module_parses(name: str) -> None:
    result = subprocess.run(
        ["node", "--input-type=module", "--check"], input=(STATIC / name).read_text(), capture_output=True, text=True
    )
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

    # The host page, and who the token is.
    assert get("/v1/whoami")["role"] == "reader"
    r = api.client.get("/v1/hosts/h-ready", headers=reader)
    assert r.status_code == 200 and r.headers["etag"] == f'"{r.json()["generation"]}"'
    assert get("/v1/hosts/h-ready/loads", limit=20)["items"]
    on_host = api.client.get(
        "/v1/vms", params=[("host", "h-ready"), *(("status", s) for s in ("pending", "scheduled"))], headers=reader
    )
    assert on_host.status_code == 200, on_host.text
    # A reader's PATCH is refused: the page shows the actions to an admin token only.
    refused = api.client.patch(
        "/v1/hosts/h-ready", json={"schedulable": False}, headers={**reader, "If-Match": r.headers["etag"]}
    )
    assert refused.status_code == 403
