"""What the kernel command line and modprobe.d ask for the *next* kvm_intel load (``tdx_configured``).

This is intent, never a fact of the current load: writing ``options kvm_intel tdx=1`` changes
nothing until kvm_intel is loaded again. The agent reports it with every heartbeat, and the host
shows "opt-in configured: takes effect at the next kvm_intel load" while it differs from the load.

Boolean module parameters follow the kernel's ``kstrtobool`` (``1``, ``y``, ``Y``, ``on``,
``true`` ... are true; a bare ``kvm_intel.tdx`` is true), the last setting wins, and ``-``/``_``
are equivalent in module and parameter names, as for the kernel and modprobe. When both sources
set ``tdx``, the kernel command line wins: modprobe appends its options after those of modprobe.d,
and the kernel keeps the last value.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from service.agent.files import read_text

MODULE = "kvm_intel"
PARAM = "tdx"
MODPROBE_DIRS = ("etc/modprobe.d", "run/modprobe.d", "usr/local/lib/modprobe.d", "usr/lib/modprobe.d", "lib/modprobe.d")


def kstrtobool(value: str | None) -> bool | None:
    """The kernel's reading of a bool parameter; ``None`` for a value it would reject.

    A parameter given without ``=value`` (``value is None``) means true.
    """
    if value is None:
        return True
    if not value:
        return None
    first = value[0].lower()
    if first in "yt1":
        return True
    if first in "nf0":
        return False
    if first == "o" and len(value) > 1:
        return {"n": True, "f": False}.get(value[1].lower())
    return None


def _norm(name: str) -> str:
    return name.replace("-", "_")


def cmdline_tokens(cmdline: str) -> list[str]:
    """Kernel command line parameters split like the kernel's ``next_arg``: on blanks outside double
    quotes, quotes removed; what follows ``--`` goes to init."""
    tokens: list[str] = []
    current: list[str] = []
    quoted = started = False
    for ch in cmdline:
        if ch == '"':
            quoted, started = not quoted, True
        elif ch.isspace() and not quoted:
            if started:
                tokens.append("".join(current))
            current, started = [], False
        else:
            current.append(ch)
            started = True
    if started:
        tokens.append("".join(current))
    return tokens[: tokens.index("--")] if "--" in tokens else tokens


def _apply_param(tokens: Iterable[str], param: str, current: bool | None) -> bool | None:
    for token in tokens:
        name, sep, value = token.partition("=")
        if _norm(name) != _norm(param):
            continue
        parsed = kstrtobool(value if sep else None)
        if parsed is not None:  # the kernel refuses an invalid value and keeps the old one
            current = parsed
    return current


def cmdline_param(cmdline: str, module: str = MODULE, param: str = PARAM) -> bool | None:
    """``module.param`` on the kernel command line, last one wins; ``None`` when it is not set."""
    params: list[str] = []
    for token in cmdline_tokens(cmdline):
        name, sep, value = token.partition("=")
        mod, dot, pname = _norm(name).partition(".")
        if dot and mod == _norm(module):
            params.append(f"{pname}{sep}{value}")
    return _apply_param(params, param, None)


def modprobe_logical_lines(text: str) -> list[str]:
    """Lines of a modprobe.d file with ``\\`` continuations joined and whole-line comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            lines.append(stripped)
    if pending.strip() and not pending.strip().startswith("#"):
        lines.append(pending.strip())
    return lines


def modprobe_param(texts: Iterable[str], module: str = MODULE, param: str = PARAM) -> bool | None:
    """``options <module> ... param=...`` across modprobe.d files (in read order), last one wins.

    Like modprobe, only whole lines are comments: a ``#`` after options is handed to the kernel,
    which ignores it as an unknown parameter and still applies the options after it.
    """
    value: bool | None = None
    for text in texts:
        for line in modprobe_logical_lines(text):
            words = line.split()
            if len(words) >= 2 and words[0] == "options" and _norm(words[1]) == _norm(module):
                value = _apply_param(words[2:], param, value)
    return value


def configured(cmdline: str, modprobe_texts: Iterable[str]) -> bool:
    """Whether the next ``modprobe kvm_intel`` would get ``tdx=1`` from the command line or modprobe.d."""
    on_cmdline = cmdline_param(cmdline)
    if on_cmdline is not None:
        return on_cmdline
    return bool(modprobe_param(modprobe_texts))


def modprobe_texts(root: Path) -> list[str]:
    """modprobe.d files in modprobe's order: sorted by file name; the first directory wins a name."""
    chosen: dict[str, Path] = {}
    for directory in MODPROBE_DIRS:
        try:
            entries = list((root / directory).glob("*.conf"))
        except OSError:
            continue
        for path in entries:
            chosen.setdefault(path.name, path)
    texts = []
    for name in sorted(chosen):
        try:
            texts.append(chosen[name].read_text(encoding="utf-8", errors="replace"))
        except (OSError, ValueError):
            continue
    return texts


def tdx_configured(root: Path) -> bool:
    return configured(read_text(root, "proc/cmdline") or "", modprobe_texts(root))
