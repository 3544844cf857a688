"""The VM state machine. Pure: given a status and what happened, the next status or a refusal.

    pending -> scheduled -> running -> deleting -> deleted
       |          |           |           (agent confirms)
       +-> failed (deadline)  +-> failed / deleted (agent reports)
    scheduled|running -> lost, deleting -> deleted (the host rebooted)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class VmStatus(StrEnum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    DELETING = "deleting"
    DELETED = "deleted"
    FAILED = "failed"
    LOST = "lost"


# Statuses in which a VM holds resources on its host.
HOLDS_RESOURCES = frozenset({VmStatus.SCHEDULED, VmStatus.RUNNING, VmStatus.DELETING})
TERMINAL = frozenset({VmStatus.DELETED, VmStatus.FAILED, VmStatus.LOST})
# Statuses in which a VM counts against its project's quota: every status but the ended ones.
COUNTS_FOR_QUOTA = frozenset(VmStatus) - TERMINAL


class Action(StrEnum):
    PLACED = "placed"
    DEADLINE = "deadline"
    USER_DELETE = "user_delete"
    HOST_REBOOTED = "host_rebooted"
    AGENT_RUNNING = "running"
    AGENT_FAILED = "failed"
    AGENT_DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class Transition:
    to: VmStatus
    # False when the VM is already where the action leads (a retried report): nothing to do.
    changes: bool = True


def releases(old: VmStatus, new: VmStatus) -> bool:
    """Whether moving from ``old`` to ``new`` gives the VM's resources back to its host."""
    return old in HOLDS_RESOURCES and new not in HOLDS_RESOURCES


def ends_usage(old: VmStatus, new: VmStatus) -> bool:
    """Whether moving from ``old`` to ``new`` gives the VM's share of its project's quota back."""
    return old in COUNTS_FOR_QUOTA and new not in COUNTS_FOR_QUOTA


class InvalidTransition(Exception):
    def __init__(self, status: VmStatus, action: Action) -> None:
        super().__init__(f"a {status.value} VM cannot take {action.value!r}")
        self.status = status
        self.action = action


_TABLE: dict[tuple[VmStatus, Action], VmStatus] = {
    (VmStatus.PENDING, Action.PLACED): VmStatus.SCHEDULED,
    (VmStatus.PENDING, Action.DEADLINE): VmStatus.FAILED,
    (VmStatus.PENDING, Action.USER_DELETE): VmStatus.DELETED,
    # A VM that never started is gone at once; its agent sees it deleted and cleans up.
    (VmStatus.SCHEDULED, Action.USER_DELETE): VmStatus.DELETED,
    (VmStatus.RUNNING, Action.USER_DELETE): VmStatus.DELETING,
    (VmStatus.FAILED, Action.USER_DELETE): VmStatus.DELETED,
    (VmStatus.LOST, Action.USER_DELETE): VmStatus.DELETED,
    (VmStatus.SCHEDULED, Action.AGENT_RUNNING): VmStatus.RUNNING,
    (VmStatus.SCHEDULED, Action.AGENT_FAILED): VmStatus.FAILED,
    (VmStatus.SCHEDULED, Action.AGENT_DELETED): VmStatus.DELETED,
    (VmStatus.RUNNING, Action.AGENT_FAILED): VmStatus.FAILED,
    (VmStatus.RUNNING, Action.AGENT_DELETED): VmStatus.DELETED,
    (VmStatus.DELETING, Action.AGENT_DELETED): VmStatus.DELETED,
    (VmStatus.DELETING, Action.AGENT_FAILED): VmStatus.DELETED,
    (VmStatus.SCHEDULED, Action.HOST_REBOOTED): VmStatus.LOST,
    (VmStatus.RUNNING, Action.HOST_REBOOTED): VmStatus.LOST,
    # The user already asked for it to go, and the reboot took it.
    (VmStatus.DELETING, Action.HOST_REBOOTED): VmStatus.DELETED,
}

# Repeats that are answered as success without a change (agents and clients retry).
_IDEMPOTENT: dict[tuple[VmStatus, Action], VmStatus] = {
    (VmStatus.RUNNING, Action.AGENT_RUNNING): VmStatus.RUNNING,
    (VmStatus.DELETING, Action.USER_DELETE): VmStatus.DELETING,
    (VmStatus.DELETED, Action.USER_DELETE): VmStatus.DELETED,
    (VmStatus.DELETED, Action.AGENT_DELETED): VmStatus.DELETED,
    (VmStatus.FAILED, Action.AGENT_FAILED): VmStatus.FAILED,
}


def transition(status: VmStatus, action: Action) -> Transition:
    key = (status, action)
    if key in _TABLE:
        return Transition(_TABLE[key])
    if key in _IDEMPOTENT:
        return Transition(_IDEMPOTENT[key], changes=False)
    raise InvalidTransition(status, action)


# The event written when a VM enters each status.
EVENT_KIND: dict[VmStatus, str] = {
    VmStatus.SCHEDULED: "vm.scheduled",
    VmStatus.RUNNING: "vm.running",
    VmStatus.DELETING: "vm.deleting",
    VmStatus.DELETED: "vm.deleted",
    VmStatus.FAILED: "vm.failed",
    VmStatus.LOST: "vm.lost",
}
