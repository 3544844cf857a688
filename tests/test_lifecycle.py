"""The VM state machine, as a table: every (status, action) pair is either a step or a refusal."""

from __future__ import annotations

import pytest

from service.vms.lifecycle import (
    HOLDS_RESOURCES,
    Action,
    InvalidTransition,
    VmStatus,
    releases,
    transition,
)

S, A = VmStatus, Action

STEPS = {
    (S.PENDING, A.PLACED): S.SCHEDULED,
    (S.PENDING, A.DEADLINE): S.FAILED,
    (S.PENDING, A.USER_DELETE): S.DELETED,
    (S.SCHEDULED, A.USER_DELETE): S.DELETED,
    (S.RUNNING, A.USER_DELETE): S.DELETING,
    (S.FAILED, A.USER_DELETE): S.DELETED,
    (S.LOST, A.USER_DELETE): S.DELETED,
    (S.SCHEDULED, A.AGENT_RUNNING): S.RUNNING,
    (S.SCHEDULED, A.AGENT_FAILED): S.FAILED,
    (S.SCHEDULED, A.AGENT_DELETED): S.DELETED,
    (S.RUNNING, A.AGENT_FAILED): S.FAILED,
    (S.RUNNING, A.AGENT_DELETED): S.DELETED,
    (S.DELETING, A.AGENT_DELETED): S.DELETED,
    (S.DELETING, A.AGENT_FAILED): S.DELETED,
    (S.SCHEDULED, A.HOST_REBOOTED): S.LOST,
    (S.RUNNING, A.HOST_REBOOTED): S.LOST,
    (S.DELETING, A.HOST_REBOOTED): S.DELETED,
}
REPEATS = {
    (S.RUNNING, A.AGENT_RUNNING),
    (S.DELETING, A.USER_DELETE),
    (S.DELETED, A.USER_DELETE),
    (S.DELETED, A.AGENT_DELETED),
    (S.FAILED, A.AGENT_FAILED),
}


@pytest.mark.parametrize("status", list(VmStatus))
@pytest.mark.parametrize("action", list(Action))
def test_every_pair(status: VmStatus, action: Action) -> None:
    key = (status, action)
    if key in STEPS:
        step = transition(status, action)
        assert step.to is STEPS[key] and step.changes
    elif key in REPEATS:
        step = transition(status, action)
        assert step.to is status and not step.changes
    else:
        with pytest.raises(InvalidTransition):
            transition(status, action)


def test_terminal_statuses_take_no_agent_report() -> None:
    for status in (S.DELETED, S.LOST):
        for action in (A.AGENT_RUNNING,):
            with pytest.raises(InvalidTransition):
                transition(status, action)


def test_release_exactly_when_leaving_the_statuses_that_hold_resources() -> None:
    for (old, _action), new in STEPS.items():
        assert releases(old, new) == (old in HOLDS_RESOURCES and new not in HOLDS_RESOURCES)
    assert releases(S.RUNNING, S.DELETED)
    assert not releases(S.RUNNING, S.DELETING)
    assert not releases(S.FAILED, S.DELETED)
    assert not releases(S.PENDING, S.DELETED)
