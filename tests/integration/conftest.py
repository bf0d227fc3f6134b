"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.emulator import EmulatorServer, IterableEmulator
from tests.helpers import API_KEY


@contextmanager
def served(project_type: str) -> Iterator[tuple[IterableEmulator, str]]:
    """An emulated Iterable project of this type without rate limits, over HTTP: (emulator, base URL)."""
    emu = IterableEmulator(project_type=project_type, api_keys=API_KEY)
    emu.disable_rate_limits()
    with EmulatorServer(emu) as server:
        yield emu, server.url


@pytest.fixture
def emulator() -> Iterator[tuple[IterableEmulator, str]]:
    """A hybrid project (the default project type)."""
    with served("hybrid") as found:
        yield found


@pytest.fixture(params=["email", "hybrid", "userId"])
def project(request: pytest.FixtureRequest) -> Iterator[tuple[IterableEmulator, str]]:
    """An emulated Iterable project of each type."""
    with served(request.param) as found:
        yield found
