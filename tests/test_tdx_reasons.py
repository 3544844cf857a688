"""The reason codes (service/tdx_reasons.py), the kernel lines behind them (service/kernel_messages.py)
and the README's tables agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.kernel_messages import BOTH, MESSAGES, Era, Scope, keyid_range, recognise
from service.tdx_reasons import PRIORITY, REASONS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _table(heading: str) -> list[list[str]]:
    """The rows of the first Markdown table after ``heading``, cells stripped."""
    after = README[README.index(heading):]
    rows: list[list[str]] = []
    for line in after.splitlines()[1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
        elif rows:
            break
    return rows[2:]  # without the header and the separator


def test_the_readme_lists_every_reason_code_with_its_state_and_remedy() -> None:
    rows = _table("### Reason codes")
    listed = {row[0].strip("`"): row for row in rows}
    assert list(listed) == list(REASONS)  # same codes, same order (the first listed wins)
    for code, row in listed.items():
        reason = REASONS[code]
        assert row[1] == f"`{reason.state}`", code
        assert row[2].startswith(reason.summary), code
        assert row[3] == reason.remedy, code
        assert row[4] == ("yes" if reason.reboot else "no"), code


def test_the_readme_derivation_table_names_only_known_codes() -> None:
    for row in _table("## TDX state derivation"):
        for code in re.findall(r"`([a-z_]+)`", row[3]):
            assert code in REASONS, code


def test_every_message_code_is_a_reason() -> None:
    for message in MESSAGES:
        for code in (message.code, *message.by_errno.values()):
            assert code is None or code in REASONS, message.fmt
    assert set(PRIORITY) == set(REASONS)


def test_every_reason_has_a_remedy_and_a_state() -> None:
    for reason in REASONS.values():
        assert reason.state in ("unsupported", "disabled", "failed")
        assert reason.summary and reason.remedy.endswith(".")


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.fmt[:40])
def test_each_message_is_recognised_as_itself_behind_any_log_prefix(message: object) -> None:
    from service.kernel_messages import Message

    assert isinstance(message, Message)
    line = message.render(*([5] * message.fmt.count("%")))
    for prefix in ("", "6,12,34,-;", "<3>[   1.000000] ", "[    1.000000] ", "Nov 25 02:36:00 h kernel: "):
        known = recognise(prefix + line)
        assert known is not None and known.message is message and known.text == line


def test_errno_picks_the_precise_code() -> None:
    pamt = recognise("virt/tdx: module initialization failed (-12)")
    other = recognise("virt/tdx: module initialization failed (-5)")
    assert pamt is not None and other is not None
    assert (pamt.code, other.code) == ("pamt_alloc_failed", "tdx_module_init_failed")


def test_lines_that_look_alike_but_are_not_upstream_are_not_recognised() -> None:
    for line in (
        "kvm_intel: tdx: TDX module initialization failed, disabling TDX",  # never existed upstream
        "virt/tdx: module initialization failed",  # no errno
        "kvm_intel: EPT is required for TDX, really",
        "virt/tdx: module initialized (again)",
    ):
        assert recognise(line) is None, line


def test_scopes_and_eras() -> None:
    # The TDX host core's lines are boot facts; KVM's are facts of one kvm_intel load.
    for message in MESSAGES:
        assert (message.scope is Scope.BOOT) == (message.tag == "virt/tdx")
        assert message.eras and set(message.eras) <= set(BOTH)
    by_fmt = {m.fmt: m for m in MESSAGES if m.tag == "virt/tdx"}
    assert by_fmt["module initialized"].eras == (Era.LOAD_TIME,)
    assert by_fmt["TDX-Module initialized"].eras == (Era.BOOT_TIME,)


def test_keyid_range() -> None:
    assert keyid_range("virt/tdx: BIOS enabled: private KeyID range [64, 128)") == (64, 128)
    assert keyid_range("virt/tdx: BIOS enabled: private KeyID range [64, 64)") is None
    assert keyid_range("virt/tdx: module initialized") is None
