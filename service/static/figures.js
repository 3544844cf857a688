// The figures shown for a host: service/host_figures.py in JavaScript, function for function, so
// the dashboard and tdxctl always agree (the browser test compares them). The arithmetic is the
// scheduler's: what is shown is what placement uses.
"use strict";

// vCPUs placements may claim: (physical - reserved) x allocation ratio, in whole vCPUs.
export function vcpuLimit(host) {
  const ratio = host.cpu_allocation_ratio ?? 1;
  return Math.floor((host.vcpus - host.reserved_vcpus) * ratio);
}

// Memory placements may claim: physical minus reserved (never overcommitted).
export function memoryLimitMib(host) {
  return host.memory_mib - host.reserved_memory_mib - ((host.tdx && host.tdx.pamt_mib) || 0);
}

// "draining", "cordoned", "stale" (left schedulable but not heartbeating) or "schedulable".
export function scheduling(host) {
  if (host.draining) return "draining";
  if (!host.schedulable) return "cordoned";
  if (!host.alive) return "stale";
  return "schedulable";
}

// A free-vCPU total from /v1/capacity in whole vCPUs.
export function wholeVcpus(free) {
  return Math.floor(free);
}

export const ENDED_VM_STATUSES = ["deleted", "failed", "lost"];
export const NOT_ENDED_VM_STATUSES = ["pending", "scheduled", "running", "deleting"];
export const VM_STATUSES = [...NOT_ENDED_VM_STATUSES, ...ENDED_VM_STATUSES];
