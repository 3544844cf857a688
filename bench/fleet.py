"""A fleet of N hosts in a realistic mix of TDX states, registered and reported through the API
(POST /v1/hosts, then the agent's POST /v1/hosts/{name}/loads), as agents would."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass

from bench.load import Recorder, closed_loop
from bench.wire import Connection

# Per 100 hosts: what each kvm_intel load reports. "no_kvm": TDX bring-up failed so hard that
# kvm_intel did not load (no VM at all); "unknown": registered, no load reported yet.
MIX: tuple[tuple[str, int], ...] = (
    ("ready", 50),
    ("disabled", 22),
    ("unsupported", 12),
    ("failed", 8),
    ("no_kvm", 3),
    ("unknown", 5),
)
_SLOTS = [state for state, n in MIX for _ in range(n)]
# (vCPUs, memory MiB) of three host generations.
SHAPES = ((64, 256 * 1024), (96, 384 * 1024), (128, 512 * 1024))


def state_of(i: int) -> str:
    # Spread the states over the index so any prefix of the fleet has the same mix.
    return _SLOTS[(i * 37) % len(_SLOTS)]


def tdx_state_of(state: str) -> str:
    return "failed" if state == "no_kvm" else state


def host_name(i: int) -> str:
    return f"h{i:06d}"


@dataclass(frozen=True)
class FleetSpec:
    hosts: int
    keyids: int = 63  # per ready host's load
    # Hosts registered through the API (the last ones); the others are seeded into the database.
    api_hosts: int | None = None

    @property
    def seeded(self) -> int:
        return 0 if self.api_hosts is None else max(self.hosts - self.api_hosts, 0)


def host_body(i: int) -> bytes:
    vcpus, memory = SHAPES[i % len(SHAPES)]
    return json.dumps(
        {
            "name": host_name(i),
            "vcpus": vcpus,
            "memory_mib": memory,
            "reserved_vcpus": 2,
            "reserved_memory_mib": 4096,
            "labels": {"zone": f"z{i % 3}", "rack": f"r{i % 40}"},
        },
        separators=(",", ":"),
    ).encode()


def load_body(state: str, keyids: int) -> dict[str, object]:
    body: dict[str, object] = {
        "load_id": str(uuid.uuid4()),
        "boot_id": str(uuid.uuid4()),
        "kernel": "6.16.0-tdx",
        "kvm_intel_loaded": True,
        "tdx_platform": True,
        "tdx_requested": True,
        "tdx_effective": True,
        "keyids_total": keyids,
        "module_version": "1.5.06",
        "errors": [],
    }
    if state == "unsupported":
        body.update(tdx_platform=False, tdx_requested=False, tdx_effective=False, keyids_total=0)
    elif state == "disabled":
        body.update(tdx_requested=False, tdx_effective=False, keyids_total=0)
    elif state == "failed":
        body.update(tdx_effective=False, keyids_total=0, errors=["virt/tdx: module initialization failed (-5)"])
    elif state == "no_kvm":
        body.update(kvm_intel_loaded=False, tdx_effective=False, keyids_total=0,
                    errors=["kvm_intel: tdx: no TDX private KeyIDs available"])
    return body


@dataclass
class Fleet:
    spec: FleetSpec
    load_ids: dict[str, str]  # host name -> current load id (hosts that reported a load)
    states: dict[str, str]  # host name -> TDX state
    seconds: float  # registering the API-loaded hosts
    errors: int

    @property
    def api_hosts(self) -> int:
        return self.spec.hosts - self.spec.seeded

    @property
    def hosts_per_s(self) -> float:
        return self.api_hosts / self.seconds


async def load_fleet(
    ports: list[int], spec: FleetSpec, headers: dict[str, str], connections: int = 16, database_url: str = ""
) -> Fleet:
    load_ids: dict[str, str] = {}
    states: dict[str, str] = {}
    if spec.seeded:
        from bench.seed import seed_hosts

        states, load_ids = await asyncio.to_thread(seed_hosts, database_url, 0, spec.seeded, spec.keyids)

    async def step(conn: Connection, n: int, rec: Recorder) -> None:
        i = spec.seeded + n
        name = host_name(i)
        state = state_of(i)
        status, raw = await conn.request("POST", "/v1/hosts", host_body(i))
        if status != 201:
            rec.error(f"create:{status}", raw.decode(errors="replace"))
            return
        states[name] = tdx_state_of(state)
        if state == "unknown":
            return
        body = load_body(state, spec.keyids)
        status, raw = await conn.request(
            "POST", f"/v1/hosts/{name}/loads", json.dumps(body, separators=(",", ":")).encode()
        )
        if status != 201:
            rec.error(f"load:{status}", raw.decode(errors="replace"))
            return
        load_ids[name] = str(body["load_id"])

    rec = await closed_loop(ports, connections, step, max_steps=spec.hosts - spec.seeded, headers=headers)
    if rec.errors:
        raise RuntimeError(f"loading the fleet failed ({rec.errors}): {rec.first_error}")
    return Fleet(spec, load_ids, states, rec.elapsed, sum(rec.errors.values()))


BATCH = 1000  # hosts per POST /v1/hosts:batch (the endpoint's maximum)


def batch_body(start: int, stop: int, keyids: int) -> bytes:
    """Hosts start..stop-1 of the fleet, each with its first load report unless it has none yet."""
    hosts = []
    for i in range(start, stop):
        entry: dict[str, object] = json.loads(host_body(i))
        state = state_of(i)
        if state != "unknown":
            entry["load"] = load_body(state, keyids)
        hosts.append(entry)
    return json.dumps({"hosts": hosts}, separators=(",", ":")).encode()


async def load_fleet_batched(port: int, hosts: int, headers: dict[str, str], connections: int = 2,
                             keyids: int = 63) -> Recorder:
    """Register a whole fleet through POST /v1/hosts:batch; each host's latency is its batch's."""
    bodies = [batch_body(start, min(start + BATCH, hosts), keyids) for start in range(0, hosts, BATCH)]
    rec = Recorder()
    loop = asyncio.get_running_loop()

    async def worker() -> None:
        conn = Connection("127.0.0.1", port, headers)
        try:
            while bodies:
                body = bodies.pop()
                t0 = loop.time()
                status, raw = await conn.request("POST", "/v1/hosts:batch", body)
                if status != 201:
                    rec.error(f"batch:{status}", raw.decode(errors="replace"))
                    continue
                seconds = loop.time() - t0
                for _ in range(json.loads(raw)["created"]):
                    rec.add("hosts", seconds)
        finally:
            conn.close()

    rec.started = loop.time()
    await asyncio.gather(*[worker() for _ in range(connections)])
    rec.ended = loop.time()
    return rec
