"""The reactor the service trees need is checked, interface by interface, before it is used."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock

from twisted_novnc.reactors import daemon_reactor, installed_reactor


def test_the_installed_reactor_provides_every_interface():
    """The reactor twistd runs (here, the test run's) is accepted as it is."""
    from twisted.internet import reactor

    assert installed_reactor() is reactor


def test_a_reactor_short_of_an_interface_is_refused_by_name():
    """A reactor that cannot start processes or be reached from a signal handler is refused,
    the missing interfaces named (a test's MemoryReactorClock has neither)."""
    with pytest.raises(TypeError) as info:
        daemon_reactor(MemoryReactorClock())
    message = str(info.value)
    assert "IReactorFromThreads" in message and "IReactorProcess" in message
    assert "IReactorTime" not in message and "IReactorTCP" not in message
