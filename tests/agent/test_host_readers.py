"""The agent's readers, one per fact: boot, kvm_intel, platform flag, KeyIDs, module version, capacity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.agent import boot, capacity, keyids, kvm_intel, platform
from service.agent.module_version import ModuleVersion, read_module_version


def _write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_boot_id_is_none_unless_readable_and_well_formed(tmp_path: Path) -> None:
    assert boot.boot_id(tmp_path) is None
    _write(tmp_path, boot.BOOT_ID, "not a boot id\n")
    assert boot.boot_id(tmp_path) is None
    _write(tmp_path, boot.BOOT_ID, "5d21a4e3-2e27-4116-a3bb-0d0f1891bd77\n")
    assert boot.boot_id(tmp_path) == "5d21a4e3-2e27-4116-a3bb-0d0f1891bd77"
    (tmp_path / boot.BOOT_ID).unlink()
    (tmp_path / boot.BOOT_ID).mkdir()  # there but unreadable
    assert boot.boot_id(tmp_path) is None


def test_kernel_release(tmp_path: Path) -> None:
    assert boot.kernel_release(tmp_path) == "unknown"
    _write(tmp_path, boot.OSRELEASE, "6.16.0-tdx\n")
    assert boot.kernel_release(tmp_path) == "6.16.0-tdx"


def test_kvm_intel_reads_y_n_and_absent_three_ways(tmp_path: Path) -> None:
    assert kvm_intel.look(tmp_path) == kvm_intel.KvmIntel(kvm_intel.Phase.ABSENT, None, None)
    (tmp_path / kvm_intel.MODULE_DIR / "parameters").mkdir(parents=True)
    absent = kvm_intel.look(tmp_path)
    assert (absent.phase, absent.tdx, absent.kvm_tdx, absent.tdx_effective) == (
        kvm_intel.Phase.LIVE, None, False, False,
    )
    _write(tmp_path, kvm_intel.TDX_PARAM, "N\n")
    off = kvm_intel.look(tmp_path)
    assert (off.tdx, off.kvm_tdx, off.tdx_effective) == ("N", True, False)
    _write(tmp_path, kvm_intel.TDX_PARAM, "Y\n")
    on = kvm_intel.look(tmp_path)
    assert (on.tdx, on.kvm_tdx, on.tdx_effective) == ("Y", True, True)
    assert on.instance == off.instance == absent.instance is not None


@pytest.mark.parametrize(("state", "phase"), [("coming", "coming"), ("going", "going"), ("live", "live")])
def test_kvm_intel_phase_follows_initstate(tmp_path: Path, state: str, phase: str) -> None:
    _write(tmp_path, f"{kvm_intel.MODULE_DIR}/initstate", state + "\n")
    _write(tmp_path, kvm_intel.TDX_PARAM, "Y\n")
    now = kvm_intel.look(tmp_path)
    assert now.phase.value == phase
    # Mid-load the parameter may still read Y before KVM's TDX bring-up turns it off: not effective.
    assert now.tdx_effective is (phase == "live")
    assert now.kvm_tdx is (True if phase == "live" else None)


def test_a_reloaded_kvm_intel_is_another_instance(tmp_path: Path) -> None:
    module = tmp_path / kvm_intel.MODULE_DIR
    module.mkdir(parents=True)
    first = kvm_intel.look(tmp_path).instance
    module.rename(tmp_path / "old")  # modprobe -r kvm_intel; modprobe kvm_intel (the old one still exists,
    module.mkdir()  # so the new directory cannot reuse its inode)
    assert kvm_intel.look(tmp_path).instance != first


def test_cpu_flags_and_the_platform_flag(tmp_path: Path) -> None:
    info = "processor\t: 0\nflags\t\t: fpu vmx tdx_host_platform\n\nprocessor\t: 1\nflags\t\t: fpu vmx\n"
    assert "tdx_host_platform" in platform.cpu_flags(info)
    assert platform.cpu_flags("processor : 0\nvmx flags : ept tdx_host_platform\n") == set()
    assert platform.cpu_flags("") == set()
    assert platform.tdx_host_platform(tmp_path) is False
    _write(tmp_path, "proc/cpuinfo", info)
    assert platform.tdx_host_platform(tmp_path) is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [("tdx 63\n", 63), ("sev 10\ntdx 15\nsev_es 2\n", 15), ("sev 10\n", 0), ("", 0), ("tdx max\n", 0)],
)
def test_misc_resource(text: str, expected: int) -> None:
    assert keyids.misc_resource(text) == expected


@pytest.mark.parametrize(
    ("where", "expected"),
    [("sys/fs/cgroup", 63), ("sys/fs/cgroup/unified", 63), ("sys/fs/cgroup/misc", 63)],
)
def test_keyids_from_cgroup_v2_hybrid_or_v1(tmp_path: Path, where: str, expected: int) -> None:
    _write(tmp_path, f"{where}/misc.capacity", "tdx 63\n")
    _write(tmp_path, f"{where}/misc.current", "tdx 2\n")
    assert keyids.keyids_total(tmp_path, True, []) == expected
    assert keyids.keyids_in_use(tmp_path) == 2


KEYID_LINE = "6,4,118211,-;virt/tdx: BIOS enabled: private KeyID range [64, 128)"


def test_keyids_from_the_log_only_without_a_misc_controller_and_only_with_tdx_on(tmp_path: Path) -> None:
    # One KeyID of the range is the TDX module's own: 128 - 64 - 1 for TDs.
    assert keyids.keyids_total(tmp_path, True, [KEYID_LINE]) == 63
    assert keyids.keyids_total(tmp_path, False, [KEYID_LINE]) == 0
    assert keyids.keyids_total(tmp_path, True, ["unrelated"]) == 0
    assert keyids.keyids_in_use(tmp_path) is None  # no misc controller: not observed
    _write(tmp_path, "sys/fs/cgroup/misc.capacity", "")  # v2 root, tdx capacity not set: that is the truth
    assert keyids.keyids_total(tmp_path, True, [KEYID_LINE]) == 0


def test_keyids_from_log_takes_the_boots_last_range() -> None:
    assert keyids.keyids_from_log([]) is None
    assert keyids.keyids_from_log([KEYID_LINE, "[ 0.1] virt/tdx: BIOS enabled: private KeyID range [32, 64)"]) == 31


def test_module_version_is_an_observation_with_health(tmp_path: Path) -> None:
    assert read_module_version(tmp_path) == ModuleVersion(None, None)  # 6.16-7.0, or driver not loaded yet
    path = _write(tmp_path, "sys/devices/faux/tdx_host/version", "1.5.06\n")
    assert read_module_version(tmp_path) == ModuleVersion("1.5.06", True)
    path.unlink()
    path.mkdir()  # there, but reading fails (as -ENXIO after a failed runtime update)
    assert read_module_version(tmp_path) == ModuleVersion(None, False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0-7,9\n", 9), ("0\n", 1), ("0-3,6,8-9", 7), ("0-255", 256), ("", None), ("x-1", None), ("3-1", None)],
)
def test_count_cpu_list(text: str, expected: int | None) -> None:
    assert capacity.count_cpu_list(text) == expected


def test_online_and_present_cpus_and_memory(tmp_path: Path) -> None:
    assert (capacity.online_cpus(tmp_path), capacity.present_cpus(tmp_path), capacity.memory_mib(tmp_path)) == (
        None, None, None,
    )
    _write(tmp_path, "sys/devices/system/cpu/online", "0-13\n")
    _write(tmp_path, "sys/devices/system/cpu/present", "0-15\n")
    _write(tmp_path, "proc/meminfo", "MemTotal:       65830712 kB\n")
    assert (capacity.online_cpus(tmp_path), capacity.present_cpus(tmp_path), capacity.memory_mib(tmp_path)) == (
        14, 16, 64287,
    )


def test_memtotal_mib() -> None:
    assert capacity.memtotal_mib("MemTotal:       65830712 kB\nMemFree: 1 kB\n") == 64287
    assert capacity.memtotal_mib("MemFree:       1 kB\n") is None
    assert capacity.memtotal_mib("MemTotal: 512 kB\n") is None  # less than a MiB is no capacity


@pytest.mark.skipif(not os.path.isdir("/sys/module"), reason="no sysfs here")
def test_the_real_host_can_be_looked_at() -> None:
    now = kvm_intel.look(Path("/"))
    assert now.phase in set(kvm_intel.Phase)
