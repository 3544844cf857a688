"""The agent's loop: report the kvm_intel load, then heartbeat; report again when the load changes.

A load is the boot plus the kvm_intel module instance (identity.py). A new load is reported on start
(unless the state dir says it is the load already reported: an agent restart), when the boot_id
changes, and when the module instance changes (it was reloaded) or the module went away. Nothing
else makes a new load: an edit of modprobe.d, a TDX module version appearing or changing, KeyIDs
coming and going are heartbeat observations.

Settling: a module half loaded or half unloaded (``initstate`` ``coming``/``going``) is not looked
at. A module that is absent is reported as such only after ``settle_s`` seconds (at start-up:
kvm_intel may still be autoloaded at boot; later: ``modprobe -r kvm_intel && modprobe kvm_intel
tdx=1`` takes a moment). The boot id must be readable, or nothing is reported.

While the server is unreachable or answers 5xx/429, calls are retried with capped exponential
backoff and jitter, forever (``--once``: not at all). A refused token, an unknown host or a refused
report stop the agent (``AgentError``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx

from service.agent.attestation import DEFAULT_QGS_SOCKET
from service.agent.identity import Look, boot_id_refusal, look
from service.agent.kernel_log import Position
from service.agent.kvm_intel import Phase
from service.agent.load_facts import read_load_facts
from service.agent.observations import Observations, observe
from service.agent.opt_in import tdx_configured
from service.agent.probe import read_log
from service.agent.state import LoadRecord, StateError, StateStore
from service.agent.vmm import AUTO, VmmProbe
from service.client import (
    ApiError,
    ConnectionFailed,
    Forbidden,
    HeartbeatObservations,
    NotFound,
    ServerError,
    TdxClient,
    Unauthorized,
)

T = TypeVar("T")
log = logging.getLogger("tdx.agent")

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
SETTLE_POLL_S = 1.0
DEFAULT_SETTLE_S = 30.0
# The server no longer takes the load we remembered as the current one: someone reported a newer
# load for this host, or the remembered one was recorded with other facts. Ours is a new load then.
_SUPERSEDED = frozenset({"stale_load", "load_facts_immutable", "load_id_conflict"})


class AgentError(Exception):
    """Stops the agent; the message is the one line the operator sees."""


def backoff_delay(attempt: int, rng: random.Random, base: float = BACKOFF_BASE_S, cap: float = BACKOFF_CAP_S) -> float:
    """Capped exponential backoff with jitter: within [d/2, d] for d = min(cap, base * 2**attempt)."""
    ceiling = min(cap, base * 2 ** min(attempt, 32))
    return rng.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    host: str
    root: Path
    kernel_log: str | None
    interval_s: float
    once: bool
    settle_s: float = DEFAULT_SETTLE_S
    # The quote generation service's socket (under root); None: attestation not checked.
    qgs_socket: str | None = DEFAULT_QGS_SOCKET
    # Where to read the VMM's TDX support (vmm.py): "auto" finds qemu/virsh; None: not looked at.
    qemu: str | None = AUTO
    virsh: str | None = AUTO
    domcapabilities: str | None = None


def _observations(observed: Observations) -> HeartbeatObservations:
    fields: HeartbeatObservations = {
        "module_version": observed.module_version, "module_healthy": observed.module_healthy,
        "tdx_configured": observed.tdx_configured, "attestation_ready": observed.attestation_ready,
    }
    if observed.vmm is not None:
        fields["vmm_tdx"] = observed.vmm.tdx
        fields["vmm_detail"] = observed.vmm.detail[:255]
    return fields


class Agent:
    def __init__(
        self,
        client: TdxClient,
        config: AgentConfig,
        store: StateStore,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.config = config
        self.store = store
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self.record: LoadRecord | None = None
        # self.record was made by this process and the server has not taken it yet: a conflict on it
        # is not about a remembered load the server has moved past.
        self._minted = False
        self._reported = False  # the server took self.record as the host's current load
        self._last_refusal: str | None = None
        self._absent_since: float | None = None  # kvm_intel went away at this clock reading
        self._said: set[str] = set()
        self._vmm = VmmProbe(config.root, config.qemu, config.virsh, config.domcapabilities)

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        self.record = self._start()
        self._reported = self._report()
        if self._reported:
            self._heartbeat()
        if self.config.once:
            return
        while True:
            self._sleep(self.config.interval_s)
            self.tick()

    def tick(self) -> None:
        now = look(self.config.root)
        if now.boot_id is None:
            self._say_once(boot_id_refusal(self.config.root), logging.ERROR)
            return  # neither a report nor a heartbeat: a reboot could not be told from a reload
        if self._load_changed(now):
            self._new_record(now)
            self._reported = False
        if not self._reported:
            self._reported = self._report()
        if self._reported:
            self._heartbeat()

    def _say_once(self, message: str, level: int = logging.INFO) -> None:
        if message not in self._said:
            self._said.add(message)
            log.log(level, "%s", message)

    # --- the host --------------------------------------------------------------------------------

    def _settled_look(self) -> Look:
        """The host once kvm_intel has settled: live, or absent for ``settle_s`` seconds."""
        deadline = self._clock() + self.config.settle_s
        while True:
            now = look(self.config.root)
            if now.boot_id is None:
                raise AgentError(boot_id_refusal(self.config.root))
            if now.kvm.live or (now.kvm.phase is Phase.ABSENT and self._clock() >= deadline):
                return now
            if now.kvm.phase is Phase.ABSENT:
                self._say_once(f"kvm_intel is not loaded; waiting up to {self.config.settle_s:g} s for it")
            else:
                self._say_once(f"kvm_intel is {'loading' if now.kvm.phase is Phase.LOADING else 'unloading'}; "
                               "waiting for it to settle")
            self._sleep(SETTLE_POLL_S)

    def _load_changed(self, now: Look) -> bool:
        assert self.record is not None and now.boot_id is not None
        if not now.settled:
            return False  # mid-load or mid-unload: look again next time
        if now.kvm.phase is Phase.ABSENT and self.record.instance is not None and now.boot_id == self.record.boot_id:
            if self._absent_since is None:
                self._absent_since = self._clock()
            if self._clock() - self._absent_since < self.config.settle_s:
                return False  # perhaps a reload under way: give it the settle window
        else:
            self._absent_since = None
        if self.record.same_load(self.config.host, now.boot_id, now.kvm.instance):
            return False
        if now.boot_id != self.record.boot_id:
            what = "the host rebooted"
        elif now.kvm.instance is None:
            what = "kvm_intel was unloaded"
        else:
            what = "kvm_intel was loaded again"
        log.info("%s: reporting a new load", what)
        return True

    def _start(self) -> LoadRecord:
        """The stored record when it describes the load the host is in now (an agent restart), else a new one."""
        now = self._settled_look()
        assert now.boot_id is not None
        stored = self.store.load()
        if stored is not None and stored.same_load(self.config.host, now.boot_id, now.kvm.instance):
            self._minted = False
            if stored.legacy:
                stored = stored.adopted(now.kvm.instance)
                self._write(stored)
            return stored
        since = stored.log_mark if stored is not None and stored.boot_id == now.boot_id else None
        return self._mint(now, since)

    def _new_record(self, now: Look) -> LoadRecord:
        assert self.record is not None
        since = self.record.log_mark if self.record.boot_id == now.boot_id else None
        self.record = self._mint(now, since)
        return self.record

    def _mint(self, now: Look, since: Position | None) -> LoadRecord:
        """Read this load's facts, once: they are its report for as long as it lasts."""
        assert now.boot_id is not None
        root = self.config.root
        kernel_log = read_log(root, self.config.kernel_log)
        facts = read_load_facts(root, now.boot_id, now.kvm, kernel_log, since, tdx_configured(root))
        record = LoadRecord.mint(self.config.host, now.kvm.instance, facts, kernel_log.end or since)
        self._write(record)
        self._minted = True
        return record

    def _write(self, record: LoadRecord) -> None:
        # Saved before it is sent: if the agent dies after the server took it, the retry is a replay.
        try:
            self.store.save(record)
        except StateError as exc:
            raise AgentError(str(exc)) from exc

    # --- the server ------------------------------------------------------------------------------

    def _report(self) -> bool:
        """Send the load report; True once the server holds it as the current load."""
        assert self.record is not None
        while True:  # at most twice: a superseded remembered load is replaced by a fresh one, once
            record = self.record
            try:
                receipt = self._call("load report", partial(self.client.submit_load, self.config.host, record.report))
            except ApiError as exc:
                if exc.code in _SUPERSEDED and not self._minted:
                    log.info("the server has moved past load %s (%s): reporting a new load", record.load_id, exc.code)
                    now = look(self.config.root)
                    if now.boot_id is None:
                        raise AgentError(boot_id_refusal(self.config.root)) from exc
                    self._new_record(now)
                    continue
                if exc.code == "reload_with_active_vms" and not self.config.once:
                    self._refused(f"load {record.load_id} refused: {exc.detail}; retrying every interval")
                    return False
                raise AgentError(f"the server refused load {record.load_id}: {exc.status} {exc.code}: {exc.detail}") \
                    from exc
            tdx = receipt.host["tdx"]
            reason = f" ({tdx['reason']})" if tdx.get("reason") else ""
            if receipt.created:
                log.info("load %s reported: TDX %s%s", record.load_id, tdx["state"], reason)
            else:
                log.info("load %s was already recorded: TDX %s%s", record.load_id, tdx["state"], reason)
            self._minted = False
            self._last_refusal = None
            return True

    def _refused(self, message: str) -> None:
        if message != self._last_refusal:
            log.error("%s", message)
        self._last_refusal = message

    def _heartbeat(self) -> None:
        assert self.record is not None
        observed = observe(self.config.root, self.config.qgs_socket, self._vmm)
        for _ in range(2):
            record = self.record
            vms = self._call("list running VMs", partial(self.client.host_vms, self.config.host, status="running"))
            running = [vm["id"] for vm in vms]
            try:
                beat = partial(
                    self.client.heartbeat, self.config.host, record.load_id, observed.keyids_in_use, running,
                    **_observations(observed),
                )
                self._call("heartbeat", beat)
                return
            except ApiError as exc:
                if exc.code != "stale_load":
                    raise AgentError(f"the server refused a heartbeat: {exc.status} {exc.code}: {exc.detail}") \
                        from exc
            log.warning("heartbeat for load %s answered stale_load: reporting the load again", record.load_id)
            self._reported = self._report()
            if not self._reported:
                return

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried with backoff while the server is unavailable; stops on auth and host errors."""
        attempt = 0
        while True:
            try:
                result = fn()
            except (ConnectionFailed, ServerError, httpx.TransportError) as exc:
                if self.config.once:
                    raise AgentError(f"{what} failed: the server at {self.client.server} is unavailable: {exc}") \
                        from exc
                delay = backoff_delay(attempt, self._rng)
                if attempt == 0:
                    log.warning("%s: the server is unavailable (%s); retrying with backoff", what, exc)
                attempt += 1
                self._sleep(delay)
                continue
            except (Unauthorized, Forbidden) as exc:
                raise AgentError(
                    f"the server refused the agent's token for host {self.config.host!r} "
                    f"({exc.status} {exc.code}): {exc.detail}"
                ) from exc
            except NotFound as exc:
                raise AgentError(f"{what}: {exc.detail} (register the host first: POST /v1/hosts)") from exc
            except ApiError as exc:
                if exc.status != 429:
                    raise
                delay = backoff_delay(attempt, self._rng)
                attempt += 1
                self._sleep(delay)
                continue
            if attempt:
                log.info("%s: the server is reachable again", what)
            return result
