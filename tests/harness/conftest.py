"""Fixtures of the `servescope run` tests: real servers on 127.0.0.1 only."""

from __future__ import annotations

import pytest
from support.slow_server import SlowServer


@pytest.fixture
def slow_server_factory():
    """Start SlowServer(*args) instances; all are stopped at the end of the test."""
    started: list[SlowServer] = []

    def start(*args: str) -> SlowServer:
        server = SlowServer(*args).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__()
