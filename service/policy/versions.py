"""TDX module versions compared as dotted numbers (``1.5.06`` < ``1.5.10``; ``1.5`` == ``1.5.0``).

A version's key is each number zero-padded to ten digits, trailing zero parts dropped: digits only,
so that comparing keys as strings (bytewise, in Python and in SQL) orders versions numerically, and
the fleet's floor is a plain comparison of an indexed host column with one value.
"""

from __future__ import annotations

import re

MAX_PARTS = 8
# Also the schema pattern of every version the API takes (a floor, a filter).
VERSION_PATTERN = rf"^[0-9]{{1,10}}(\.[0-9]{{1,10}}){{0,{MAX_PARTS - 1}}}$"
_VERSION = re.compile(VERSION_PATTERN)


def version_key(version: str | None) -> str | None:
    """The sortable key of a dotted numeric version; None when there is no version or it is not one."""
    if version is None:
        return None
    text = version.strip()
    if not _VERSION.fullmatch(text):
        return None
    numbers = [int(p) for p in text.split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    return "".join(f"{n:010d}" for n in numbers)


def is_version(text: str) -> bool:
    return version_key(text) is not None
