"""Properties of the reader's state machine (``protocol/state.py``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpwarden.protocol.errors import LocalProtocolError
from smtpwarden.protocol.state import (
    SERVER_TRANSITIONS,
    ServerInput,
    ServerMachine,
    ServerState,
)


@given(st.lists(st.sampled_from(ServerInput), max_size=20))
def test_the_machine_moves_only_along_its_table_and_error_is_final(
    inputs: list[ServerInput],
) -> None:
    machine = ServerMachine()
    assert ServerMachine().state is ServerState.COMMAND
    for event in inputs:
        before = machine.state
        expected = SERVER_TRANSITIONS.get((before, event))
        if expected is None:
            # A pair missing from the table is the caller's bug: it fails
            # loudly, and every later call fails too.
            with pytest.raises(LocalProtocolError):
                machine.move(event)
            assert machine.state is ServerState.ERROR
        else:
            assert machine.move(event) is expected
            assert machine.state is expected
    if machine.state is ServerState.ERROR:
        for event in ServerInput:
            with pytest.raises(LocalProtocolError):
                machine.move(event)
            assert machine.state is ServerState.ERROR


@given(st.lists(st.sampled_from(ServerInput), max_size=20))
def test_fail_always_ends_in_error(inputs: list[ServerInput]) -> None:
    machine = ServerMachine()
    for event in inputs:
        if (machine.state, event) in SERVER_TRANSITIONS:
            machine.move(event)
    machine.fail()
    assert machine.state is ServerState.ERROR
    assert not any(state is ServerState.ERROR for state, _ in SERVER_TRANSITIONS)
