"""The dashboard in a real headless browser (Debian's chromium, driven by Playwright) against the
real app on a live loopback server: what a user sees and does.

`make test` installs chromium (apt) when it is missing; Playwright never downloads a browser here.
TDX_TEST_CHROMIUM points at another Chromium binary.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from service.app import create_app
from service.cli import app as tdxctl
from service.client import TdxClient
from service.host_figures import memory_limit_mib, scheduling, vcpu_limit, whole_vcpus
from tests.conftest import ADMIN_TOKEN, load_body, make_settings
from tests.helpers import live_server

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency: make test installs it")
Browser, Page, expect, sync_playwright = (
    playwright.Browser, playwright.Page, playwright.expect, playwright.sync_playwright,
)

CHROMIUM = os.environ.get("TDX_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
WAIT_MS = 10_000  # for any one thing to appear on the page

# The whole module: server start, browser start and every test, well under a minute here.
pytestmark = pytest.mark.timeout(90)


@dataclass
class Fleet:
    url: str
    reader: str
    vms: dict[str, dict[str, Any]]

    def admin(self) -> TdxClient:
        return TdxClient(self.url, ADMIN_TOKEN)

    def host(self, name: str) -> dict[str, Any]:
        with self.admin() as c:
            return dict(c.get_host(name).host)


def _populate(url: str) -> Fleet:
    with TdxClient(url, ADMIN_TOKEN) as c:
        c.create_host("node-1", 64, 262144, labels={"zone": "a"}, reserved_vcpus=4, reserved_memory_mib=8192)
        c.report_load("node-1", load_body("ready", 63))
        c.create_host("node-2", 32, 131072, labels={"zone": "b"})
        c.report_load("node-2", load_body("disabled", 0))
        c.patch_host("node-2", schedulable=False)
        c.create_host("node-3", 48, 196608, labels={"zone": "a"}, cpu_allocation_ratio=1.5)
        c.report_load("node-3", load_body("failed", 31, errors=[
            "virt/tdx: initialization failed: Hibernation support is enabled"]))
        c.create_host("node-4", 16, 65536, labels={"zone": "c"})  # never heard from: not alive
        for name in ("act-1", "act-2"):
            c.create_host(name, 8, 16384, labels={"zone": "x"})
            c.report_load(name, load_body("ready", 7))
        vms = {
            "web-0": c.create_vm("web-0", 4, 8192, True, project="shop", selector={"zone": "a"},
                                 anti_affinity_group="web"),
            "web-1": c.create_vm("web-1", 4, 8192, True, project="shop", selector={"zone": "a"},
                                 anti_affinity_group="web"),
            "db-0": c.create_vm("db-0", 8, 32768, True, project="shop", selector={"zone": "a"}),
            "batch-0": c.create_vm("batch-0", 2, 4096, False, project="science", selector={"zone": "a"}),
            "huge": c.create_vm("huge", 512, 4096, True, project="science"),
        }
        assert vms["web-1"]["status"] == "pending" and vms["huge"]["status"] == "pending"
        vms["db-0"] = c.delete_vm(vms["db-0"]["id"])
        for i in range(40):  # enough events for several pages of the log
            c.patch_host("node-1", labels={"zone": "a", "round": str(i)})
        reader = c.create_token("reader", description="dashboard test")["token"]
    return Fleet(url, reader, {name: dict(vm) for name, vm in vms.items()})


@pytest.fixture(scope="module")
def fleet(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    db = tmp_path_factory.mktemp("dashboard") / "tdx.db"
    shutil.copy(sqlite_template, db)
    # Liveness must not lapse while the module runs: hosts with a load stay alive, node-4 never was.
    app = create_app(make_settings(f"sqlite:///{db}", heartbeat_timeout_s=3600))
    with live_server(app) as url:
        yield _populate(url)
    app.state.ctx.db.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium (or set TDX_TEST_CHROMIUM)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=30_000)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, fleet: Fleet) -> Iterator[Page]:
    """A fresh browser profile per test; fails the test on a script error or a request elsewhere."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    elsewhere: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # The browser logs every 4xx answer as a console error too; only the script's own errors count.
    page.on("console", lambda msg: errors.append(msg.text)
            if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
    page.on("request", lambda req: None if req.url.startswith(fleet.url) else elsewhere.append(req.url))
    yield page
    context.close()
    assert not elsewhere, f"the page reached beyond its server (it must work offline): {elsewhere}"
    assert errors == []


def open_dashboard(page: Page, fleet: Fleet, token: str, route: str = "") -> None:
    page.goto(f"{fleet.url}/dashboard#token={token}")
    expect(page.locator("#whoami")).not_to_have_text("")
    if route:
        page.evaluate("route => { location.hash = route; }", route)


def tdxctl_columns(token: str, url: str, *args: str) -> dict[str, list[str]]:
    """A tdxctl table, row by row, keyed by its first column."""
    result = CliRunner().invoke(tdxctl, list(args), env={"TDX_SERVER": url, "TDX_TOKEN": token})
    assert result.exit_code == 0, result.output
    return {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:] if line.strip()}


