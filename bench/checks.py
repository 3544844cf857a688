"""What a scenario must not break, checked through the API after it ran; and the server's counters."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bench.wire import Connection


@dataclass
class Ledger:
    """What the driver was told: every VM answered ``scheduled`` and not deleted since."""

    host_states: dict[str, str]
    live: dict[str, str] = field(default_factory=dict)  # vm id -> host
    scheduled: int = 0
    deleted: int = 0
    misplaced: int = 0  # TDX VMs answered on a host that is not TDX-ready

    def placed(self, vm: dict[str, Any], tdx: bool) -> None:
        self.scheduled += 1
        self.live[vm["id"]] = vm["host"]
        if tdx and self.host_states.get(vm["host"]) != "ready":
            self.misplaced += 1

    def pop_any(self) -> str | None:
        if not self.live:
            return None
        vm_id = next(iter(self.live))
        del self.live[vm_id]
        return vm_id


@dataclass
class FleetCheck:
    hosts: int
    overcommitted: list[str]
    vms_on_hosts: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "hosts": self.hosts,
            "overcommits": len(self.overcommitted),
            "overcommitted_hosts": self.overcommitted[:20],
            "vms_on_hosts": self.vms_on_hosts,
        }


def host_overcommitted(host: dict[str, Any]) -> bool:
    usage = host["usage"]
    vcpu_limit = (host["vcpus"] - host["reserved_vcpus"]) * host.get("cpu_allocation_ratio", 4.0)
    return bool(
        usage["vcpus"] > vcpu_limit
        or usage["memory_mib"] > host["memory_mib"] - host["reserved_memory_mib"]
        or host["tdx"]["keyids_used"] > host["tdx"]["keyids_total"]
        or min(usage["vcpus"], usage["memory_mib"], usage["vms"], host["tdx"]["keyids_used"]) < 0
    )


async def check_fleet(port: int, headers: dict[str, str]) -> FleetCheck:
    """Page through every host: none may use more vCPUs (after the allocation ratio), memory or
    KeyIDs than it has."""
    import time

    started = time.perf_counter()
    conn = Connection("127.0.0.1", port, headers)
    over: list[str] = []
    hosts = vms = 0
    cursor: str | None = None
    try:
        while True:
            path = "/v1/hosts?limit=500" + (f"&cursor={cursor}" if cursor else "")
            status, raw = await conn.request("GET", path)
            if status != 200:
                raise RuntimeError(f"GET {path} -> {status}: {raw[:300]!r}")
            page = json.loads(raw)
            for host in page["items"]:
                hosts += 1
                vms += host["usage"]["vms"]
                if host_overcommitted(host):
                    over.append(host["name"])
            cursor = page["next"]
            if not cursor:
                break
    finally:
        conn.close()
    return FleetCheck(hosts, over, vms, time.perf_counter() - started)


async def scrape_metrics(port: int) -> dict[str, float]:
    """The server's counters: placements by result and claim conflicts."""
    conn = Connection("127.0.0.1", port)
    try:
        status, raw = await conn.request("GET", "/metrics")
    finally:
        conn.close()
    if status != 200:
        raise RuntimeError(f"GET /metrics -> {status}")
    wanted = ("tdx_claim_conflicts_total", "tdx_placements_total")
    out: dict[str, float] = {}
    for line in raw.decode().splitlines():
        if line.startswith(wanted):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def conflicts_and_placements(ports: list[int]) -> tuple[float, float]:
    conflicts = placed = 0.0
    for port in ports:
        m = await scrape_metrics(port)
        conflicts += m.get("tdx_claim_conflicts_total", 0.0)
        placed += m.get('tdx_placements_total{result="scheduled"}', 0.0)
    return conflicts, placed
