"""The kernel log: read it without blocking, and pick out the lines that say why TDX is not up.

Reading: ``/dev/kmsg`` (or any file) is opened with ``O_NONBLOCK`` and read record by record until
``EAGAIN`` (a character device) or end of file (a regular file, e.g. a test fixture). When it cannot
be opened (no such file, no permission: ``kernel.dmesg_restrict``), ``dmesg --raw`` is run instead if
the caller allows it. Whatever fails, the answer is an empty log, never an exception: the log only
explains a state that the sysfs facts already decide.

Lines may come as ``/dev/kmsg`` records (``6,1234,5678901,-;text``), raw dmesg (``<3>[ 1.23] text``),
plain dmesg (``[    1.234567] text``, ``[Tue Nov 25 02:36:00 2025] text``), decoded dmesg
(``kern  :err   : [ 1.2] text``) or journal lines (``Nov 25 02:36:00 host kernel: text``); the
prefixes are stripped and the message text is kept from its ``virt/tdx:`` or ``kvm_intel:`` tag on.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

# A kmsg record holds at most 8 KiB (CONSOLE_EXT_LOG_MAX); a smaller read buffer gets EINVAL.
_READ_CHUNK = 16384
_MAX_LOG_BYTES = 16 * 1024 * 1024
MAX_ERRORS = 16
MAX_ERROR_CHARS = 500

_KMSG = re.compile(r"^(\d+),\d+,\d+,[^;]*;")
_RAW_LEVEL = re.compile(r"^<(\d+)>")
_DECODED = re.compile(r"^[a-z]+\s*:\s*(emerg|alert|crit|err|warn|notice|info|debug)\s*:\s*")
_JOURNAL = re.compile(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \S+ kernel: ")
_TIMESTAMP = re.compile(r"^\[[^\]]*\]\s*")
_LEVELS = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warn": 4, "notice": 5, "info": 6, "debug": 7}

_TAG = re.compile(r"(?:^|\s)((?:virt/tdx|kvm_intel):\s)")
# Words with which the kernel's TDX code reports a failure or a missing requirement, e.g.
# "module initialization failed (-5)", "no TDX private KeyIDs available", "EPT is required for TDX",
# "tdx requires kvm.enable_virt_at_load=1", "initialization failed: too few private KeyIDs".
_FAILURE = re.compile(
    r"fail|error|\berr\b|requir|not (?:supported|available|loaded|enabled|initiali[sz]ed|present)"
    r"|unsupported|unavailable|disabled by|is disabled|disabling|unable|cannot|can't|too (?:few|many|small)"
    r"|\bno\b|invalid|missing|smaller than|insufficient|exceed|refus|abort|timed? ?out",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class LogLine:
    level: int | None  # syslog level 0 (emerg) .. 7 (debug), when the format carries it
    text: str


def parse_line(line: str) -> LogLine | None:
    """Strip the kmsg/dmesg/journal prefixes; ``None`` for kmsg continuation lines (`` KEY=value``)."""
    if not line.strip() or line.startswith((" ", "\t")):
        return None
    level: int | None = None
    rest = line.rstrip("\r\n")
    if (m := _KMSG.match(rest)) or (m := _RAW_LEVEL.match(rest)):
        level = int(m.group(1)) & 7
        rest = rest[m.end() :]
    elif m := _DECODED.match(rest):
        level = _LEVELS[m.group(1)]
        rest = rest[m.end() :]
    elif m := _JOURNAL.match(rest):
        rest = rest[m.end() :]
    if m := _TIMESTAMP.match(rest):
        rest = rest[m.end() :]
    return LogLine(level, rest.strip())


def tdx_error(line: LogLine) -> str | None:
    """The message, from its tag on, when the line reports a TDX failure or a missing requirement."""
    m = _TAG.search(line.text)
    if m is None:
        return None
    message = line.text[m.start(1) :].strip()
    if m.group(1).startswith("kvm_intel") and "tdx" not in message.lower():
        return None  # kvm_intel says many things; only its TDX lines explain a TDX state
    if _FAILURE.search(message) or (line.level is not None and line.level <= 3):
        return message[:MAX_ERROR_CHARS]
    return None


def tdx_errors(lines: Iterable[str], limit: int = MAX_ERRORS) -> list[str]:
    """The TDX failure messages in log order, without duplicates, at most ``limit``."""
    found: list[str] = []
    seen: set[str] = set()
    for raw in lines:
        parsed = parse_line(raw)
        if parsed is None:
            continue
        message = tdx_error(parsed)
        if message is None or message in seen:
            continue
        seen.add(message)
        found.append(message)
        if len(found) >= limit:
            break
    return found


def read_nonblocking(path: str) -> list[str] | None:
    """All records of a kmsg-like device or all lines of a file; ``None`` when it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    chunks: list[bytes] = []
    total = 0
    try:
        while total < _MAX_LOG_BYTES:
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                break  # EAGAIN: no more records in the kernel's ring buffer
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    continue  # records were overwritten while we read; the next read goes on
                break
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", errors="replace").splitlines()


def read_dmesg(timeout_s: float = 10.0) -> list[str]:
    """The running kernel's log through ``dmesg --raw`` (keeps the levels); empty when that fails."""
    try:
        done = subprocess.run(
            ["dmesg", "--raw"], capture_output=True, timeout=timeout_s, check=False, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode != 0:
        return []
    return done.stdout.decode("utf-8", errors="replace").splitlines()


def read_kernel_log(path: str, dmesg_fallback: bool) -> list[str]:
    lines = read_nonblocking(path)
    if lines is not None:
        return lines
    return read_dmesg() if dmesg_fallback else []
