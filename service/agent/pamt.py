"""The TDX module's PAMT (its metadata for every page of TDX memory, about 1/256 of RAM, physically
contiguous): how much it took this boot, from the kernel log's ``virt/tdx: N KB allocated for PAMT``
(arch/x86/virt/vmx/tdx/tdx.c, init_tdx_module). The memory stays allocated for the boot (the module
cannot be torn down), so it counts for every later load of the boot, whatever kvm_intel.tdx says;
None when the log does not say (TDX never came up, or the log is unreadable or rotated)."""

from __future__ import annotations

from collections.abc import Iterable

from service.kernel_messages import pamt_kb


def pamt_kb_of_boot(log_lines: Iterable[str]) -> int | None:
    found: int | None = None
    for line in log_lines:
        kb = pamt_kb(line)
        if kb is not None:
            found = kb
    return found
