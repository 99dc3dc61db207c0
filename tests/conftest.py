"""Shared pytest helpers.

Real media fixtures live outside the repository at ``../shared/fixtures/`` (relative to the
project root); tests that need them skip with a clear reason when the folder is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES_MISSING_REASON = (
    "real media fixtures not found at ../shared/fixtures/ next to the project root "
    "(only developer and CI checkouts have them)"
)


def fixtures_dir() -> Path:
    """The shared fixtures folder (it may not exist)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture
def fixtures() -> Path:
    """Path of ``../shared/fixtures``; skips the test when it is absent."""
    path = fixtures_dir()
    if not path.is_dir():
        pytest.skip(FIXTURES_MISSING_REASON)
    return path


@pytest.fixture
def fixture_file(fixtures: Path):
    """Return a function giving the path of one fixture file, skipping if it is missing."""

    def get(name: str) -> Path:
        path = fixtures / name
        if not path.is_file():
            pytest.skip(f"fixture {name} not found in {fixtures}")
        return path

    return get
