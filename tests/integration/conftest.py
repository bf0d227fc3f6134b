"""Fixtures of the operator tests (test_operator_*.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.emulator import EmulatorServer, IterableEmulator
from tests.helpers import API_KEY


@pytest.fixture
def served_emulator() -> Iterator[tuple[IterableEmulator, str]]:
    """A hybrid-project emulator without rate limits over HTTP: (emulator, base URL)."""
    emu = IterableEmulator(project_type="hybrid", api_keys=API_KEY)
    emu.disable_rate_limits()
    with EmulatorServer(emu) as server:
        yield emu, server.url
