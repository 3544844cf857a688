"""The kernel log: prefixes stripped with positions kept, completeness told, the lines of the current
load picked, read without blocking."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.agent.kernel_log import (
    COMPLETE,
    MAX_ERROR_CHARS,
    ROTATED,
    UNREADABLE,
    LogLine,
    Position,
    from_lines,
    parse_line,
    read_kernel_log,
    read_nonblocking,
    tdx_bringup_seen,
    tdx_errors,
)

FAILED = "virt/tdx: module initialization failed (-5)"
BANNER = "5,0,0,-;Linux version 6.16.0-tdx (build@builder) #1 SMP PREEMPT_DYNAMIC"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (f"3,817,1551081,-;{FAILED}", LogLine(3, FAILED, Position(817, 1551081))),
        (f"11,5,100,c;{FAILED}", LogLine(3, FAILED, Position(5, 100))),  # facility bits above the level
        (f"<3>[   12.880210] {FAILED}", LogLine(3, FAILED, Position(None, 12880210))),
        (f"[   12.880210] {FAILED}", LogLine(None, FAILED, Position(None, 12880210))),
        (f"[Tue Nov 25 02:36:00 2025] {FAILED}", LogLine(None, FAILED)),
        (f"kern  :err   : [   12.880210] {FAILED}", LogLine(3, FAILED, Position(None, 12880210))),
        (f"Nov 25 02:36:00 node7 kernel: {FAILED}", LogLine(None, FAILED)),
        (FAILED, LogLine(None, FAILED)),
        (" SUBSYSTEM=cpu", None),  # a kmsg continuation line
        ("", None),
    ],
)
def test_parse_line_strips_kmsg_dmesg_and_journal_prefixes(line: str, expected: LogLine | None) -> None:
    assert parse_line(line) == expected


@pytest.mark.parametrize(
    ("lines", "status"),
    [
        ([BANNER, f"3,1,5,-;{FAILED}"], COMPLETE),
        (["[    0.000000] Linux version 6.16.0-tdx", f"[   14.000000] {FAILED}"], COMPLETE),
        ([f"3,0,0,-;{FAILED}"], COMPLETE),  # sequence number 0: the boot's first record
        ([f"3,812,1524341,-;{FAILED}"], ROTATED),  # the ring buffer wrapped: the first records are gone
        ([f"[   14.000000] {FAILED}"], ROTATED),
        ([], ROTATED),  # readable, but none of this boot's records left
        (None, UNREADABLE),
    ],
)
def test_the_log_says_whether_it_still_starts_at_boot(lines: list[str] | None, status: str) -> None:
    assert from_lines(lines).status == status


def test_records_overwritten_while_reading_make_the_log_rotated() -> None:
    assert from_lines([BANNER], overwritten=True).status == ROTATED


BOOT_LINES = [
    BANNER,
    "6,1,118211,-;virt/tdx: BIOS enabled: private KeyID range [64, 128)",
    "6,2,118220,-;virt/tdx: Disable ACPI S3. Turn off TDX in the BIOS to use ACPI S3.",
    "6,3,14021000,-;virt/tdx: 263168 KB allocated for PAMT",
    "6,4,14021094,-;virt/tdx: module initialized",
    "3,5,15000000,-;kvm_intel: VMX not supported by CPU 3",  # not about TDX
    "3,6,20000000,-;kvm_intel: APICv is required for TDX",  # a load's refusal
    "3,7,21000000,-;kvm: something else failed with TDX",  # neither virt/tdx nor kvm_intel
    "3,8,22000000,-;virt/tdx: initialization failed: too few private KeyIDs available.",
    "3,9,23000000,-;virt/tdx: SEAMCALL (0x0000000000000022) failed: 0xc000050500000000",  # not catalogued
]


def test_errors_are_the_failure_lines_progress_lines_are_not() -> None:
    assert tdx_errors(from_lines(BOOT_LINES), None) == [
        "kvm_intel: APICv is required for TDX",
        "virt/tdx: initialization failed: too few private KeyIDs available.",
        "virt/tdx: SEAMCALL (0x0000000000000022) failed: 0xc000050500000000",
    ]


def test_a_load_counts_its_own_kvm_intel_lines_and_every_boot_line() -> None:
    log = from_lines(BOOT_LINES)
    # The previous load ended at record 6: its APICv refusal is not this load's.
    after = tdx_errors(log, Position(6, 20000000))
    assert after == [
        "virt/tdx: initialization failed: too few private KeyIDs available.",
        "virt/tdx: SEAMCALL (0x0000000000000022) failed: 0xc000050500000000",
    ]
    assert tdx_errors(log, Position(9, None)) == ["virt/tdx: initialization failed: too few private KeyIDs available."]
    assert tdx_bringup_seen(log, None) and not tdx_bringup_seen(log, Position(6, None))


def test_positions_compare_by_sequence_then_time() -> None:
    assert Position(3, 500).before(Position(4, 100)) is True
    assert Position(None, 500).before(Position(None, 600)) is True
    assert Position(3, None).before(Position(None, 600)) is None
    assert Position.from_json(Position(3, None).as_json()) == Position(3, None)
    assert Position.from_json({"seq": "x"}) is None and Position.from_json(None) is None


def test_the_log_end_is_the_newest_record() -> None:
    assert from_lines(BOOT_LINES).end == Position(9, 23000000)
    assert from_lines(["[ 1.5] a", "journal line without position"]).end == Position(None, 1500000)
    assert from_lines(None).end is None


def test_tdx_errors_are_deduplicated_bounded_and_truncated() -> None:
    lines = [f"3,{i},{i},-;{FAILED}" for i in range(5)]
    lines += [f"3,{i},{i},-;virt/tdx: failure number {i}" for i in range(100)]
    errors = tdx_errors(from_lines(lines), None, limit=10)
    assert errors[0] == FAILED
    assert len(errors) == 10 == len(set(errors))
    long = tdx_errors(from_lines(["3,1,1,-;virt/tdx: failed: " + "x" * 5000]), None)
    assert len(long[0]) == MAX_ERROR_CHARS


def test_a_message_is_kept_from_its_tag_on() -> None:
    assert tdx_errors(from_lines([f"<3>[ 1.0] some prefix {FAILED}"]), None) == [FAILED]


def test_read_regular_file(tmp_path: Path) -> None:
    log = tmp_path / "kmsg.log"
    log.write_bytes(b"6,0,0,-;hello\n3,2,2,-;" + FAILED.encode() + b"\n\xff broken utf-8\n")
    read = read_nonblocking(str(log))
    assert read is not None
    lines, overwritten = read
    assert lines[1].endswith(FAILED) and len(lines) == 3 and not overwritten


def test_missing_log_without_fallback_is_unreadable(tmp_path: Path) -> None:
    assert read_nonblocking(str(tmp_path / "nope")) is None
    log = read_kernel_log(str(tmp_path / "nope"), dmesg_fallback=False)
    assert (log.status, log.lines) == (UNREADABLE, ())


def test_reading_stops_when_no_more_records_are_there(tmp_path: Path) -> None:
    # A FIFO whose writer stays open behaves like /dev/kmsg at the end of the ring buffer: a
    # blocking read would wait forever; the non-blocking read gets EAGAIN and returns what it has.
    fifo = tmp_path / "kmsg"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)
    try:
        os.write(writer, f"{BANNER}\n3,1,1,-;{FAILED}\n".encode())
        log = read_kernel_log(str(fifo), dmesg_fallback=False)
    finally:
        os.close(writer)
    assert log.status == COMPLETE and tdx_errors(log, None) == [FAILED]


@pytest.mark.skipif(not os.access("/dev/kmsg", os.R_OK), reason="/dev/kmsg is not readable here")
def test_reading_the_real_dev_kmsg_returns() -> None:
    assert read_nonblocking("/dev/kmsg") is not None
