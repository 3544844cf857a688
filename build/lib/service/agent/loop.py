"""The agent's loop: report the kvm_intel load, then heartbeat; report again when the load changes.

A new load is reported on start (unless the state dir says it is the load already reported: an
agent restart), when the boot_id changes, and when kvm_intel's load fingerprint changes (the module
disappeared, reappeared, or was reloaded between two looks). While the server is unreachable or
answers 5xx/429, calls are retried with capped exponential backoff and jitter, forever (``--once``:
not at all). A refused token, an unknown host or a refused report stop the agent (``AgentError``).
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

from service.agent.probe import HostFacts, kvm_intel_instance, kvm_intel_settling, probe
from service.agent.state import LoadRecord, StateError, StateStore, fingerprint
from service.client import ApiError, ConnectionFailed, Forbidden, NotFound, ServerError, TdxClient, Unauthorized

T = TypeVar("T")
log = logging.getLogger("tdx.agent")

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
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


class Agent:
    def __init__(
        self,
        client: TdxClient,
        config: AgentConfig,
        store: StateStore,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.config = config
        self.store = store
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.record: LoadRecord | None = None
        # self.record was made by this process and the server has not taken it yet: a conflict on it
        # is not about a remembered load the server has moved past.
        self._minted = False
        self._reported = False  # the server took self.record as the host's current load
        self._last_refusal: str | None = None

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        self.record = self._current_record()
        self._reported = self._report()
        if self._reported:
            self._heartbeat(self._look().keyids_in_use)
        if self.config.once:
            return
        while True:
            self._sleep(self.config.interval_s)
            self.tick()

    def tick(self) -> None:
        facts = self._look()
        if self._load_changed(facts):
            self._new_record()
            self._reported = False
        if not self._reported:
            self._reported = self._report()
        if self._reported:
            self._heartbeat(facts.keyids_in_use)

    # --- the host --------------------------------------------------------------------------------

    def _look(self) -> HostFacts:
        return probe(self.config.root, read_log=False)

    def _load_changed(self, facts: HostFacts) -> bool:
        assert self.record is not None
        if kvm_intel_settling(self.config.root):
            return False  # mid-load or mid-unload: look again next time
        print_ = fingerprint(facts, kvm_intel_instance(self.config.root))
        if self.record.same_load(self.config.host, facts.boot_id, print_):
            return False
        what = "the host rebooted" if facts.boot_id != self.record.boot_id else "kvm_intel was loaded again"
        log.info("%s: reporting a new load", what)
        return True

    def _current_record(self) -> LoadRecord:
        """The stored record when it describes the load the host is in now (an agent restart), else a new one."""
        facts = probe(self.config.root, self.config.kernel_log)
        instance = kvm_intel_instance(self.config.root)
        stored = self.store.load()
        if stored is not None and stored.same_load(self.config.host, facts.boot_id, fingerprint(facts, instance)):
            self._minted = False
            return stored
        return self._save(LoadRecord.mint(self.config.host, facts, instance))

    def _new_record(self) -> LoadRecord:
        facts = probe(self.config.root, self.config.kernel_log)
        self.record = self._save(LoadRecord.mint(self.config.host, facts, kvm_intel_instance(self.config.root)))
        return self.record

    def _save(self, record: LoadRecord) -> LoadRecord:
        # Saved before it is sent: if the agent dies after the server took it, the retry is a replay.
        try:
            self.store.save(record)
        except StateError as exc:
            raise AgentError(str(exc)) from exc
        self._minted = True
        return record

    # --- the server ------------------------------------------------------------------------------

    def _report(self) -> bool:
        """Send the load report; True once the server holds it as the current load."""
        assert self.record is not None
        while True:  # at most twice: a superseded remembered load is replaced by a fresh one, once
            record = self.record
            try:
                host = self._call("load report", partial(self.client.report_load, self.config.host, record.report))
            except ApiError as exc:
                if exc.code in _SUPERSEDED and not self._minted:
                    log.info("the server has moved past load %s (%s): reporting a new load", record.load_id, exc.code)
                    self._new_record()
                    continue
                if exc.code == "reload_with_active_vms" and not self.config.once:
                    self._refused(f"load {record.load_id} refused: {exc.detail}; retrying every interval")
                    return False
                raise AgentError(f"the server refused load {record.load_id}: {exc.status} {exc.code}: {exc.detail}") \
                    from exc
            tdx = host["tdx"]
            reason = f" ({tdx['reason']})" if tdx.get("reason") else ""
            log.info("load %s reported: TDX %s%s", record.load_id, tdx["state"], reason)
            self._minted = False
            self._last_refusal = None
            return True

    def _refused(self, message: str) -> None:
        if message != self._last_refusal:
            log.error("%s", message)
        self._last_refusal = message

    def _heartbeat(self, keyids_in_use: int) -> None:
        assert self.record is not None
        for _ in range(2):
            record = self.record
            vms = self._call("list running VMs", partial(self.client.host_vms, self.config.host, status="running"))
            running = [vm["id"] for vm in vms]
            try:
                beat = partial(self.client.heartbeat, self.config.host, record.load_id, keyids_in_use, running)
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