def host_row(page: Page, name: str) -> Any:
    return page.locator("#hosts-table tbody tr").filter(has=page.get_by_role("link", name=name, exact=True))


# ---- a reader ---------------------------------------------------------------------------------


def test_overview_shows_the_fleet_as_tdxctl_does(page: Page, fleet: Fleet) -> None:
    page.goto(f"{fleet.url}/dashboard")
    page.get_by_label("API token").fill(fleet.reader)
    page.get_by_role("button", name="Show").click()
    expect(page.locator("#whoami")).to_have_text("reader")

    expect(page.locator(".state-card[data-state=ready] .stat-value")).to_have_text("3")
    expect(page.locator(".state-card[data-state=failed] .stat-value")).to_have_text("1")
    expect(page.locator(".state-card[data-state=unknown] .stat-value")).to_have_text("1")
    expect(page.locator("#hosts-table tbody tr")).to_have_count(6)

    # vCPU figures: the very strings tdxctl prints, host by host, and the same free total.
    cli_hosts = tdxctl_columns(fleet.reader, fleet.url, "hosts", "list")
    assert cli_hosts["node-1"][3] == "4/240" and cli_hosts["node-3"][3] == "2/72"
    for name, columns in cli_hosts.items():
        expect(host_row(page, name).locator("td.vcpus .usage-text")).to_have_text(columns[3])
    cli_capacity = tdxctl_columns(fleet.reader, fleet.url, "capacity")
    expect(page.locator("[data-stat=vcpus-free] .stat-value")).to_have_text(cli_capacity["total"][3])

    # A host that never heartbeated is not alive, so never "schedulable"; a cordoned one says so.
    expect(host_row(page, "node-4")).to_contain_text("never seen")
    expect(host_row(page, "node-4")).to_contain_text("stale")
    expect(host_row(page, "node-4")).not_to_contain_text("schedulable")
    expect(host_row(page, "node-2")).to_contain_text("cordoned")
    expect(host_row(page, "node-1")).to_contain_text("schedulable")
    for name, columns in cli_hosts.items():
        expect(host_row(page, name)).to_contain_text(columns[6])  # SCHEDULING, word for word

    pending = page.locator("#pending-table tbody tr")
    expect(pending).to_have_count(2)
    # A TD never gets more vCPUs than a host has CPUs, whatever the allocation ratio.
    expect(pending.filter(has_text="huge")).to_contain_text("td_vcpus_exceed_host")
    expect(pending.filter(has_text="web-1")).to_contain_text("anti_affinity")

    page.locator(".state-card[data-state=failed]").click()
    expect(page.locator("#hosts-table tbody tr")).to_have_count(1)
    expect(page.locator("#feed .event").first).to_be_visible()


def test_host_page_shows_the_hosts_story_and_no_actions_to_a_reader(page: Page, fleet: Fleet) -> None:
    open_dashboard(page, fleet, fleet.reader)
    host_row(page, "node-3").get_by_role("link", name="node-3").click()
    expect(page).to_have_url(re.compile(r"#/hosts/node-3$"))
    expect(page.locator("#host-name")).to_have_text("node-3")
    tdx = page.locator("#host-tdx")
    expect(tdx).to_contain_text("Hibernation support is enabled")
    host = fleet.host("node-3")
    if host["tdx"].get("reason_code"):
        expect(tdx).to_contain_text(host["tdx"]["reason_code"])
    if host["tdx"].get("remedy"):
        expect(tdx).to_contain_text(host["tdx"]["remedy"])
    capacity = page.locator("#host-capacity")
    expect(capacity).to_contain_text("Last heartbeat")
    expect(capacity).to_contain_text(host["last_heartbeat_at"][:19].replace("T", " "))
    expect(capacity.locator(".vcpus .usage-text")).to_have_text("2/72")
    expect(page.locator("#loads-table tbody tr")).to_have_count(1)
    expect(page.locator("#loads-table tbody tr")).to_contain_text("current")
    expect(page.locator("#host-vms-table tbody tr")).to_have_count(1)
    expect(page.locator("#host-vms-table")).to_contain_text("batch-0")

    expect(page.get_by_role("button", name="Reload")).to_be_visible()
    expect(page.locator("#host-actions")).to_be_hidden()
    for action in ("Cordon", "Uncordon", "Drain"):
        expect(page.get_by_role("button", name=action, exact=True)).to_be_hidden()

    page.evaluate("location.hash = '#/hosts/no-such-host'")
    expect(page.get_by_text("There is no host no-such-host.")).to_be_visible()


