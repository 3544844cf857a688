// The read-only dashboard: GETs the JSON API with the operator's token and renders it.
// Every text from the server goes into the DOM through textContent, never as markup.
"use strict";

(() => {
  const TOKEN_KEY = "tdx.dashboard.token";
  const PAGE_SIZE = 500;
  const MAX_HOST_PAGES = 20; // at most 10,000 hosts
  const MAX_PENDING_PAGES = 2; // at most 1,000 pending VMs
  const EVENTS_BACKLOG = 30; // how many past events to show on connect
  const EVENTS_SHOWN = 200;
  const LONG_POLL_S = 25; // under the server's 30 s cap
  const REFRESH_EVERY_MS = 30000; // liveness turns stale without an event
  const REFRESH_AFTER_EVENT_MS = 1000;
  const STATES = ["ready", "disabled", "failed", "unsupported", "unknown"];

  const $ = (id) => document.getElementById(id);

  class HttpError extends Error {
    constructor(status, problem) {
      const detail = problem && typeof problem.detail === "string" ? problem.detail : "";
      super(`HTTP ${status}${detail ? ": " + detail : ""}`);
      this.status = status;
    }
  }

  // ---- the token ---------------------------------------------------------------------------

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  // A link like /dashboard#token=... (for scripts and headless browsers): read once, kept in
  // session storage, and taken out of the address bar and the history.
  function takeTokenFromFragment() {
    const params = new URLSearchParams(location.hash.slice(1));
    if (!params.has("token")) return;
    const value = params.get("token").trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    history.replaceState(null, "", location.pathname + location.search);
  }

  // ---- the API (GET only) ----------------------------------------------------------------------

  async function get(path, params, signal) {
    const url = new URL(path, location.origin);
    for (const [key, value] of Object.entries(params || {})) {
      if (value !== undefined && value !== null) url.searchParams.set(key, String(value));
    }
    const response = await fetch(url, {
      method: "GET",
      headers: { Authorization: `Bearer ${token()}`, Accept: "application/json" },
      cache: "no-store",
      credentials: "omit",
      signal,
    });
    if (!response.ok) {
      let problem = null;
      try {
        problem = await response.json();
      } catch (_) {
        problem = null;
      }
      throw new HttpError(response.status, problem);
    }
    return response.json();
  }

  // Follows `next` up to maxPages; `truncated` says there was more.
  async function getAll(path, params, maxPages, signal) {
    const items = [];
    let cursor = null;
    for (let page = 0; page < maxPages; page++) {
      const body = await get(path, { ...params, limit: PAGE_SIZE, cursor }, signal);
      items.push(...body.items);
      cursor = body.next;
      if (!cursor) return { items, truncated: false };
    }
    return { items, truncated: true };
  }

  // ---- DOM helpers -----------------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function cell(row, content, className) {
    const td = el("td", className);
    if (content instanceof Node) td.append(content);
    else td.textContent = content === undefined || content === null || content === "" ? "—" : String(content);
    row.append(td);
    return td;
  }

  function stateClass(state) {
    return STATES.includes(state) ? `tdx-${state}` : "tdx-other";
  }

  function tdxBadge(state) {
    return el("span", `badge ${stateClass(state)}`, state);
  }

  function showError(id, error) {
    const node = $(id);
    if (!error) {
      node.hidden = true;
      node.textContent = "";
      return;
    }
    node.hidden = false;
    node.textContent =
      error.status === 403 ? `This token's role may not read this (${error.message}).` : String(error.message);
  }

  function note(id, text) {
    const node = $(id);
    node.hidden = !text;
    node.textContent = text || "";
  }

  // 0.5, 2, 127.5: one decimal only where it says something.
  function gib(mib) {
    return String(Number((mib / 1024).toFixed(1)));
  }


  function age(iso) {
    const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (seconds < 60) return `${Math.floor(seconds)}s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)}m`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)}h`;
    return `${Math.floor(seconds / 86400)}d`;
  }

  function clock(iso) {
    const when = iso ? new Date(iso) : new Date();
    return when.toLocaleTimeString([], { hour12: false });
  }

  function usageBar(used, total) {
    const wrap = el("div", "usage");
    wrap.append(el("span", "usage-text", `${used}/${total}`));
    const bar = el("div", "bar");
    const fill = el("div", "bar-fill");
    const ratio = Number(total) > 0 ? Math.min(1, Number(used) / Number(total)) : 0;
    fill.style.width = `${(ratio * 100).toFixed(1)}%`;
    if (ratio >= 0.9) fill.classList.add("bar-high");
    bar.append(fill);
    wrap.append(bar);
    return wrap;
  }

  // ---- fleet summary (GET /v1/capacity) ------------------------------------------------------------

  function stat(label, value, extraClass) {
    const box = el("div", `stat ${extraClass || ""}`);
    box.append(el("div", "stat-value", value), el("div", "stat-label", label));
    return box;
  }

  function renderCapacity(cap) {
    const summary = $("summary");
    summary.replaceChildren();
    const states = el("div", "states");
    for (const state of STATES) {
      const entry = cap.by_tdx_state[state];
      if (!entry) continue;
      const box = el("div", `state-card ${stateClass(state)}`);
      if (entry.hosts === 0) box.classList.add("empty");
      const head = el("div", "state-head");
      head.append(tdxBadge(state));
      box.append(head, el("div", "stat-value", entry.hosts), el("div", "stat-label", `hosts, ${entry.hosts_alive} alive`));
      if (entry.keyids_total > 0) {
        box.append(el("div", "stat-label", `KeyIDs ${entry.keyids_used}/${entry.keyids_total}`));
      }
      box.title = `click to show only ${state} hosts`;
      box.addEventListener("click", () => {
        $("host-filter").value = state;
        renderHosts();
      });
      states.append(box);
    }
    // TDX VMs get KeyIDs only on ready hosts; vCPUs and memory count on every host.
    const t = cap.totals;
    const ready = cap.by_tdx_state.ready || t;
    const totals = el("div", "totals");
    const keyids = stat("KeyIDs used / total", `${ready.keyids_used} / ${ready.keyids_total}`);
    keyids.title = `on ready hosts; all hosts: ${t.keyids_used} / ${t.keyids_total}`;
    const stranded = stat("KeyIDs stranded", ready.keyids_stranded, ready.keyids_stranded > 0 ? "warn" : "");
    stranded.title = "free KeyIDs on hosts without room for another VM";
    totals.append(
      keyids,
      stat("KeyIDs free", ready.keyids_free),
      stranded,
      stat("vCPUs free", Number(t.vcpus_free).toLocaleString()),
      stat("Memory free GiB", Number(gib(t.memory_mib_free)).toLocaleString()),
      stat("Hosts alive", `${t.hosts_alive} / ${t.hosts}`),
    );
    summary.append(states, totals);
  }

  // ---- hosts (GET /v1/hosts) -------------------------------------------------------------------

  let hosts = [];

  function scheduling(host) {
    if (host.draining) return el("span", "pill warn", "draining");
    if (!host.schedulable) return el("span", "pill warn", "cordoned");
    return el("span", "pill ok", "schedulable");
  }

  function labelsOf(host) {
    return Object.entries(host.labels || {}).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  }

  function matches(host, needle) {
    if (!needle) return true;
    const haystack = [host.name, host.tdx.state, host.tdx.reason || "", ...labelsOf(host).map(([k, v]) => `${k}=${v}`)];
    return haystack.some((text) => text.toLowerCase().includes(needle));
  }

  function hostRow(host) {
    const row = el("tr");
    const name = cell(row, host.name, "name");
    name.title = `id ${host.id}`;
    cell(row, tdxBadge(host.tdx.state));
    const reason = cell(row, host.tdx.reason, host.tdx.reason ? "reason" : "reason muted");
    if (host.tdx.module_version) reason.title = `TDX module ${host.tdx.module_version}`;
    const never = !host.alive && !host.last_heartbeat_at;
    const liveness = host.alive ? ["pill ok", "alive"] : never ? ["pill off", "never seen"] : ["pill bad", "stale"];
    const alive = cell(row, el("span", liveness[0], liveness[1]));
    alive.title = host.last_heartbeat_at ? `last heartbeat ${host.last_heartbeat_at}` : "never heard from";
    cell(row, scheduling(host));
    const keyids = cell(row, usageBar(host.tdx.keyids_used, host.tdx.keyids_total), "num");
    if (host.tdx.keyids_observed_in_use !== null && host.tdx.keyids_observed_in_use !== undefined) {
      keyids.title = `the agent sees ${host.tdx.keyids_observed_in_use} in use`;
    }
    // Placement capacity: (physical - reserved) x allocation ratio for vCPUs, minus reserved for memory.
    const ratio = host.cpu_allocation_ratio || 1;
    const vcpus = cell(row, usageBar(host.usage.vcpus, Number(((host.vcpus - host.reserved_vcpus) * ratio).toFixed(1))), "num");
    vcpus.title = `${host.vcpus} physical, ${host.reserved_vcpus} reserved, allocation ratio ${ratio}`;
    const memory = cell(row, usageBar(gib(host.usage.memory_mib), gib(host.memory_mib - host.reserved_memory_mib)), "num");
    memory.title = `${gib(host.memory_mib)} GiB, ${gib(host.reserved_memory_mib)} GiB reserved`;
    cell(row, host.usage.vms, "num");
    const labels = el("div", "labels");
    for (const [key, value] of labelsOf(host)) labels.append(el("span", "chip", `${key}=${value}`));
    cell(row, labels.childElementCount ? labels : null);
    return row;
  }

  function renderHosts() {
    const needle = $("host-filter").value.trim().toLowerCase();
    const shown = hosts.filter((h) => matches(h, needle));
    const body = $("hosts");
    body.replaceChildren(...shown.map(hostRow));
    if (shown.length === 0) {
      const row = el("tr");
      const td = cell(row, hosts.length ? "no host matches the filter" : "no hosts registered", "empty-row");
      td.colSpan = 10;
      body.append(row);
    }
    $("hosts-count").textContent = needle ? `(${shown.length} of ${hosts.length})` : `(${hosts.length})`;
  }

  // ---- pending VMs (GET /v1/vms?status=pending) ------------------------------------------------------

  function pendingRow(vm) {
    const row = el("tr");
    const name = el("div", "name", vm.name);
    name.append(el("div", "muted small mono vm-id", vm.id));
    cell(row, name);
    cell(row, vm.project);
    const size = el("div", "size", `${vm.vcpus} vCPU · ${gib(vm.memory_mib)} GiB`);
    if (vm.tdx) size.append(el("div", "muted small", "TDX"));
    cell(row, size, "nowrap");
    const waiting = cell(row, age(vm.created_at));
    waiting.title = `created ${vm.created_at}; fails if still pending at ${vm.deadline}`;
    const why = el("div", "why");
    why.append(el("div", null, vm.explanation || "waiting for the scheduler"));
    const reasons = el("div", "labels");
    for (const [code, count] of Object.entries(vm.reasons || {})) reasons.append(el("span", "chip", `${code} × ${count}`));
    if (reasons.childElementCount) why.append(reasons);
    cell(row, why);
    return row;
  }

  function renderPending(vms, truncated) {
    const body = $("pending");
    body.replaceChildren(...vms.map(pendingRow));
    if (vms.length === 0) {
      const row = el("tr");
      cell(row, "nothing is waiting", "empty-row").colSpan = 5;
      body.append(row);
    }
    $("pending-count").textContent = `(${vms.length}${truncated ? "+" : ""})`;
  }

  // ---- refreshing -----------------------------------------------------------------------------------

  let session = null; // {abort: AbortController, timer, refreshing, again, soon}

  function refused(error) {
    if (error instanceof HttpError && error.status === 401) {
      signOut("The server refused this token (401). Enter another one.");
      return true;
    }
    return false;
  }

  async function refresh() {
    const s = session;
    if (!s) return;
    if (s.refreshing) {
      s.again = true;
      return;
    }
    s.refreshing = true;
    const signal = s.abort.signal;
    const [capacity, hostList, pending] = await Promise.allSettled([
      get("/v1/capacity", null, signal),
      getAll("/v1/hosts", null, MAX_HOST_PAGES, signal),
      getAll("/v1/vms", { status: "pending" }, MAX_PENDING_PAGES, signal),
    ]);
    s.refreshing = false;
    if (session !== s || signal.aborted) return;
    for (const result of [capacity, hostList, pending]) {
      if (result.status === "rejected" && refused(result.reason)) return;
    }
    if (capacity.status === "fulfilled") renderCapacity(capacity.value);
    showError("capacity-error", capacity.status === "rejected" ? capacity.reason : null);
    if (hostList.status === "fulfilled") {
      hosts = hostList.value.items.slice().sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
      renderHosts();
      note("hosts-note", hostList.value.truncated ? `Showing the first ${hosts.length} hosts.` : null);
    }
    showError("hosts-error", hostList.status === "rejected" ? hostList.reason : null);
    if (pending.status === "fulfilled") {
      renderPending(pending.value.items, pending.value.truncated);
      note("pending-note", pending.value.truncated ? `Showing the first ${pending.value.items.length}.` : null);
    }
    showError("pending-error", pending.status === "rejected" ? pending.reason : null);
    $("updated").textContent = `updated ${clock()}`;
    if (s.again) {
      s.again = false;
      refresh();
    }
  }

  function refreshSoon() {
    const s = session;
    if (!s || s.soon) return;
    s.soon = setTimeout(() => {
      s.soon = null;
      refresh();
    }, REFRESH_AFTER_EVENT_MS);
  }

  // ---- the event feed: long-poll GET /v1/events (EventSource cannot send Authorization) ---------

  function feedStatus(state, text) {
    const node = $("feed-status");
    node.dataset.state = state;
    node.textContent = text;
  }

  const EVENT_DATA_CHARS = 160;

  function dataSummary(event) {
    return Object.entries(event.data || {})
      .filter(([key, value]) => !(key === "id" && value === event.subject))
      .map(([key, value]) => `${key}=${typeof value === "string" ? value : JSON.stringify(value)}`)
      .join("  ");
  }

  function eventItem(event) {
    const item = el("li", "event");
    const when = el("span", "event-time", clock(event.at));
    when.title = `#${event.id} at ${event.at}`;
    const family = event.kind.split(".")[0];
    const kind = el("span", `event-kind kind-${family === "host" || family === "vm" ? family : "other"}`, event.kind);
    if (/(lost|failed|stale|unschedulable)$/.test(event.kind)) kind.classList.add("kind-bad");
    item.append(when, kind, el("span", "event-subject", event.subject));
    const details = dataSummary(event);
    if (details) {
      const line = el("div", "event-data", details.length > EVENT_DATA_CHARS ? details.slice(0, EVENT_DATA_CHARS) + "…" : details);
      line.title = details;
      item.append(line);
    }
    return item;
  }

  function showEvents(items) {
    const list = $("events");
    for (const event of items) list.prepend(eventItem(event));
    while (list.childElementCount > EVENTS_SHOWN) list.lastElementChild.remove();
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

  async function feed(s) {
    const signal = s.abort.signal;
    let after = null;
    let failures = 0;
    while (!signal.aborted) {
      try {
        if (after === null) {
          const head = await get("/v1/events", { after: 0, limit: 1 }, signal);
          after = Math.max(0, head.head_id - EVENTS_BACKLOG);
        }
        feedStatus("live", "live");
        const page = await get("/v1/events", { after, limit: 100, wait: LONG_POLL_S }, signal);
        failures = 0;
        showError("events-error", null);
        if (page.items.length) {
          showEvents(page.items);
          refreshSoon();
        }
        after = page.last_id;
      } catch (error) {
        if (signal.aborted || refused(error)) return;
        failures += 1;
        const delay = Math.min(30000, 1000 * 2 ** Math.min(failures, 5));
        feedStatus("down", `reconnecting in ${Math.round(delay / 1000)}s`);
        if (error instanceof HttpError) showError("events-error", error);
        await pause(delay, signal);
      }
    }
  }

  // ---- sign in / out ---------------------------------------------------------------------------

  function signIn() {
    $("login").hidden = true;
    $("board").hidden = false;
    $("forget").hidden = false;
    $("events").replaceChildren();
    session = { abort: new AbortController(), timer: null, refreshing: false, again: false, soon: null };
    session.timer = setInterval(refresh, REFRESH_EVERY_MS);
    refresh();
    feed(session);
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    if (session) {
      session.abort.abort();
      clearInterval(session.timer);
      clearTimeout(session.soon);
      session = null;
    }
    hosts = [];
    $("board").hidden = true;
    $("forget").hidden = true;
    $("login").hidden = false;
    $("updated").textContent = "";
    feedStatus("idle", "not connected");
    const error = $("login-error");
    error.hidden = !message;
    error.textContent = message || "";
    $("token-input").value = "";
    $("token-input").focus();
  }

  function start() {
    takeTokenFromFragment();
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token-input").value.trim();
      if (!value) return;
      sessionStorage.setItem(TOKEN_KEY, value);
      $("token-input").value = "";
      signIn();
    });
    $("forget").addEventListener("click", () => signOut(null));
    $("host-filter").addEventListener("input", renderHosts);
    if (token()) signIn();
    else signOut(null);
  }

  start();
})();
