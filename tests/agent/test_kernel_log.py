"""The kernel log: prefixes stripped, TDX failures picked, read without blocking."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.agent.kernel_log import (
    MAX_ERROR_CHARS,
    LogLine,
    parse_line,
    read_kernel_log,
    read_nonblocking,
    tdx_errors,
)

FAILED = "virt/tdx: module initialization failed (-5)"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (f"3,817,1551081,-;{FAILED}", LogLine(3, FAILED)),
        (f"11,5,100,c;{FAILED}", LogLine(3, FAILED)),  # facility bits above the level
        (f"<3>[   12.880210] {FAILED}", LogLine(3, FAILED)),
        (f"[   12.880210] {FAILED}", LogLine(None, FAILED)),
        (f"[Tue Nov 25 02:36:00 2025] {FAILED}", LogLine(None, FAILED)),
        (f"kern  :err   : [   12.880210] {FAILED}", LogLine(3, FAILED)),
        (f"Nov 25 02:36:00 node7 kernel: {FAILED}", LogLine(None, FAILED)),
        (FAILED, LogLine(None, FAILED)),
        (" SUBSYSTEM=cpu", None),  # a kmsg continuation line
        ("", None),
    ],
)
def test_parse_line_strips_kmsg_dmesg_and_journal_prefixes(line: str, expected: LogLine | None) -> None:
    assert parse_line(line) == expected


def test_tdx_errors_keep_failures_and_missing_requirements_only() -> None:
    log = [
        "6,1,1,-;virt/tdx: BIOS enabled: private KeyID range [64, 128)",
        "6,2,2,-;virt/tdx: Disable ACPI S3. Turn off TDX in the BIOS to use ACPI S3.",
        "6,3,3,-;virt/tdx: 1050644 KB allocated for PAMT",
        "6,4,4,-;virt/tdx: module initialized",
        "4,5,5,-;kvm_intel: L1TF CPU bug present and SMT on, data leak possible.",  # not about TDX
        "3,6,6,-;kvm_intel: VMX not supported by CPU 3",  # not about TDX
        "3,7,7,-;kvm_intel: tdx: no TDX private KeyIDs available",
        "3,8,8,-;kvm_intel: EPT is required for TDX",
        "3,9,9,-;kvm_intel: tdx: tdx requires kvm.enable_virt_at_load=1",
        f"3,10,10,-;{FAILED}",
        "3,11,11,-;kvm: something else failed with TDX",  # neither virt/tdx nor kvm_intel
        "[   13.1] virt/tdx: initialization failed: too few private KeyIDs available.",
        "3,12,12,-;virt/tdx: SEAMCALL (0x21) returned 0xc0000c0200000000",  # an err-level line says so itself
    ]
    assert tdx_errors(log) == [
        "kvm_intel: tdx: no TDX private KeyIDs available",
        "kvm_intel: EPT is required for TDX",
        "kvm_intel: tdx: tdx requires kvm.enable_virt_at_load=1",
        FAILED,
        "virt/tdx: initialization failed: too few private KeyIDs available.",
        "virt/tdx: SEAMCALL (0x21) returned 0xc0000c0200000000",
    ]


def test_tdx_errors_are_deduplicated_bounded_and_truncated() -> None:
    log = [f"3,{i},{i},-;{FAILED}" for i in range(5)]
    log += [f"3,{i},{i},-;virt/tdx: failure number {i}" for i in range(100)]
    log.append("3,1,1,-;virt/tdx: failed: " + "x" * 5000)
    errors = tdx_errors(log, limit=10)
    assert errors[0] == FAILED
    assert len(errors) == 10 == len(set(errors))
    long = tdx_errors(["3,1,1,-;virt/tdx: failed: " + "x" * 5000])
    assert len(long[0]) == MAX_ERROR_CHARS


def test_a_message_is_kept_from_its_tag_on() -> None:
    assert tdx_errors(["<3>[ 1.0] some prefix virt/tdx: module initialization failed (-5)"]) == [FAILED]


def test_read_regular_file(tmp_path: Path) -> None:
    log = tmp_path / "kmsg.log"
    log.write_bytes(b"6,1,1,-;hello\n3,2,2,-;" + FAILED.encode() + b"\n\xff broken utf-8\n")
    lines = read_nonblocking(str(log))
    assert lines is not None and lines[1].endswith(FAILED) and len(lines) == 3


def test_missing_log_without_fallback_is_empty(tmp_path: Path) -> None:
    assert read_nonblocking(str(tmp_path / "nope")) is None
    assert read_kernel_log(str(tmp_path / "nope"), dmesg_fallback=False) == []


def test_reading_stops_when_no_more_records_are_there(tmp_path: Path) -> None:
    # A FIFO whose writer stays open behaves like /dev/kmsg at the end of the ring buffer: a
    # blocking read would wait forever; the non-blocking read gets EAGAIN and returns what it has.
    fifo = tmp_path / "kmsg"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)
    try:
        os.write(writer, f"3,1,1,-;{FAILED}\n".encode())
        lines = read_nonblocking(str(fifo))
    finally:
        os.close(writer)
    assert lines is not None and tdx_errors(lines) == [FAILED]


@pytest.mark.skipif(not os.access("/dev/kmsg", os.R_OK), reason="/dev/kmsg is not readable here")
def test_reading_the_real_dev_kmsg_returns() -> None:
    lines = read_nonblocking("/dev/kmsg")
    assert lines is not None
