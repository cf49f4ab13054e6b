"""Fixtures of the unit layer."""

from __future__ import annotations

import pytest

from tests.fakes import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    """A fresh fake clock for one test."""
    return FakeClock()
