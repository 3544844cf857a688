""""Nothing of this shape fits": what the pending queue remembers between capacity changes.

Every placement filter looks at a VM only through its ``VmRequest``: its size (vCPUs, memory) and
the rest, its *placement class* (``tdx``, selector, anti-affinity group, ...), and a larger VM
never fits where a smaller one of its class does not. So when a VM finds no host, no VM of the same
class that is at least as large can find one either, until capacity grows: the memo keeps, per
class, the smallest sizes known not to fit (a Pareto front) and answers "known not to fit" for
anything they dominate. Placements only shrink capacity, so the memo stays true while the queue
works; the queue clears it when capacity may have grown (``capacity_signal``) and after a TTL.

Pure and per replica: a stale memo can only delay a retry (never place wrongly), and the TTL bounds
that delay even if a capacity notification was lost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from service.scheduler.types import VmRequest

# Past this many remembered sizes, new ones are not recorded (the memo is only an optimization).
MAX_ENTRIES = 10_000


_SIZE_FIELDS = frozenset({"vcpus", "memory_mib"})
# Fields added to VmRequest after classes were first stored (migration 0003_quotas): they join the
# digest only when they differ from their default, so the classes stored before stay what they were.
_LATER_FIELDS = frozenset({"attestation"})


def placement_class(req: VmRequest) -> str:
    """A digest of everything the filters see of a VM besides its size (every field of
    ``VmRequest`` but vCPUs and memory, so a field added for a new filter joins the class)."""
    rest = {
        f.name: getattr(req, f.name) for f in dataclasses.fields(req)
        if f.name not in _SIZE_FIELDS and not (f.name in _LATER_FIELDS and getattr(req, f.name) == f.default)
    }
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class Shape:
    placement_class: str
    vcpus: int
    memory_mib: int


class ShapeMemo:
    def __init__(self) -> None:
        self._fronts: dict[str, list[tuple[int, int]]] = {}
        self._hits: dict[str, int] = {}
        self._entries = 0

    def __len__(self) -> int:
        return self._entries

    def clear(self) -> None:
        self._fronts.clear()
        self._hits.clear()
        self._entries = 0

    def known_not_to_fit(self, shape: Shape) -> bool:
        front = self._fronts.get(shape.placement_class)
        if not front:
            return False
        for vcpus, memory_mib in front:
            if shape.vcpus >= vcpus and shape.memory_mib >= memory_mib:
                self._hits[shape.placement_class] = self._hits.get(shape.placement_class, 0) + 1
                return True
        return False

    def record_no_fit(self, shape: Shape) -> None:
        front = self._fronts.setdefault(shape.placement_class, [])
        if any(shape.vcpus >= v and shape.memory_mib >= m for v, m in front):
            return  # already known
        if self._entries >= MAX_ENTRIES:
            return
        kept = [(v, m) for v, m in front if not (v >= shape.vcpus and m >= shape.memory_mib)]
        kept.append((shape.vcpus, shape.memory_mib))
        self._entries += len(kept) - len(front)
        self._fronts[shape.placement_class] = kept

    def exclusions(self, max_terms: int) -> list[tuple[str, int, int]]:
        """At most ``max_terms`` (class, vcpus, memory) entries, the most useful first (classes
        that skipped the most VMs), for the queue to skip in SQL what it would skip here anyway."""
        out: list[tuple[str, int, int]] = []
        for cls in sorted(self._fronts, key=lambda c: -self._hits.get(c, 0)):
            for vcpus, memory_mib in self._fronts[cls]:
                if len(out) == max_terms:
                    return out
                out.append((cls, vcpus, memory_mib))
        return out
