"""The kernel log: read it without blocking, tell how much of this boot it still holds, and pick
out the TDX lines that belong to the current kvm_intel load.

Reading: ``/dev/kmsg`` (or any file) is opened with ``O_NONBLOCK`` and read record by record until
``EAGAIN`` (a character device) or end of file (a regular file, e.g. a test fixture). When it cannot
be opened (no such file, no permission: ``kernel.dmesg_restrict``), ``dmesg --raw`` is run instead if
the caller allows it. When both fail the log is ``unreadable`` (never an exception).

Lines may come as ``/dev/kmsg`` records (``6,1234,5678901,-;text``: level, sequence number,
microseconds since boot), raw dmesg (``<3>[ 1.23] text``), plain dmesg (``[    1.234567] text``),
decoded dmesg (``kern  :err   : [ 1.2] text``) or journal lines (``Nov 25 02:36:00 host kernel:
text``); the prefixes are stripped and the position (sequence number and/or time) kept.

Which lines count (DESIGN.md section 2): a ``virt/tdx`` line of the TDX host core stays true for
the rest of the boot; a ``kvm_intel`` TDX line counts only when it is newer than the previous load
the agent recorded (``since``). A log that no longer starts at the boot's first record (its ring
buffer wrapped) is ``rotated``.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from service.kernel_messages import Era, Scope, recognise, tagged

# A kmsg record holds at most 8 KiB (CONSOLE_EXT_LOG_MAX); a smaller read buffer gets EINVAL.
_READ_CHUNK = 16384
_MAX_LOG_BYTES = 16 * 1024 * 1024
MAX_ERRORS = 16
MAX_ERROR_CHARS = 500

COMPLETE = "complete"
ROTATED = "rotated"
UNREADABLE = "unreadable"

_KMSG = re.compile(r"^(\d+),(\d+),(\d+),[^;]*;")
_RAW_LEVEL = re.compile(r"^<(\d+)>")
_DECODED = re.compile(r"^[a-z]+\s*:\s*(emerg|alert|crit|err|warn|notice|info|debug)\s*:\s*")
_JOURNAL = re.compile(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \S+ kernel: ")
_TIMESTAMP = re.compile(r"^\[\s*(\d+)\.(\d{1,9})\]\s*")
_OTHER_TIMESTAMP = re.compile(r"^\[[^\]]*\]\s*")
_LEVELS = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warn": 4, "notice": 5, "info": 6, "debug": 7}
_BANNER = "Linux version "
# Words with which the kernel's TDX code reports a failure, for lines not (yet) in the catalogue.
_FAILURE = re.compile(
    r"fail|error|\berr\b|requir|not (?:supported|available|loaded|enabled|initiali[sz]ed|present)"
    r"|unsupported|unavailable|disabled by|is disabled|unable|cannot|can't|too (?:few|many|small)"
    r"|\bno\b|invalid|missing|smaller than|insufficient|exceed|refus|abort|timed? ?out",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Position:
    """Where a record is in this boot's log: its kmsg sequence number and/or its time since boot."""

    seq: int | None
    usec: int | None

    def before(self, other: Position) -> bool | None:
        """Whether this record came before ``other``; None when the two cannot be compared."""
        if self.seq is not None and other.seq is not None:
            return self.seq < other.seq
        if self.usec is not None and other.usec is not None:
            return self.usec < other.usec
        return None

    def as_json(self) -> dict[str, int | None]:
        return {"seq": self.seq, "usec": self.usec}

    @classmethod
    def from_json(cls, data: Any) -> Position | None:
        if not isinstance(data, dict):
            return None
        seq, usec = data.get("seq"), data.get("usec")
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (seq, usec)):
            return None
        return None if seq is None and usec is None else cls(seq, usec)


@dataclass(frozen=True, slots=True)
class LogLine:
    level: int | None  # syslog level 0 (emerg) .. 7 (debug), when the format carries it
    text: str
    position: Position = Position(None, None)


def parse_line(line: str) -> LogLine | None:
    """Strip the kmsg/dmesg/journal prefixes; ``None`` for kmsg continuation lines (`` KEY=value``)."""
    if not line.strip() or line.startswith((" ", "\t")):
        return None
    level: int | None = None
    seq: int | None = None
    usec: int | None = None
    rest = line.rstrip("\r\n")
    if m := _KMSG.match(rest):
        level, seq, usec = int(m.group(1)) & 7, int(m.group(2)), int(m.group(3))
        rest = rest[m.end() :]
    elif m := _RAW_LEVEL.match(rest):
        level = int(m.group(1)) & 7
        rest = rest[m.end() :]
    elif m := _DECODED.match(rest):
        level = _LEVELS[m.group(1)]
        rest = rest[m.end() :]
    elif m := _JOURNAL.match(rest):
        rest = rest[m.end() :]
    if m := _TIMESTAMP.match(rest):
        if usec is None:
            usec = int(m.group(1)) * 1_000_000 + int(m.group(2).ljust(6, "0")[:6])
        rest = rest[m.end() :]
    elif m := _OTHER_TIMESTAMP.match(rest):
        rest = rest[m.end() :]
    return LogLine(level, rest.strip(), Position(seq, usec))


