// The columns of the host, VM and project tables, shared by every page that lists them. A new
// column (a host's running operation) is one more entry here.
"use strict";

import { alivePill, chips, el, gib, labelsOf, link, schedulingPill, tdxBadge, usageBar, vmStatus, age } from "./dom.js";
import { memoryLimitMib, scheduling, vcpuLimit } from "./figures.js";

export function hostHref(name) {
  return `#/hosts/${encodeURIComponent(name)}`;
}

export const HOST_COLUMNS = [
  { title: "Name", className: "name", render: (h) => link(hostHref(h.name), h.name), hint: (h) => `id ${h.id}` },
  { title: "TDX", render: (h) => tdxBadge(h.tdx.state) },
  {
    title: "Reason",
    className: "reason",
    render: (h) => h.tdx.reason,
    hint: (h) => [h.tdx.reason_code, h.tdx.remedy].filter(Boolean).join(": ") || null,
  },
  {
    title: "Alive",
    render: alivePill,
    hint: (h) => (h.last_heartbeat_at ? `last heartbeat ${h.last_heartbeat_at}` : "never heard from"),
  },
  { title: "Scheduling", render: (h) => schedulingPill(scheduling(h)) },
  {
    title: "KeyIDs",
    className: "num",
    render: (h) => usageBar(h.tdx.keyids_used, h.tdx.keyids_total),
    hint: (h) =>
      h.tdx.keyids_observed_in_use === null || h.tdx.keyids_observed_in_use === undefined
        ? null
        : `the agent sees ${h.tdx.keyids_observed_in_use} in use`,
  },
  {
    title: "vCPUs",
    className: "num vcpus",
    render: (h) => usageBar(h.usage.vcpus, vcpuLimit(h)),
    hint: (h) => `${h.vcpus} physical, ${h.reserved_vcpus} reserved, allocation ratio ${h.cpu_allocation_ratio ?? 1}`,
  },
  {
    title: "Memory GiB",
    className: "num",
    render: (h) => usageBar(gib(h.usage.memory_mib), gib(memoryLimitMib(h))),
    hint: (h) => `${h.usage.memory_mib}/${memoryLimitMib(h)} MiB (${h.memory_mib} physical, ${h.reserved_memory_mib} reserved)`,
  },
  { title: "VMs", className: "num", render: (h) => h.usage.vms },
  { title: "Labels", render: (h) => chips(labelsOf(h.labels)) },
];

function vmName(vm) {
  const box = el("div", "name", vm.name);
  box.append(el("div", "muted small mono vm-id", vm.id));
  return box;
}

function vmSize(vm) {
  const size = el("div", "size", `${vm.vcpus} vCPU · ${gib(vm.memory_mib)} GiB`);
  if (vm.tdx) size.append(el("div", "muted small", "TDX"));
  return size;
}

function why(vm) {
  const box = el("div", "why");
  box.append(el("div", null, vm.explanation || (vm.status === "pending" ? "waiting for the scheduler" : "—")));
  const reasons = chips(Object.entries(vm.reasons || {}).map(([code, count]) => `${code} × ${count}`));
  if (reasons && vm.status === "pending") box.append(reasons);
  if (vm.status_detail) box.append(el("div", "muted small", vm.status_detail));
  return box;
}

export const VM_COLUMNS = [
  { title: "VM", render: vmName },
  { title: "Project", render: (vm) => vm.project },
  { title: "Status", render: (vm) => vmStatus(vm.status) },
  { title: "Size", className: "nowrap", render: vmSize },
  { title: "Host", className: "nowrap", render: (vm) => (vm.host ? link(hostHref(vm.host), vm.host) : null) },
  { title: "Age", render: (vm) => age(vm.created_at), hint: (vm) => `created ${vm.created_at}, updated ${vm.updated_at}` },
  { title: "Explanation", render: why },
];

// The pending queue: how long each VM has waited and why nothing fits.
// Running operations (the guided TDX opt-in): what each waits for, and what blocks it.
export const OPERATION_COLUMNS = [
  { title: "Host", className: "name", render: (op) => link(hostHref(op.host), op.host), hint: (op) => `operation ${op.id}` },
  { title: "Operation", render: (op) => op.kind.replaceAll("_", " ") },
  { title: "Step", render: (op) => op.step.replaceAll("_", " ") },
  {
    title: "Waiting for",
    className: "reason",
    render: (op) => op.detail,
    hint: (op) => (op.blocking_vms_total ? `${op.blocking_vms_total} active VM(s) block the reload` : null),
  },
  { title: "Started", render: (op) => age(op.created_at), hint: (op) => `gives up at ${op.deadline}` },
];

export const PENDING_COLUMNS = [
  { title: "VM", render: vmName },
  { title: "Project", render: (vm) => vm.project },
  { title: "Size", className: "nowrap", render: vmSize },
  {
    title: "Waiting",
    render: (vm) => age(vm.created_at),
    hint: (vm) => `created ${vm.created_at}; fails if still pending at ${vm.deadline}`,
  },
  { title: "Why not placed", render: why },
];

// A project's quota, resource by resource: used/limit as tdxctl quota list prints it ("-": no limit).
function quota(resource, toText) {
  const show = toText || String;
  return (p) => {
    const used = p.usage[resource];
    const limit = p.limits[resource];
    if (limit === null || limit === undefined) {
      const box = el("div", "usage");
      box.append(el("span", "usage-text", `${show(used)}/-`));
      return box;
    }
    return usageBar(show(used), show(limit));
  };
}

function quotaHint(resource, unit) {
  return (p) => {
    const limit = p.limits[resource];
    const used = p.usage[resource];
    return limit === null || limit === undefined ? `${used} ${unit}, no limit` : `${used} of ${limit} ${unit}`;
  };
}

export function projectVmsHref(project) {
  return `#/vms?project=${encodeURIComponent(project)}&status=not-ended`;
}

// Usage counts VMs not yet ended (pending, scheduled, running, deleting).
export const PROJECT_COLUMNS = [
  { title: "Project", className: "name", render: (p) => link(projectVmsHref(p.project), p.project) },
  { title: "VMs", className: "num", render: quota("vms"), hint: quotaHint("vms", "VMs not yet ended") },
  { title: "vCPUs", className: "num", render: quota("vcpus"), hint: quotaHint("vcpus", "vCPUs") },
  {
    title: "Memory GiB",
    className: "num",
    render: quota("memory_mib", gib),
    hint: quotaHint("memory_mib", "MiB"),
  },
  { title: "TDX VMs", className: "num", render: quota("tdx_vms"), hint: quotaHint("tdx_vms", "TDX VMs (one KeyID each)") },
];