def test_vm_list_shows_every_status_and_filters(page: Page, fleet: Fleet) -> None:
    open_dashboard(page, fleet, fleet.reader)
    page.get_by_role("link", name="VMs", exact=True).click()
    rows = page.locator("#vms-table tbody tr")
    expect(rows).to_have_count(len(fleet.vms))
    expect(rows.filter(has_text="db-0")).to_contain_text("deleted")

    page.get_by_label("Project").fill("science")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"#/vms\?project=science$"))
    expect(rows).to_have_count(2)
    page.get_by_label("Status").select_option("pending")
    expect(page).to_have_url(re.compile(r"#/vms\?project=science&status=pending$"))
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text("huge")

    page.get_by_label("Project").fill("shop")
    page.get_by_label("Status").select_option("not-ended")
    expect(rows).to_have_count(2)  # web-0 and web-1; db-0 ended
    expect(page.locator("#vms-table")).not_to_contain_text("db-0")


def test_projects_page_shows_quota_use_as_tdxctl_does(page: Page, fleet: Fleet) -> None:
    with fleet.admin() as c:
        c.set_quota("shop", vms=5, tdx_vms=2)
    open_dashboard(page, fleet, fleet.reader)
    page.get_by_role("link", name="Projects", exact=True).click()
    rows = page.locator("#projects-table tbody tr")
    cli = tdxctl_columns(fleet.reader, fleet.url, "quota", "list")
    assert cli["shop"][1:] == ["2/5", "8/-", "16384/-", "2/2"]  # web-0 and web-1; db-0 ended
    expect(rows).to_have_count(len(cli))
    for name, columns in cli.items():
        cells = rows.filter(has=page.get_by_role("link", name=name, exact=True)).locator("td")
        for i in (1, 2, 4):  # VMs, vCPUs and TDX VMs as tdxctl prints them (memory is in GiB here)
            expect(cells.nth(i)).to_have_text(columns[i])
    expect(rows.filter(has_text="shop").locator("td").nth(3)).to_have_text("16/-")
    expect(rows.filter(has_text="shop").locator(".bar-high")).to_have_count(1)  # TDX VMs at the limit
    page.get_by_role("link", name="shop", exact=True).click()
    expect(page).to_have_url(re.compile(r"#/vms\?project=shop&status=not-ended$"))
    expect(page.locator("#vms-table tbody tr")).to_have_count(2)


def test_event_log_pages_older_and_newer(page: Page, fleet: Fleet) -> None:
    open_dashboard(page, fleet, fleet.reader, "#/events")
    items = page.locator("#event-page .event")
    expect(items).to_have_count(50)
    with fleet.admin() as c:
        head = c.list_events(after=0, limit=1)["head_id"]
    newest = [int(x) for x in items.evaluate_all("nodes => nodes.map(n => n.dataset.id)")]
    assert newest == list(range(head, head - 50, -1))
    expect(page.get_by_role("button", name="Newer →")).to_be_disabled()

    page.get_by_role("button", name="← Older").click()
    start = max(0, head - 100)
    expect(page).to_have_url(re.compile(rf"#/events\?after={start}&limit={head - 50 - start}$"))
    expect(items.first).to_have_attribute("data-id", str(head - 50))
    older = [int(x) for x in items.evaluate_all("nodes => nodes.map(n => n.dataset.id)")]
    assert older == list(range(head - 50, max(0, head - 100), -1))

    page.get_by_role("button", name="Newer →").click()
    expect(items.first).to_have_attribute("data-id", str(head))
    page.get_by_label("Subject").fill("node-3")
    page.get_by_role("button", name="Filter").click()
    # Wait for the filtered page itself, not the previous page still on screen.
    subject = items.locator(".event-subject")
    expect(subject.first).to_have_text("node-3")
    expect(subject.filter(has_not_text="node-3")).to_have_count(0)
    subjects = subject.all_text_contents()
    assert subjects and set(subjects) == {"node-3"}


