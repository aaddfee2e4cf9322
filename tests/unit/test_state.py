"""The intent lifecycle table."""

from __future__ import annotations

import itertools

import pytest

from farmhand.contracts.state import (
    ACTIVE,
    CLAIMABLE,
    TERMINAL,
    TRANSITIONS,
    IntentState,
    allowed,
    check,
    sources_of,
)
from farmhand.errors import InvalidTransition

S = IntentState
ALL_PAIRS = list(itertools.product(IntentState, IntentState))

#: The only ways out of a terminal state: by hand (``farmhand dlq retry``).
HUMAN_EXITS_FROM_TERMINAL = {S.DEAD: {S.PENDING}}


def test_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(IntentState)


def test_terminal_states() -> None:
    assert {s for s in IntentState if s.terminal} == TERMINAL
    assert {S.SUCCEEDED, S.DEAD, S.REJECTED, S.EXPIRED, S.CANCELLED} == TERMINAL


@pytest.mark.parametrize("state", sorted(TERMINAL))
def test_terminal_states_have_no_exits_but_by_hand(state: IntentState) -> None:
    assert set(TRANSITIONS[state]) == HUMAN_EXITS_FROM_TERMINAL.get(state, set())


@pytest.mark.parametrize("state", [S.SUCCEEDED, S.REJECTED, S.EXPIRED, S.CANCELLED])
def test_final_states_have_no_exits(state: IntentState) -> None:
    for target in IntentState:
        assert not allowed(state, target)
        with pytest.raises(InvalidTransition):
            check(state, target)


def test_unknown_only_left_by_resolution() -> None:
    assert TRANSITIONS[S.UNKNOWN] == {S.SUCCEEDED, S.PENDING, S.DEAD}


def test_takeover_and_release() -> None:
    assert allowed(S.RUNNING, S.RUNNING)
    assert allowed(S.RUNNING, S.PENDING)


@pytest.mark.parametrize(("source", "target"), ALL_PAIRS)
def test_allowed_matches_table_and_check_agrees(source: IntentState, target: IntentState) -> None:
    expected = target in TRANSITIONS[source]
    assert allowed(source, target) is expected
    if expected:
        check(source, target, "in_1")
    else:
        with pytest.raises(InvalidTransition) as info:
            check(source, target, "in_1")
        message = str(info.value)
        assert "in_1" in message
        assert str(source) in message
        assert str(target) in message


def test_check_without_intent_id() -> None:
    with pytest.raises(InvalidTransition, match=r"^is succeeded; it cannot become pending$"):
        check(S.SUCCEEDED, S.PENDING)


def test_invalid_transition_exit_code() -> None:
    assert InvalidTransition.exit_code == 6


@pytest.mark.parametrize("target", list(IntentState))
def test_sources_of(target: IntentState) -> None:
    assert set(sources_of(target)) == {s for s in IntentState if allowed(s, target)}


def test_claimable_states_can_start_running() -> None:
    for state in CLAIMABLE:
        assert allowed(state, S.RUNNING)
        assert not state.terminal
    assert set(CLAIMABLE) < set(ACTIVE)


def _reachable(start: IntentState) -> set[IntentState]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_state_reachable_from_pending() -> None:
    assert _reachable(S.PENDING) == set(IntentState)


@pytest.mark.parametrize("state", [s for s in IntentState if not s.terminal])
def test_every_live_state_can_end(state: IntentState) -> None:
    assert _reachable(state) & TERMINAL
