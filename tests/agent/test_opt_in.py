"""What the kernel command line and modprobe.d ask for the next kvm_intel load (agent/opt_in.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.agent import opt_in as o


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, True), ("1", True), ("y", True), ("Y", True), ("on", True), ("true", True), ("yes", True),
        ("0", False), ("n", False), ("N", False), ("off", False), ("false", False),
        ("", None), ("2", None), ("o", None), ("maybe", None),
    ],
)
def test_kstrtobool(value: str | None, expected: bool | None) -> None:
    assert o.kstrtobool(value) is expected


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        ("ro quiet", None),
        ("ro kvm_intel.tdx=1", True),
        ("ro kvm_intel.tdx=Y", True),
        ("ro kvm_intel.tdx=on", True),
        ("ro kvm_intel.tdx=true", True),
        ("ro kvm_intel.tdx", True),  # a bare bool parameter is true
        ("ro kvm-intel.tdx=1", True),  # '-' and '_' are the same in module names
        ("ro kvm_intel.tdx=0", False),
        ("kvm_intel.tdx=1 kvm_intel.tdx=0", False),  # the last one wins
        ("kvm_intel.tdx=0 kvm_intel.tdx=1", True),
        ("kvm_intel.tdx=1 kvm_intel.tdx=bogus", True),  # an invalid value is ignored
        ("kvm.tdx=1 kvm_intel.tdxx=1 tdx=1", None),  # other modules and parameters
        ('ro "kvm_intel.tdx=1" quiet', True),
        ('acpi_osi="Windows 2020" kvm_intel.tdx=1', True),
        ("ro -- kvm_intel.tdx=1", None),  # after "--": arguments for init
        ("kvm_intel.nested=1 kvm_intel.tdx=y\n", True),
    ],
)
def test_cmdline_param(cmdline: str, expected: bool | None) -> None:
    assert o.cmdline_param(cmdline) is expected


def test_cmdline_tokens_follow_the_kernels_quoting() -> None:
    assert o.cmdline_tokens('a b="c d" "e f" g') == ["a", "b=c d", "e f", "g"]


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        ([], None),
        (["options kvm_intel tdx=1\n"], True),
        (["options kvm_intel nested=1 tdx=1 enable_apicv=1\n"], True),  # several options per line
        (["options kvm-intel tdx=Y\n"], True),
        (["# options kvm_intel tdx=1\n"], None),  # a comment
        (["   # options kvm_intel tdx=1\n"], None),
        (["options kvm_intel tdx=1\noptions kvm_intel tdx=0\n"], False),  # the last one wins
        (["options kvm_intel tdx=0\n", "options kvm_intel tdx=1\n"], True),  # across files, in order
        (["options kvm_intel tdx=1 tdx=0\n"], False),
        (["options kvm tdx=1\noptions kvm_intel_foo tdx=1\n"], None),  # other modules
        (["options kvm_intel nested=1 \\\n  tdx=1\n"], True),  # a continued line
        (["blacklist kvm_intel\ninstall kvm_intel tdx=1\n"], None),
        # As modprobe does: only whole lines are comments; a "#" among options is handed to the kernel,
        # which ignores it as an unknown parameter and applies the rest.
        (["options kvm_intel nested=1 # tdx=1\n"], True),
        (["options kvm_intel tdx=on # opt in to TDX\n"], True),
    ],
)
def test_modprobe_param(texts: list[str], expected: bool | None) -> None:
    assert o.modprobe_param(texts) is expected


def test_kernel_command_line_wins_over_modprobe_d() -> None:
    assert o.configured("ro kvm_intel.tdx=0", ["options kvm_intel tdx=1\n"]) is False
    assert o.configured("ro", ["options kvm_intel tdx=1\n"]) is True
    assert o.configured("ro kvm_intel.tdx=1", ["options kvm_intel tdx=0\n"]) is True
    assert o.configured("ro", []) is False


def test_modprobe_d_files_are_read_in_name_order_and_etc_shadows_lib(tmp_path: Path) -> None:
    (tmp_path / "etc/modprobe.d").mkdir(parents=True)
    (tmp_path / "lib/modprobe.d").mkdir(parents=True)
    (tmp_path / "etc/modprobe.d/20-b.conf").write_text("options kvm_intel tdx=1\n")
    (tmp_path / "lib/modprobe.d/10-a.conf").write_text("options kvm_intel tdx=0\n")
    (tmp_path / "lib/modprobe.d/20-b.conf").write_text("options kvm_intel tdx=0\n")  # shadowed
    (tmp_path / "etc/modprobe.d/30-c.txt").write_text("options kvm_intel tdx=0\n")  # not a .conf
    assert o.modprobe_param(o.modprobe_texts(tmp_path)) is True


def test_tdx_configured_reads_the_command_line_and_modprobe_d_under_the_root(tmp_path: Path) -> None:
    assert o.tdx_configured(tmp_path) is False
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cmdline").write_text("ro quiet\n")
    (tmp_path / "etc/modprobe.d").mkdir(parents=True)
    (tmp_path / "etc/modprobe.d/kvm.conf").write_text("options kvm_intel tdx=1\n")
    assert o.tdx_configured(tmp_path) is True
    (tmp_path / "proc/cmdline").write_text("ro kvm_intel.tdx=0\n")
    assert o.tdx_configured(tmp_path) is False
