// #/ : the fleet at a glance: TDX state tiles, hosts, the pending queue and a live event feed.
"use strict";

import { get, getAll } from "./api.js";
import { HOST_COLUMNS, OPERATION_COLUMNS, PENDING_COLUMNS } from "./columns.js";
import { dataTable, el, fillTable, fromTemplate, gib, labelsOf, note, showError, stateClass, STATES, tdxBadge, byName } from "./dom.js";
import { eventItem } from "./events.js";
import { wholeVcpus } from "./figures.js";

const MAX_HOST_PAGES = 20; // at most 10,000 hosts
const MAX_PENDING_PAGES = 2; // at most 1,000 pending VMs
const MAX_OPERATION_PAGES = 1;
const EVENTS_BACKLOG = 30; // how many past events to show on connect
const EVENTS_SHOWN = 200;
const LONG_POLL_S = 25; // under the server's 30 s cap
const REFRESH_EVERY_MS = 30000; // liveness turns stale without an event
const REFRESH_AFTER_EVENT_MS = 1000;

function stat(label, value, extraClass) {
  const box = el("div", `stat ${extraClass || ""}`);
  box.append(el("div", "stat-value", value), el("div", "stat-label", label));
  return box;
}

function matches(host, needle) {
  if (!needle) return true;
  const haystack = [host.name, host.tdx.state, host.tdx.reason || "", host.tdx.reason_code || "", ...labelsOf(host.labels)];
  return haystack.some((text) => text.toLowerCase().includes(needle));
}