def test_the_page_computes_host_figures_as_tdxctl_does(page: Page, fleet: Fleet) -> None:
    """static/figures.js and service/host_figures.py agree on every host, awkward ratios included."""
    rng = random.Random(13)
    ratios = [1.0, 4.0, 1.5, 1.1, 1.15, 0.3, 0.7, 2.675, 1 / 3, 16.0]
    hosts = []
    for _ in range(2000):
        vcpus = rng.randint(1, 1024)
        memory = rng.randint(1, 4 << 20)
        hosts.append({
            "vcpus": vcpus, "reserved_vcpus": rng.randint(0, vcpus), "memory_mib": memory,
            "reserved_memory_mib": rng.randint(0, memory),
            "cpu_allocation_ratio": rng.choice(ratios) if rng.random() < 0.7 else rng.uniform(0.01, 32),
            "schedulable": rng.random() < 0.7, "draining": rng.random() < 0.2, "alive": rng.random() < 0.7,
            "free": rng.uniform(0, 1e6),
            "tdx": {"pamt_mib": rng.randint(0, 4096)} if rng.random() < 0.5 else {},
        })
    expected = [
        [vcpu_limit(h), memory_limit_mib(h), scheduling(h), whole_vcpus(h["free"])] for h in hosts
    ]
    page.goto(f"{fleet.url}/dashboard")
    shown = page.evaluate(
        """async hosts => {
            const f = await import("/dashboard/static/figures.js");
            return hosts.map(h => [f.vcpuLimit(h), f.memoryLimitMib(h), f.scheduling(h), f.wholeVcpus(h.free)]);
        }""",
        hosts,
    )
    assert shown == expected


def test_overview_shows_running_operations_and_what_they_wait_for(page: Page, fleet: Fleet) -> None:
    with fleet.admin() as c:
        op = c.start_opt_in("node-2")
    try:
        open_dashboard(page, fleet, fleet.reader)
        row = page.locator("#operations-table tbody tr").filter(has=page.get_by_role("link", name="node-2"))
        expect(row).to_have_count(1)
        expect(row).to_contain_text("tdx opt in")
        expect(row).to_contain_text("wait for load")
        expect(row).to_contain_text("modprobe -r kvm_intel && modprobe kvm_intel tdx=1")
    finally:
        with fleet.admin() as c:
            c.cancel_operation(op["id"])
    assert fleet.host("node-2")["schedulable"] is False  # it was cordoned before the operation


# ---- an admin -----------------------------------------------------------------------------------


def test_admin_cordons_uncordons_and_drains(page: Page, fleet: Fleet) -> None:
    open_dashboard(page, fleet, ADMIN_TOKEN, "#/hosts/act-1")
    expect(page.locator("#whoami")).to_have_text("admin")
    badges = page.locator(".page-title .badges")
    expect(badges).to_contain_text("schedulable")
    message = page.locator("#host-message")

    page.get_by_role("button", name="Cordon", exact=True).click()
    expect(message).to_contain_text("act-1 cordoned")
    expect(badges).to_contain_text("cordoned")
    assert fleet.host("act-1")["schedulable"] is False

    page.get_by_role("button", name="Uncordon", exact=True).click()
    expect(message).to_contain_text("act-1 uncordoned")
    expect(badges).to_contain_text("schedulable")
    assert fleet.host("act-1")["schedulable"] is True

    page.get_by_role("button", name="Drain", exact=True).click()
    expect(message).to_contain_text("act-1 draining")
    expect(badges).to_contain_text("draining")
    assert fleet.host("act-1")["draining"] is True

    page.get_by_role("button", name="Uncordon", exact=True).click()
    expect(badges).to_contain_text("schedulable")
    host = fleet.host("act-1")
    assert host["draining"] is False and host["schedulable"] is True


def test_a_host_changed_meanwhile_is_not_acted_on(page: Page, fleet: Fleet) -> None:
    open_dashboard(page, fleet, ADMIN_TOKEN, "#/hosts/act-2")
    expect(page.locator(".page-title .badges")).to_contain_text("schedulable")
    before = fleet.host("act-2")
    with fleet.admin() as c:  # someone else changes the host after the page read it
        c.patch_host("act-2", labels={"zone": "x", "owner": "someone-else"})

    page.get_by_role("button", name="Cordon", exact=True).click()
    message = page.locator("#host-message")
    expect(message).to_contain_text("changed meanwhile")
    expect(message).to_contain_text("Reload")
    after = fleet.host("act-2")
    assert after["schedulable"] is True and after["generation"] == before["generation"] + 1

    message.get_by_role("button", name="Reload").click()
    expect(message).to_be_hidden()
    expect(page.locator("#host-capacity")).to_contain_text("owner=someone-else")
    page.get_by_role("button", name="Cordon", exact=True).click()
    expect(message).to_contain_text("act-2 cordoned")
    assert fleet.host("act-2")["schedulable"] is False
