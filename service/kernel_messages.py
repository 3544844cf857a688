"""The TDX lines upstream Linux writes to the kernel log, verbatim, and what each one means.

Two kernel eras (DESIGN.md section 2):

- ``6.16-7.0``: the TDX module is set up when ``kvm_intel`` loads with ``tdx=1``
  (arch/x86/virt/vmx/tdx/tdx.c ``tdx_enable`` called from arch/x86/kvm/vmx/tdx.c ``tdx_bringup``).
  A failed module initialization is sticky: later loads get ``-EINVAL`` without a new line.
- ``7.1+``: the TDX module is set up at boot (``tdx_enable`` is a ``subsys_initcall``);
  ``kvm_intel.tdx`` only gates KVM's use of it.

Each message is the printk format string exactly as in the kernel source, after its ``pr_fmt``
prefix (``virt/tdx: `` for the TDX host core, ``kvm_intel: `` for KVM). Its scope says how long it
stays true: a ``boot`` line (the TDX host core, printed once per boot) explains every later load of
that boot; a ``load`` line (printed by a ``kvm_intel`` load that was asked for ``tdx=1``) explains
only that load. Shared by the agent (which picks the lines of the current load) and the service
(which turns them into a reason code); pure, no server imports.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class Era(StrEnum):
    LOAD_TIME = "6.16-7.0"
    BOOT_TIME = "7.1+"


class Scope(StrEnum):
    BOOT = "boot"
    LOAD = "load"


BOTH = (Era.LOAD_TIME, Era.BOOT_TIME)
TDX_HOST = "virt/tdx"
KVM = "kvm_intel"

_CONVERSION = re.compile(r"%(0?\d*)(?:ll|l|z|h)?([duxs%])")
_CAPTURE = {"d": r"(-?\d+)", "u": r"(\d+)", "x": r"([0-9a-fA-F]+)", "s": r"(.*?)"}


def _pattern(fmt: str) -> re.Pattern[str]:
    parts: list[str] = []
    last = 0
    for m in _CONVERSION.finditer(fmt):
        parts.append(re.escape(fmt[last : m.start()]))
        parts.append("%" if m.group(2) == "%" else _CAPTURE[m.group(2)])
        last = m.end()
    parts.append(re.escape(fmt[last:]))
    return re.compile("".join(parts))


@dataclass(frozen=True, slots=True)
class Message:
    tag: str
    fmt: str
    code: str | None  # a tdx_reasons code; None for a line that reports progress
    scope: Scope
    eras: tuple[Era, ...]
    # kvm_intel fails to load on this path (a hard failure) instead of loading with tdx=N.
    hard: bool = False
    # A more precise code for some values of the line's first %d (e.g. -ENOMEM).
    by_errno: Mapping[int, str] = field(default_factory=dict)

    def render(self, *args: object) -> str:
        """The line as the kernel prints it (for fixtures, tests and docs)."""
        return f"{self.tag}: " + _CONVERSION.sub(lambda m: "%" + m.group(1) + m.group(2).replace("u", "d"),
                                                self.fmt) % args


ENOMEM = -12

# virt/tdx: BIOS enabled: private KeyID range [a, b): b - a TDX KeyIDs, the first is the module's own.
KEYID_RANGE = Message(TDX_HOST, "BIOS enabled: private KeyID range [%u, %u)", None, Scope.BOOT, BOTH)

# virt/tdx: N KB allocated for PAMT (init_tdx_module, once the TDMRs' PAMTs are allocated).
PAMT_ALLOCATED = Message(TDX_HOST, "%lu KB allocated for PAMT", None, Scope.BOOT, BOTH)

MESSAGES: tuple[Message, ...] = (
    # --- the TDX host core at boot (arch/x86/virt/vmx/tdx/tdx.c tdx_init), both eras ---------------
    KEYID_RANGE,
    Message(TDX_HOST, "initialization failed: too few private KeyIDs available.", "too_few_keyids",
            Scope.BOOT, BOTH),
    Message(TDX_HOST, "initialization failed: Hibernation support is enabled", "hibernation_enabled",
            Scope.BOOT, BOTH),
    Message(TDX_HOST, "initialization failed: register_memory_notifier() failed (%d)", "tdx_module_init_failed",
            Scope.BOOT, BOTH),
    Message(TDX_HOST, "Disable ACPI S3. Turn off TDX in the BIOS to use ACPI S3.", None, Scope.BOOT, BOTH),
    # --- the TDX module's initialization (tdx_enable / init_tdx_module) -----------------------------
    Message(TDX_HOST, "module not loaded", "tdx_module_not_loaded", Scope.BOOT, BOTH),
    Message(TDX_HOST, "frame pointer (RBP) clobber bug present, upgrade TDX module", "tdx_module_rbp_bug",
            Scope.BOOT, BOTH),
    Message(TDX_HOST, "initialization failed: TDMRs exhausted.", "tdx_module_init_failed", Scope.BOOT, BOTH),
    Message(TDX_HOST, "initialization failed: TDMR [0x%llx, 0x%llx): reserved areas exhausted.",
            "tdx_module_init_failed", Scope.BOOT, BOTH),
    PAMT_ALLOCATED,
    Message(TDX_HOST, "module initialization failed (%d)", "tdx_module_init_failed", Scope.BOOT,
            (Era.LOAD_TIME,), hard=True, by_errno={ENOMEM: "pamt_alloc_failed"}),
    Message(TDX_HOST, "module initialized", None, Scope.BOOT, (Era.LOAD_TIME,)),
    Message(TDX_HOST, "TDX-Module initialization failed (%d)", "tdx_module_init_failed", Scope.BOOT,
            (Era.BOOT_TIME,), by_errno={ENOMEM: "pamt_alloc_failed"}),
    Message(TDX_HOST, "TDX-Module initialized", None, Scope.BOOT, (Era.BOOT_TIME,)),
    Message(TDX_HOST, "TDX not supported by the host platform", "platform_without_tdx", Scope.BOOT,
            (Era.BOOT_TIME,)),
    Message(TDX_HOST, "XSAVE is required for TDX", "missing_cpu_feature", Scope.BOOT, (Era.BOOT_TIME,)),
    Message(TDX_HOST, "MOVDIR64B is required for TDX", "missing_cpu_feature", Scope.BOOT, (Era.BOOT_TIME,)),
    Message(TDX_HOST, "Self-snoop is required for TDX", "missing_cpu_feature", Scope.BOOT, (Era.BOOT_TIME,)),
    # --- KVM's TDX bring-up at a kvm_intel load with tdx=1 (arch/x86/kvm/vmx/tdx.c tdx_bringup) ------
    Message(KVM, "EPT is required for TDX", "missing_ept", Scope.LOAD, BOTH),
    Message(KVM, "TDP MMU and MMIO caching and EPT A/D bit is required for TDX", "missing_tdp_mmu",
            Scope.LOAD, BOTH),
    Message(KVM, "TDP MMU and MMIO caching is required for TDX", "missing_tdp_mmu", Scope.LOAD, (Era.LOAD_TIME,)),
    Message(KVM, "APICv is required for TDX", "missing_apicv", Scope.LOAD, BOTH),
    Message(KVM, "tdx: OSXSAVE is required for TDX", "missing_cpu_feature", Scope.LOAD, (Era.LOAD_TIME,)),
    Message(KVM, "OSXSAVE is required for TDX", "missing_cpu_feature", Scope.LOAD, (Era.BOOT_TIME,), hard=True),
    Message(KVM, "tdx: MOVDIR64B is required for TDX", "missing_cpu_feature", Scope.LOAD, (Era.LOAD_TIME,)),
    Message(KVM, "Self-snoop is required for TDX", "missing_cpu_feature", Scope.LOAD, (Era.LOAD_TIME,)),
    Message(KVM, "tdx: no TDX private KeyIDs available", "platform_without_tdx", Scope.LOAD, (Era.LOAD_TIME,)),
    Message(KVM, "TDX not supported by the host platform", "platform_without_tdx", Scope.LOAD, (Era.BOOT_TIME,)),
    Message(KVM, "tdx: tdx requires kvm.enable_virt_at_load=1", "virt_not_enabled_at_load", Scope.LOAD,
            (Era.LOAD_TIME,)),
    Message(KVM, "Disable TDX: MAX_VCPU_PER_TD (%u) smaller than number of logical CPUs (%u).",
            "max_vcpus_per_td_too_small", Scope.LOAD, BOTH, hard=True),
)

_COMPILED: tuple[tuple[Message, re.Pattern[str]], ...] = tuple((m, _pattern(m.fmt)) for m in MESSAGES)
_TAG = re.compile(r"(?:^|[\s;\]])((?:virt/tdx|kvm_intel): )")


@dataclass(frozen=True, slots=True)
class Known:
    """A kernel-log line recognised as one of MESSAGES."""

    message: Message
    text: str  # the line from its tag on, as the kernel printed it
    args: tuple[str, ...]

    @property
    def code(self) -> str | None:
        code = self.message.code
        if self.message.by_errno and self.args:
            code = self.message.by_errno.get(int(self.args[0]), code)
        return code


def tagged(text: str) -> str | None:
    """The message from its ``virt/tdx:`` or ``kvm_intel:`` tag on; ``None`` when it has neither."""
    m = _TAG.search(text)
    return text[m.start(1) :].strip() if m else None


def recognise(text: str) -> Known | None:
    """The catalogue entry of a kernel-log message (with or without the prefixes before its tag)."""
    line = tagged(text)
    if line is None:
        return None
    tag, _, rest = line.partition(": ")
    for message, pattern in _COMPILED:
        if message.tag == tag and (m := pattern.fullmatch(rest)):
            return Known(message, line, m.groups())
    return None


def keyid_range(text: str) -> tuple[int, int] | None:
    """``[a, b)`` of ``virt/tdx: BIOS enabled: private KeyID range [a, b)``."""
    known = recognise(text)
    if known is None or known.message is not KEYID_RANGE:
        return None
    a, b = (int(x) for x in known.args)
    return (a, b) if b > a else None


def pamt_kb(text: str) -> int | None:
    """N of ``virt/tdx: N KB allocated for PAMT``."""
    known = recognise(text)
    if known is None or known.message is not PAMT_ALLOCATED:
        return None
    return int(known.args[0])


def reason_codes(lines: Iterable[str]) -> list[tuple[str, str]]:
    """``(code, line)`` of every line that gives a reason, in log order."""
    found = []
    for line in lines:
        known = recognise(line)
        if known is not None and known.code is not None:
            found.append((known.code, known.text))
    return found
