"""``If-Match`` (RFC 9110, 13.1.1) against a resource's generation, its ``ETag: "<generation>"``.

The header is ``*`` or a comma-separated list of entity tags; the precondition holds when any of
them is the current ETag. If-Match uses the strong comparison: a weak tag (``W/"3"``) never
matches, since the server sends only strong ones. A bare generation (``3``) is taken as ``"3"``,
as it always was. Anything else in the list (not ASCII digits, more digits than a 64-bit
generation has, stray quotes) names no version: it matches nothing, and a header in which nothing
can match is refused like a stale one (412), never with a 500.
"""

from __future__ import annotations

import re

# One list member: a strong tag of ASCII decimal digits, a bare number, or something else (any run
# without a comma or a quote, or a quoted string). At most 19 digits: generations are BIGINTs.
# Strong comparison is character by character, so a generation is written as the server writes it.
_GENERATION = r"(0|[1-9][0-9]{0,18})"  # as the server writes it: "7", never "007"
_MEMBER = re.compile(rf'\s*(?:"{_GENERATION}"|{_GENERATION}|W/"[^"]*"|"[^"]*"|[^,"]*)\s*')
MAX_SHOWN = 80


def parse_if_match(header: str | None) -> list[int] | None:
    """``None`` when any version may be changed (no header, or ``*``); else the generations the
    client accepts (possibly none: then every version fails the precondition)."""
    if header is None or header.strip() == "*":
        return None
    accepted: list[int] = []
    pos = 0
    while pos <= len(header):
        member = _MEMBER.match(header, pos)
        assert member is not None  # the last alternative matches the empty string
        digits = member.group(1) or member.group(2)
        end = member.end()
        if end < len(header) and header[end] != ",":
            return []  # e.g. '"1" "2"' or '"1"x': not a list of entity tags
        if digits is not None:
            accepted.append(int(digits))
        pos = end + 1
    return accepted


def shown(header: str | None) -> str:
    """The header as a problem's detail may quote it (a client may send kilobytes)."""
    text = header or ""
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."