function pause(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

export function mount(container, _params, app) {
  const view = fromTemplate("overview");
  container.replaceChildren(view.root);
  const hostsTable = dataTable(HOST_COLUMNS);
  hostsTable.table.id = "hosts-table";
  view.hosts.append(hostsTable.wrap);
  const pendingTable = dataTable(PENDING_COLUMNS);
  pendingTable.table.id = "pending-table";
  view.pending.append(pendingTable.wrap);
  const operationsTable = dataTable(OPERATION_COLUMNS);
  operationsTable.table.id = "operations-table";
  view.operations.append(operationsTable.wrap);

  let hosts = [];
  const state = { refreshing: false, again: false, soon: null };

  function renderHosts() {
    const needle = view.hostFilter.value.trim().toLowerCase();
    const shown = hosts.filter((h) => matches(h, needle));
    fillTable(hostsTable.tbody, HOST_COLUMNS, shown, hosts.length ? "no host matches the filter" : "no hosts registered");
    view.hostsCount.textContent = needle ? `(${shown.length} of ${hosts.length})` : `(${hosts.length})`;
  }

  function renderCapacity(cap) {
    const states = el("div", "states");
    for (const s of STATES) {
      const entry = cap.by_tdx_state[s];
      if (!entry) continue;
      const box = el("button", `state-card ${stateClass(s)}`);
      box.type = "button";
      box.dataset.state = s;
      if (entry.hosts === 0) box.classList.add("empty");
      const head = el("div", "state-head");
      head.append(tdxBadge(s));
      box.append(head, el("div", "stat-value", entry.hosts), el("div", "stat-label", `hosts, ${entry.hosts_alive} alive`));
      if (entry.keyids_total > 0) box.append(el("div", "stat-label", `KeyIDs ${entry.keyids_used}/${entry.keyids_total}`));
      box.title = `show only ${s} hosts`;
      box.addEventListener("click", () => {
        view.hostFilter.value = s;
        renderHosts();
      });
      states.append(box);
    }
    // TDX VMs get KeyIDs only on ready hosts; vCPUs and memory count on every host.
    const t = cap.totals;
    const ready = cap.by_tdx_state.ready || t;
    const keyids = stat("KeyIDs used / total", `${ready.keyids_used} / ${ready.keyids_total}`);
    keyids.title = `on ready hosts; all hosts: ${t.keyids_used} / ${t.keyids_total}`;
    const stranded = stat("KeyIDs stranded", ready.keyids_stranded, ready.keyids_stranded > 0 ? "warn" : "");
    stranded.title = "free KeyIDs on hosts without room for another VM";
    const vcpus = stat("vCPUs free", wholeVcpus(t.vcpus_free));
    vcpus.dataset.stat = "vcpus-free";
    const totals = el("div", "totals");
    totals.append(
      keyids,
      stat("KeyIDs free", ready.keyids_free),
      stranded,
      vcpus,
      stat("Memory free GiB", gib(t.memory_mib_free)),
      stat("Hosts alive", `${t.hosts_alive} / ${t.hosts}`),
    );
    view.summary.replaceChildren(states, totals);
  }

  async function refresh() {
    if (state.refreshing) {
      state.again = true;
      return;
    }
    state.refreshing = true;
    const signal = app.signal;
    const [capacity, hostList, pending, operations] = await Promise.allSettled([
      get("/v1/capacity", null, signal),
      getAll("/v1/hosts", null, MAX_HOST_PAGES, signal),
      getAll("/v1/vms", { status: "pending" }, MAX_PENDING_PAGES, signal),
      getAll("/v1/operations", { status: "running" }, MAX_OPERATION_PAGES, signal),
    ]);
    state.refreshing = false;
    if (signal.aborted) return;
    for (const result of [capacity, hostList, pending]) {
      if (result.status === "rejected" && app.refused(result.reason)) return;
    }
    if (capacity.status === "fulfilled") renderCapacity(capacity.value);
    showError(view.capacityError, capacity.status === "rejected" ? capacity.reason : null);
    if (hostList.status === "fulfilled") {
      hosts = hostList.value.items.slice().sort(byName);
      renderHosts();
      note(view.hostsNote, hostList.value.truncated ? `Showing the first ${hosts.length} hosts.` : null);
    }
    showError(view.hostsError, hostList.status === "rejected" ? hostList.reason : null);
    if (pending.status === "fulfilled") {
      const { items, truncated } = pending.value;
      fillTable(pendingTable.tbody, PENDING_COLUMNS, items, "nothing is waiting");
      view.pendingCount.textContent = `(${items.length}${truncated ? "+" : ""})`;
      note(view.pendingNote, truncated ? `Showing the first ${items.length}.` : null);
    }
    showError(view.pendingError, pending.status === "rejected" ? pending.reason : null);
    if (operations.status === "fulfilled") {
      const { items } = operations.value;
      fillTable(operationsTable.tbody, OPERATION_COLUMNS, items, "no operation running");
      view.operationsCount.textContent = `(${items.length})`;
      view.operationsCard.hidden = items.length === 0;
    }
    showError(view.operationsError, operations.status === "rejected" ? operations.reason : null);
    app.stamp();
    if (state.again) {
      state.again = false;
      refresh();
    }
  }

  function refreshSoon() {
    if (state.soon) return;
    state.soon = setTimeout(() => {
      state.soon = null;
      refresh();
    }, REFRESH_AFTER_EVENT_MS);
  }

  function showEvents(items) {
    for (const event of items) view.events.prepend(eventItem(event));
    while (view.events.childElementCount > EVENTS_SHOWN) view.events.lastElementChild.remove();
  }

  // The feed long-polls GET /v1/events (EventSource cannot send Authorization).
  async function feed() {
    const signal = app.signal;
    let after = null;
    let failures = 0;
    while (!signal.aborted) {
      try {
        if (after === null) {
          const head = await get("/v1/events", { after: 0, limit: 1 }, signal);
          after = Math.max(0, head.head_id - EVENTS_BACKLOG);
        }
        app.feedStatus("live", "live");
        const page = await get("/v1/events", { after, limit: 100, wait: LONG_POLL_S }, signal);
        failures = 0;
        showError(view.eventsError, null);
        if (page.items.length) {
          showEvents(page.items);
          refreshSoon();
        }
        after = page.last_id;
      } catch (error) {
        if (signal.aborted || app.refused(error)) return;
        failures += 1;
        const delay = Math.min(30000, 1000 * 2 ** Math.min(failures, 5));
        app.feedStatus("down", `reconnecting in ${Math.round(delay / 1000)}s`);
        showError(view.eventsError, error);
        await pause(delay, signal);
      }
    }
  }

  view.hostFilter.addEventListener("input", renderHosts);
  const timer = setInterval(refresh, REFRESH_EVERY_MS);
  app.signal.addEventListener("abort", () => {
    clearInterval(timer);
    clearTimeout(state.soon);
  });
  refresh();
  feed();
}
