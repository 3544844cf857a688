"""Prometheus metrics. A registry per app, so several apps (tests, replicas) never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.placements = Counter(
            "tdx_placements",
            "Placement attempts by result (scheduled, pending, failed)",
            ["result"],
            registry=self.registry,
        )
        self.placement_seconds = Histogram(
            "tdx_placement_seconds",
            "Time to decide and claim one placement",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.claim_conflicts = Counter(
            "tdx_claim_conflicts",
            "Claims that lost a race on a host and moved on to the next candidate",
            registry=self.registry,
        )
        self.queue_passes = Counter(
            "tdx_queue_passes", "Passes of the pending queue (one per wake-up, or more after a budget ran out)",
            registry=self.registry,
        )
        self.queue_pass_seconds = Histogram(
            "tdx_queue_pass_seconds",
            "Time one pass of the pending queue took",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self.queue_attempts = Counter(
            "tdx_queue_attempts", "Placement attempts of pending VMs by the queue", registry=self.registry
        )
        self.queue_skipped = Counter(
            "tdx_queue_skipped",
            "Pending VMs the queue read and skipped, their shape known not to fit",
            registry=self.registry,
        )
        self.pending = Gauge("tdx_vms_pending", "VMs waiting for a host", registry=self.registry)
        self.hosts = Gauge("tdx_hosts", "Hosts by TDX state", ["tdx_state"], registry=self.registry)
        self.keyids_total = Gauge(
            "tdx_keyids_total", "TDX KeyIDs on all hosts' current loads", registry=self.registry
        )
        self.keyids_used = Gauge("tdx_keyids_used", "TDX KeyIDs claimed by VMs", registry=self.registry)
        self.event_watchers = Gauge(
            "tdx_event_watchers", "Open SSE streams and waiting long-polls in this process", registry=self.registry
        )
        self.event_reads = Counter(
            "tdx_event_fanout_reads",
            "Reads of the event log by this process's broadcaster (one per wake-up, shared by every watcher)",
            registry=self.registry,
        )
        self.requests = Counter(
            "tdx_http_requests", "HTTP requests by method and status", ["method", "status"],
            registry=self.registry,
        )
