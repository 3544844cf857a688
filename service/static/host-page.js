// #/hosts/NAME : one host: TDX state with reason and remedy, capacity, liveness, load history, its
// VMs, and for an admin token cordon / uncordon / drain, sent with If-Match = the ETag read here.
"use strict";

import { get, getTagged, hostPath, patch } from "./api.js";
import { VM_COLUMNS } from "./columns.js";
import {
  alivePill, chips, dataTable, details, el, fillTable, fromTemplate, labelsOf, link, note, schedulingPill,
  showError, tdxBadge, usageBar, when, gib,
} from "./dom.js";
import { memoryLimitMib, NOT_ENDED_VM_STATUSES, scheduling, vcpuLimit } from "./figures.js";

const LOADS_SHOWN = 20;
const REFRESH_EVERY_MS = 30000;

const LOAD_COLUMNS = [
  { title: "Reported", className: "nowrap", render: (x) => when(x.reported_at) },
  { title: "Load", className: "mono", render: (x) => x.id.slice(0, 8), hint: (x) => x.id },
  { title: "Boot", className: "mono", render: (x) => x.boot_id.slice(0, 8), hint: (x) => x.boot_id },
  { title: "Kernel", render: (x) => x.kernel },
  { title: "TDX", render: (x) => tdxBadge(x.tdx_state) },
  { title: "KeyIDs", className: "num", render: (x) => x.keyids_total },
  { title: "Module", render: (x) => x.module_version },
  { title: "Current", render: (x) => (x.current ? el("span", "pill info", "current") : null) },
  { title: "Reason", className: "reason", render: (x) => x.tdx_reason, hint: (x) => (x.errors || []).join("\n") || null },
];

// What each action sends (uncordon also ends a drain, as `tdxctl hosts uncordon` does).
const ACTIONS = {
  cordon: { body: { schedulable: false }, done: "cordoned: no new VMs will be placed here" },
  uncordon: { body: { schedulable: true, draining: false }, done: "uncordoned: placements allowed again" },
  drain: { body: { draining: true }, done: "draining: no new VMs; the ones here keep running" },
};

export function mount(container, params, app) {
  const name = params.get("name");
  const view = fromTemplate("host");
  container.replaceChildren(view.root);
  view.name.textContent = name;
  view.allVms.href = `#/vms?host=${encodeURIComponent(name)}`;
  view.events.href = `#/events?subject=${encodeURIComponent(name)}`;
  const loads = dataTable(LOAD_COLUMNS);
  loads.table.id = "loads-table";
  view.loads.append(loads.wrap);
  const vms = dataTable(VM_COLUMNS);
  vms.table.id = "host-vms-table";
  view.vms.append(vms.wrap);
  view.actions.hidden = app.role !== "admin";

  let current = null; // {host, etag}: what the page shows, and the ETag an action sends back

  function message(kind, text, withReload) {
    view.message.hidden = !text;
    view.message.className = `message ${kind}`;
    view.message.replaceChildren(el("span", null, text));
    if (withReload) {
      const again = el("button", "small-button", "Reload");
      again.type = "button";
      again.addEventListener("click", () => load(true));
      view.message.append(again);
    }
  }

  function renderHost(host) {
    const word = scheduling(host);
    view.badges.replaceChildren(tdxBadge(host.tdx.state), schedulingPill(word));
    const tdx = host.tdx;
    const load = host.load;
    details(view.tdx, [
      ["State", tdxBadge(tdx.state)],
      ["Reason", tdx.reason],
      ["Reason code", tdx.reason_code ? el("code", null, tdx.reason_code) : undefined],
      ["Remedy", tdx.remedy ? el("span", "remedy", tdx.remedy) : undefined],
      ["KeyIDs used / total", `${tdx.keyids_used} / ${tdx.keyids_total}`],
      ["KeyIDs the agent sees in use", tdx.keyids_observed_in_use ?? undefined],
      ["TDX module", tdx.module_version],
      ["Current load", load ? `${load.id} at ${load.reported_at}` : "none reported yet"],
      ["Boot", load ? load.boot_id : null],
      ["Kernel", load ? load.kernel : null],
    ]);
    const vcpus = usageBar(host.usage.vcpus, vcpuLimit(host));
    vcpus.classList.add("vcpus");
    details(view.capacity, [
      ["Scheduling", schedulingPill(word)],
      ["Alive", alivePill(host)],
      ["Last heartbeat", when(host.last_heartbeat_at) || "never"],
      ["vCPUs used / allocatable", vcpus],
      ["", `${host.vcpus} physical, ${host.reserved_vcpus} reserved, allocation ratio ${host.cpu_allocation_ratio ?? 1}`],
      ["Memory used / allocatable", usageBar(gib(host.usage.memory_mib), gib(memoryLimitMib(host)), "GiB")],
      ["", `${host.memory_mib} MiB physical, ${host.reserved_memory_mib} MiB reserved`],
      ["VMs", host.usage.vms],
      ["Labels", chips(labelsOf(host.labels))],
      ["Generation", host.generation],
    ]);
    view.cordon.disabled = !host.schedulable;
    view.uncordon.disabled = host.schedulable && !host.draining;
    view.drain.disabled = host.draining;
  }

  async function load(fresh) {
    try {
      const [tagged, history, placed] = await Promise.all([
        getTagged(hostPath(name), app.signal),
        get(`${hostPath(name)}/loads`, { limit: LOADS_SHOWN }, app.signal),
        get("/v1/vms", { host: name, status: NOT_ENDED_VM_STATUSES, limit: 500 }, app.signal),
      ]);
      current = tagged;
      renderHost(tagged.body);
      fillTable(loads.tbody, LOAD_COLUMNS, history.items, "no kvm_intel load reported yet");
      note(view.loadsNote, history.next ? `The latest ${history.items.length} loads.` : null);
      fillTable(vms.tbody, VM_COLUMNS, placed.items, "no VM runs here");
      view.vmCount.textContent = `(${placed.items.length}${placed.next ? "+" : ""})`;
      showError(view.error, null);
      view.body.hidden = false;
      if (fresh) message("", "");
      app.stamp();
    } catch (error) {
      if (app.signal.aborted || app.refused(error)) return;
      if (error.status === 404) {
        view.body.hidden = true;
        showError(view.error, { message: `There is no host ${name}.` });
        return;
      }
      showError(view.error, error);
    }
  }

  async function act(action) {
    if (!current) return;
    const buttons = [view.cordon, view.uncordon, view.drain];
    for (const b of buttons) b.disabled = true;
    try {
      const { body, etag } = await patch(hostPath(name), ACTIONS[action].body, current.etag, app.signal);
      current = { body, etag };
      renderHost(body);
      message("ok", `${name} ${ACTIONS[action].done}.`);
      load(false);
    } catch (error) {
      if (app.signal.aborted || app.refused(error)) return;
      if (error.status === 412) {
        message(
          "bad",
          `${name} changed meanwhile (since this page read it), so nothing was done. Reload to see what changed, then try again.`,
          true,
        );
      } else {
        message("bad", `Could not ${action} ${name}: ${error.message}`);
      }
      renderHost(current.body);
    }
  }

  for (const action of Object.keys(ACTIONS)) view[action].addEventListener("click", () => act(action));
  view.reload.addEventListener("click", () => load(true));
  const timer = setInterval(() => load(false), REFRESH_EVERY_MS);
  app.signal.addEventListener("abort", () => clearInterval(timer));
  view.back.replaceChildren(link("#/", "← all hosts"));
  load(false);
}