@dataclass(frozen=True, slots=True)
class KernelLog:
    lines: tuple[LogLine, ...]
    status: str  # COMPLETE, ROTATED or UNREADABLE

    @property
    def end(self) -> Position | None:
        """The newest record's position: where the next load's records begin."""
        for line in reversed(self.lines):
            if line.position.seq is not None or line.position.usec is not None:
                return line.position
        return None

    def texts(self) -> list[str]:
        return [line.text for line in self.lines]


def _starts_at_boot(lines: list[LogLine]) -> bool:
    first = lines[0]
    if first.text.startswith(_BANNER):
        return True
    return first.position.seq == 0 or first.position.usec == 0


def from_lines(raw: Iterable[str] | None, *, overwritten: bool = False) -> KernelLog:
    """A log from its raw lines; ``None`` means it could not be read."""
    if raw is None:
        return KernelLog((), UNREADABLE)
    lines = [parsed for r in raw if (parsed := parse_line(r)) is not None]
    complete = bool(lines) and not overwritten and _starts_at_boot(lines)
    return KernelLog(tuple(lines), COMPLETE if complete else ROTATED)


def _in_window(line: LogLine, since: Position | None) -> bool:
    if since is None:
        return True
    before = since.before(line.position)
    return True if before is None else before


def _unknown_failure(line: LogLine) -> str | None:
    """A TDX line that is not in the catalogue but reads like a failure (a newer kernel's wording)."""
    message = tagged(line.text)
    if message is None:
        return None
    if message.startswith("kvm_intel") and "tdx" not in message.lower():
        return None  # kvm_intel says many things; only its TDX lines explain a TDX state
    if _FAILURE.search(message) or (line.level is not None and line.level <= 3):
        return message[:MAX_ERROR_CHARS]
    return None


def tdx_errors(log: KernelLog, since: Position | None, limit: int = MAX_ERRORS) -> list[str]:
    """The kernel's TDX failure lines that explain the current load, in log order, without duplicates.

    A catalogued ``boot`` line counts wherever it is in this boot's log; a ``load`` line, and any
    TDX failure line the catalogue does not know, only after ``since`` (the previous load's end).
    """
    found: list[str] = []
    seen: set[str] = set()
    for line in log.lines:
        known = recognise(line.text)
        if known is not None:
            if known.code is None or (known.message.scope is Scope.LOAD and not _in_window(line, since)):
                continue
            message: str | None = known.text[:MAX_ERROR_CHARS]
        elif _in_window(line, since):
            message = _unknown_failure(line)
        else:
            continue
        if message is None or message in seen:
            continue
        seen.add(message)
        found.append(message)
        if len(found) >= limit:
            break
    return found


def _tdx_bringup(line: LogLine) -> bool:
    """A line only a kvm_intel load with tdx=1 prints: KVM's TDX bring-up, or (6.16-7.0) the TDX
    module initialization it runs."""
    known = recognise(line.text)
    if known is None:
        return False
    return known.message.scope is Scope.LOAD or known.message.eras == (Era.LOAD_TIME,)


def tdx_bringup_seen(log: KernelLog, since: Position | None) -> bool:
    """Whether this load's records show that it was asked for tdx=1."""
    return any(_tdx_bringup(line) and _in_window(line, since) for line in log.lines)


def silent_refusal_possible(log: KernelLog) -> bool:
    """Whether a kvm_intel load with tdx=1 could have come up with tdx=N without a line of its own:
    on 6.16-7.0 ``module not loaded`` is printed once per boot, later loads fail silently."""
    for line in log.lines:
        known = recognise(line.text)
        if known is not None and known.code == "tdx_module_not_loaded":
            return True
    return False


# --- reading -------------------------------------------------------------------------------------


def read_nonblocking(path: str) -> tuple[list[str], bool] | None:
    """All records of a kmsg-like device or all lines of a file, and whether records were
    overwritten while reading; ``None`` when it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    chunks: list[bytes] = []
    total = 0
    overwritten = False
    try:
        while total < _MAX_LOG_BYTES:
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                break  # EAGAIN: no more records in the kernel's ring buffer
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    overwritten = True
                    continue  # records were overwritten while we read; the next read goes on
                break
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", errors="replace").splitlines(), overwritten


def read_dmesg(timeout_s: float = 10.0) -> list[str] | None:
    """The running kernel's log through ``dmesg --raw`` (keeps the levels); None when that fails."""
    try:
        done = subprocess.run(
            ["dmesg", "--raw"], capture_output=True, timeout=timeout_s, check=False, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.decode("utf-8", errors="replace").splitlines()


def read_kernel_log(path: str, dmesg_fallback: bool) -> KernelLog:
    read = read_nonblocking(path)
    if read is not None:
        lines, overwritten = read
        return from_lines(lines, overwritten=overwritten)
    return from_lines(read_dmesg() if dmesg_fallback else None)
