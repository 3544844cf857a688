"""What the agent keeps across its own restarts: the load it last reported, in ``<state-dir>/load.json``.

A kvm_intel load is identified by the boot (``boot_id``) and a fingerprint of the load: the facts
that only a new module load can change (not the kernel log, whose ring buffer wraps, nor capacity,
which hotplug changes) plus the identity of the module's sysfs directory. When the agent restarts
and finds the same boot and fingerprint, it is the same load: it re-sends the stored ``load_id``
with the stored facts, which the server answers as a replay.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.agent.probe import HostFacts

STATE_FILE = "load.json"
FORMAT = 1
_LOAD_FACTS = (
    "kernel",
    "kvm_intel_loaded",
    "tdx_platform",
    "tdx_requested",
    "tdx_effective",
    "keyids_total",
    "module_version",
)


class StateError(Exception):
    """The state directory cannot be written."""


def fingerprint(facts: HostFacts, instance: str | None) -> str:
    data = {name: getattr(facts, name) for name in _LOAD_FACTS}
    data["kvm_intel_instance"] = instance
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class LoadRecord:
    host: str
    load_id: str
    boot_id: str
    fingerprint: str
    report: dict[str, Any]  # the load-report body, exactly as sent

    @classmethod
    def mint(cls, host: str, facts: HostFacts, instance: str | None) -> LoadRecord:
        load_id = str(uuid.uuid4())
        return cls(host, load_id, facts.boot_id, fingerprint(facts, instance), facts.load_report(load_id))

    def same_load(self, host: str, boot_id: str, print_: str) -> bool:
        return self.host == host and self.boot_id == boot_id and self.fingerprint == print_


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE

    def load(self) -> LoadRecord | None:
        """The stored record; ``None`` when there is none or it cannot be read (then a new load is made)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                return None
            report = data["report"]
            record = LoadRecord(
                host=str(data["host"]),
                load_id=str(data["load_id"]),
                boot_id=str(data["boot_id"]),
                fingerprint=str(data["fingerprint"]),
                report=dict(report),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return record if record.report.get("load_id") == record.load_id else None

    def save(self, record: LoadRecord) -> None:
        """Write atomically (temp file, fsync, rename), so a crash leaves the old or the new record."""
        payload = json.dumps({"format": FORMAT, **asdict(record)}, indent=2, sort_keys=True)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".load-", suffix=".tmp", dir=self.directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise StateError(f"cannot write the agent state in {self.directory}: {exc.strerror or exc}") from exc
