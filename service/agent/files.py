"""Reading a host's files under a root directory (``/`` on a host, a fixture tree in tests)."""

from __future__ import annotations

from pathlib import Path


def read_text(root: Path, rel: str) -> str | None:
    """The file's text; ``None`` when it is missing or cannot be read (never an exception)."""
    try:
        return (root / rel).read_text(encoding="utf-8", errors="replace")
    except (OSError, ValueError):
        return None
