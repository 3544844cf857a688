"""What the agent keeps across its own restarts: the load it last reported, in ``<state-dir>/load.json``.

A load is the boot (``boot_id``) plus the kvm_intel module instance (identity.py), and its report
is the facts read when the agent first saw it (load_facts.py). When the agent restarts and finds the
same boot and instance, it is the same load: it re-sends the stored report as it was, which the
server answers as a replay, whatever was edited in modprobe.d or appeared in sysfs meanwhile. The
record also keeps where the kernel log ended when the load was recorded: the next load on this boot
counts only kernel-log records after it.

Format 1 (older agents) kept a hash of facts instead of the instance: such a record is taken as the
current load when the boot is the same and kvm_intel is still (or still not) loaded, and rewritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from service.agent.kernel_log import Position
from service.agent.load_facts import LoadFacts

STATE_FILE = "load.json"
FORMAT = 2


class StateError(Exception):
    """The state directory cannot be written."""


@dataclass(frozen=True, slots=True)
class LoadRecord:
    host: str
    load_id: str
    boot_id: str
    instance: str | None  # the kvm_intel sysfs directory instance; None: kvm_intel was not loaded
    report: dict[str, Any]  # the load-report body, exactly as sent
    log_mark: Position | None  # the newest kernel-log record when the load was recorded
    legacy: bool = False  # read from a format-1 record: the instance is not known

    @classmethod
    def mint(cls, host: str, instance: str | None, facts: LoadFacts, log_mark: Position | None) -> LoadRecord:
        load_id = str(uuid.uuid4())
        return cls(host, load_id, facts.boot_id, instance, facts.report(load_id), log_mark)

    def same_load(self, host: str, boot_id: str, instance: str | None) -> bool:
        if self.host != host or self.boot_id != boot_id:
            return False
        if self.legacy:
            return bool(self.report.get("kvm_intel_loaded")) == (instance is not None)
        return self.instance == instance

    def adopted(self, instance: str | None) -> LoadRecord:
        """This (format-1) record with the instance it was found to describe."""
        return replace(self, instance=instance, legacy=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "host": self.host,
            "load_id": self.load_id,
            "boot_id": self.boot_id,
            "kvm_intel_instance": self.instance,
            "log_mark": self.log_mark.as_json() if self.log_mark else None,
            "report": self.report,
        }


def _parse(data: Any) -> LoadRecord | None:
    if not isinstance(data, dict):
        return None
    fmt = data.get("format")
    if fmt not in (1, FORMAT):
        return None
    instance = data.get("kvm_intel_instance")
    if instance is not None and not isinstance(instance, str):
        return None
    record = LoadRecord(
        host=str(data["host"]),
        load_id=str(data["load_id"]),
        boot_id=str(data["boot_id"]),
        instance=instance,
        report=dict(data["report"]),
        log_mark=Position.from_json(data.get("log_mark")),
        legacy=fmt == 1,
    )
    return record if record.report.get("load_id") == record.load_id else None


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE

    def load(self) -> LoadRecord | None:
        """The stored record; ``None`` when there is none or it cannot be read (then a new load is made)."""
        try:
            return _parse(json.loads(self.path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def save(self, record: LoadRecord) -> None:
        """Write atomically (temp file, fsync, rename), so a crash leaves the old or the new record."""
        payload = json.dumps(record.as_json(), indent=2, sort_keys=True)
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
